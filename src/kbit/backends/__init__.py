"""Kernel implementations of the ops declared in kbit._ops.

``reference`` is pure PyTorch and registered for every device: it is the specification, and what
CUDA, MPS and XPU users run. ``cpu`` calls the native kernels and must match it bit for bit.
"""

from .. import _optim_ops  # noqa: F401  (optimizer op schemas)
from . import cpu, cpu_matmul, cpu_optim, reference, reference_optim  # noqa: F401  (registration side effects)
