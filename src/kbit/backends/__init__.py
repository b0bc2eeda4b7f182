"""Kernel implementations of the ops declared in kbit._ops.

``reference`` is pure PyTorch and registered for every device: it is the specification, and what
CUDA, MPS and XPU users run. ``cpu`` calls the native kernels and must match it bit for bit.
"""

from . import cpu, reference  # noqa: F401  (registration side effects)
