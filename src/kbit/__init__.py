"""kbit: k-bit optimizers and 4-bit weights for PyTorch, with fast native CPU kernels.

A drop-in for bitsandbytes' API (``import kbit as bnb``) with interchangeable checkpoints.
"""

import torch  # noqa: F401  (must load before the native module: one OpenMP runtime, see kbit/_native.py)

from . import _native, _ops, backends, formats, functional, nn, optim  # noqa: F401
from .matmul import MatMul4Bit, matmul_4bit
from ._native import cpu_capability, get_cpu_capability, set_cpu_capability, supported_cpu_capabilities

__version__ = "0.1.0"

__all__ = [
    "functional",
    "optim",
    "matmul_4bit",
    "MatMul4Bit",
    "nn",
    "formats",
    "get_cpu_capability",
    "set_cpu_capability",
    "supported_cpu_capabilities",
    "cpu_capability",
    "__version__",
]
