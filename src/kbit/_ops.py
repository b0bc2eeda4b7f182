"""Every kbit operator: its schema and its fake (meta) kernel, in one place.

Implementations register elsewhere: ``backends/reference.py`` (pure PyTorch, every device — the
specification) and ``backends/cpu.py`` (native kernels, CPU). The dispatcher routes by device, and
``torch.compile`` traces through the fake kernels without a graph break.

Note [op semantics]
- Blocks run over the flattened, row-major tensor; the last block may be partial and gets its own
  absmax over its valid elements.
- Codes are the exact nearest entry of the (sorted) code map: the number of float32 midpoints strictly
  below the scaled value (Note [NF4 decision rule] in csrc/formats.h). FP4 follows bitsandbytes' CUDA
  rule. These are bitsandbytes' reference semantics, not its CPU approximations.
- Output shapes are never transposed or reshaped: dequantize returns exactly the requested shape.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _checks

LIBRARY = "kbit"

_SCHEMAS = {
    "quantize_blockwise": "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    "dequantize_blockwise.out": (
        "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, *, Tensor(a!) out) -> ()"
    ),
    "quantize_4bit": "(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype) -> Tensor"
    ),
    "dequantize_4bit.out": (
        "(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype, *, Tensor(a!) out) -> ()"
    ),
}

_lib = torch.library.Library(LIBRARY, "DEF")
for _name, _schema in _SCHEMAS.items():
    _lib.define(_name + _schema)

OP_NAMES = tuple(name for name in _SCHEMAS)


def implements(name: str, device_types):
    """Decorator: register ``fn`` as the kernel of ``kbit::<name>`` for ``device_types`` (None: every
    device) and return ``fn`` unchanged, so backends can also call their kernels directly."""

    def register(fn):
        torch.library.register_kernel(f"{LIBRARY}::{name}", device_types, fn)
        return fn

    return register


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def packed_4bit_shape(n: int, storage: torch.dtype) -> tuple[int, int]:
    """Shape of the packed 4-bit data of n values stored as ``storage``: bitsandbytes' ((n + 1) // 2 bytes, 1),
    viewed as ``storage``. Where the byte count is not a multiple of the storage item size (bitsandbytes
    then truncates data on CUDA and raises on CPU) we round up with zero padding, so no value is lost."""
    nbytes = (n + 1) // 2
    itemsize = torch.empty((), dtype=storage).element_size()
    return (-(-nbytes // itemsize), 1)


# ---- checks shared by every implementation of an op ---------------------------------------------
def check_quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    _checks.float_input(A)
    _checks.code_map(code, A.device)
    _checks.blocksize_8bit(blocksize)


def check_dequantize_blockwise(A, absmax, code, blocksize, dtype) -> None:
    _checks.codes_8bit(A)
    _checks.blocksize_8bit(blocksize)
    _checks.code_map(code, A.device)
    _checks.float_dtype(dtype)
    _checks.absmax_for(absmax, A.numel(), blocksize, A.device)


def check_quantize_4bit(A, blocksize, quant_type, quant_storage) -> None:
    _checks.float_input(A)
    _checks.blocksize_4bit(blocksize)
    _checks.quant_type(quant_type)
    _checks.quant_storage(quant_storage)


def check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) -> int:
    _checks.blocksize_4bit(blocksize)
    _checks.quant_type(quant_type)
    _checks.float_dtype(dtype)
    n = _checks.shape(shape)
    _checks.packed_4bit_for(A, n)
    _checks.absmax_for(absmax, n, blocksize, A.device)
    return n


def check_out(out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(shape)} on {device} "
            f"(got {out.dtype} of shape {tuple(out.shape)} on {out.device})"
        )


# ---- fake kernels: shapes and dtypes only ---------------------------------------------------------
@torch.library.register_fake(f"{LIBRARY}::quantize_blockwise")
def _(A, code, blocksize):
    check_quantize_blockwise(A, code, blocksize)
    return (
        torch.empty_like(A, dtype=torch.uint8, memory_format=torch.contiguous_format),
        A.new_empty((num_blocks(A.numel(), blocksize),), dtype=torch.float32),
    )


@torch.library.register_fake(f"{LIBRARY}::dequantize_blockwise")
def _(A, absmax, code, blocksize, dtype):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    return torch.empty_like(A, dtype=dtype, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{LIBRARY}::dequantize_blockwise.out")
def _(A, absmax, code, blocksize, dtype, *, out):
    check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    check_out(out, A.shape, dtype, A.device)


@torch.library.register_fake(f"{LIBRARY}::quantize_4bit")
def _(A, blocksize, quant_type, quant_storage):
    check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    n = A.numel()
    return (
        A.new_empty(packed_4bit_shape(n, quant_storage), dtype=quant_storage),
        A.new_empty((num_blocks(n, blocksize),), dtype=torch.float32),
    )


@torch.library.register_fake(f"{LIBRARY}::dequantize_4bit")
def _(A, absmax, blocksize, quant_type, shape, dtype):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    return A.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake(f"{LIBRARY}::dequantize_4bit.out")
def _(A, absmax, blocksize, quant_type, shape, dtype, *, out):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    check_out(out, shape, dtype, A.device)
