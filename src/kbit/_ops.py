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

import torch

from . import _checks
from .formats import NESTED_BLOCKSIZE_4BIT as NESTED_BLOCKSIZE

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
    # y = A @ dequantize(B).T (+ bias), B the packed [N, K] weight; with absmax_8bit the scales are double-
    # quantized: absmax_8bit codes of absmax_code with `absmax` the nested scales (blocks of 256), plus the
    # 0-dim absmax_offset. bitsandbytes' schema.
    "gemm_4bit": (
        "(Tensor A, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, Tensor? bias=None, "
        "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor"
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


check_out = _checks.out_tensor


def check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset) -> None:
    _checks.float_input(A, "A")
    if len(shapeB) != 2:
        raise ValueError(f"shapeB must be [N, K] (out_features, in_features), got {list(shapeB)}")
    _checks.shape(shapeB)
    N, K = shapeB
    if A.dim() == 0 or A.shape[-1] != K:
        raise ValueError(
            f"input has {A.shape[-1] if A.dim() else 0} features but the 4-bit weight expects {K} (weight shape {[N, K]})"
        )
    _checks.blocksize_4bit(blocksize)
    _checks.quant_type(quant_type)
    _checks.packed_4bit_for(B, N * K)
    _checks.same_device(B, A.device, "the packed weight B")
    blocks = num_blocks(N * K, blocksize)
    if absmax_8bit is not None:
        if absmax_code is None or absmax_offset is None:
            raise ValueError("double-quantized scales need absmax_8bit, absmax_code and absmax_offset together")
        _checks.codes_8bit(absmax_8bit, "absmax_8bit")
        _checks.same_device(absmax_8bit, A.device, "absmax_8bit")
        if absmax_8bit.numel() != blocks:
            raise ValueError(f"absmax_8bit has {absmax_8bit.numel()} codes, the weight has {blocks} blocks")
        _checks.code_map(absmax_code, A.device)
        _checks.absmax_for(absmax, blocks, NESTED_BLOCKSIZE, A.device, "nested absmax")
        if not isinstance(absmax_offset, torch.Tensor) or absmax_offset.numel() != 1 or absmax_offset.dtype != torch.float32:
            raise ValueError("absmax_offset must be a float32 scalar tensor")
        _checks.same_device(absmax_offset, A.device, "absmax_offset")
    else:
        _checks.absmax_for(absmax, N * K, blocksize, A.device)
    if bias is not None:
        if bias.dim() != 1 or bias.numel() != N:
            raise ValueError(f"bias must have {N} values (out_features), got shape {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a float tensor (got {bias.dtype}); convert it with bias.float()")
        _checks.same_device(bias, A.device, "bias")


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


@torch.library.register_fake(f"{LIBRARY}::gemm_4bit")
def _(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None):
    check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    return A.new_empty((*A.shape[:-1], shapeB[0]))


@torch.library.register_fake(f"{LIBRARY}::dequantize_4bit.out")
def _(A, absmax, blocksize, quant_type, shape, dtype, *, out):
    check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    check_out(out, shape, dtype, A.device)
