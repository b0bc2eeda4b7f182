"""CPU kernels: thin calls into the native module (kbit._C), registered for the "cpu" device.

Inputs are made contiguous here and outputs allocated here, so the native layer only ever sees
contiguous arrays of the right dtype (it rejects anything else: Note [no silent copies] in
csrc/bindings.cpp). Tensors are detached because DLPack refuses tensors that require grad.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from .. import _ops
from .._native import _C
from .._ops import LIBRARY, num_blocks, packed_4bit_shape


def _flat(t: torch.Tensor):
    """A DLPack capsule of an input made contiguous (the kernels use the element count only). A capsule, not
    the tensor: nanobind would call the tensor's Python-level ``__dlpack__``, ten times slower."""
    return to_dlpack(t.detach().contiguous())


def _out(t: torch.Tensor):
    """A DLPack capsule of an output, which must already be contiguous: a contiguous copy would take the
    kernel's writes and leave ``t`` unchanged (Note [no silent copies] in csrc/bindings.cpp)."""
    if not t.is_contiguous():
        raise AssertionError("kbit internal error: native output tensor is not contiguous")
    return to_dlpack(t.detach())


@_ops.implements("quantize_blockwise", "cpu")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    _ops.check_quantize_blockwise(A, code, blocksize)
    out = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty(num_blocks(A.numel(), blocksize), dtype=torch.float32)
    _C.quantize_blockwise(_flat(A), _flat(code), _out(absmax), _out(out), blocksize, torch.get_num_threads())
    return out, absmax


def _dequantize_blockwise_into(A, absmax, code, blocksize, out: torch.Tensor) -> None:
    _C.dequantize_blockwise(_flat(A), _flat(absmax), _flat(code), _out(out), blocksize, torch.get_num_threads())


@_ops.implements("dequantize_blockwise", "cpu")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    _ops.check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    out = torch.empty(A.shape, dtype=dtype)
    _dequantize_blockwise_into(A, absmax, code, blocksize, out)
    return out


@_ops.implements("dequantize_blockwise.out", "cpu")
def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, *, out):
    _ops.check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    _ops.check_out(out, A.shape, dtype, A.device)
    if out.is_contiguous():
        _dequantize_blockwise_into(A, absmax, code, blocksize, out.detach())
    else:
        out.copy_(dequantize_blockwise(A, absmax, code, blocksize, dtype))


@_ops.implements("quantize_4bit", "cpu")
def quantize_4bit(A, blocksize, quant_type, quant_storage):
    _ops.check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    n = A.numel()
    # empty, not zeros: the kernel writes every byte of the (n + 1) // 2, and first touch by the kernel's
    # own threads is cheaper than a separate zeroing pass. Only storage padding beyond them is zeroed.
    packed = torch.empty(packed_4bit_shape(n, quant_storage), dtype=quant_storage)
    raw = packed.view(-1).view(torch.uint8)
    raw[(n + 1) // 2 :].zero_()
    absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32)
    _C.quantize_4bit(_flat(A), _out(absmax), _out(raw), blocksize, quant_type, torch.get_num_threads())
    return packed, absmax


def _dequantize_4bit_into(A, absmax, blocksize, quant_type, out: torch.Tensor) -> None:
    packed = A.detach().contiguous().view(-1).view(torch.uint8)
    _C.dequantize_4bit(_flat(packed), _flat(absmax), _out(out), blocksize, quant_type, torch.get_num_threads())


@_ops.implements("dequantize_4bit", "cpu")
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    _ops.check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    out = torch.empty(tuple(shape), dtype=dtype)
    _dequantize_4bit_into(A, absmax, blocksize, quant_type, out)
    return out


@_ops.implements("dequantize_4bit.out", "cpu")
def dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, *, out):
    _ops.check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    _ops.check_out(out, shape, dtype, A.device)
    if out.is_contiguous():
        _dequantize_4bit_into(A, absmax, blocksize, quant_type, out.detach())
    else:
        out.copy_(dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))
