"""Pure-PyTorch kernels: the specification of every kbit op, registered for all devices.

Written for clarity over speed; the native CPU kernels (backends/cpu.py) must equal these bit for bit
(codes, absmax, and every output element). See Note [op semantics] in kbit/_ops.py and the notes in
csrc/formats.h for the rules written out.
"""

from __future__ import annotations

import torch

from .. import _checks, _ops
from .._ops import LIBRARY, num_blocks, packed_4bit_shape
from ..formats import FP4_MAGNITUDE_CODE, FP4_SIGN_BIT, FP4_THRESHOLDS, HIGH_NIBBLE_SHIFT, get_4bit_type

# Registered for every device type: a device-specific kernel (backends/cpu.py) takes precedence.
_ALL_DEVICES = None


def _blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """A flattened to float32 and zero-padded to whole blocks, as a (blocks, blocksize) view. A block larger
    than the tensor is the tensor (padding it would allocate the whole block size)."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    blocksize = min(blocksize, max(n, 1))
    pad = num_blocks(n, blocksize) * blocksize - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize), n


def absmax_and_scaled(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Note [scaling rule] (csrc/cpu/scalar_ops.h): per-block max |x| (NaN if the block has one), values
    times the float32 reciprocal, clamped to [-1, 1]; an all-zero block scales to zeros."""
    blocks, n = _blocks(A, blocksize)
    absmax = blocks.abs().amax(dim=1) if blocks.numel() else blocks.new_zeros(blocks.shape[0])
    has_nan = torch.isnan(blocks).any(dim=1)
    absmax = torch.where(has_nan, torch.full_like(absmax, float("nan")), absmax)
    inv = torch.where(absmax == 0, torch.zeros_like(absmax), 1.0 / absmax)
    # A subnormal absmax has no finite reciprocal: block_reciprocal() in csrc/cpu/scalar_ops.h uses FLT_MAX.
    inv = torch.where(torch.isinf(inv), torch.full_like(inv, torch.finfo(torch.float32).max), inv)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    return absmax, scaled.reshape(-1)[:n], n


def count_below(sorted_values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Number of entries strictly below each s (NaN: 0) — the exact nearest-code rule."""
    idx = torch.searchsorted(sorted_values.contiguous(), s.contiguous(), right=False)
    return torch.where(torch.isnan(s), torch.zeros_like(idx), idx)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


@_ops.implements("quantize_blockwise", _ALL_DEVICES)
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    _ops.check_quantize_blockwise(A, code, blocksize)
    _checks.code_map_values(code)
    absmax, scaled, _ = absmax_and_scaled(A, blocksize)
    codes = count_below(midpoints(code), scaled).to(torch.uint8)
    return codes.reshape(A.shape), absmax


def block_scale(absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """absmax[k // blocksize] for k < n (gathered: block sizes may exceed n by far)."""
    return absmax[torch.div(torch.arange(n, device=absmax.device), blocksize, rounding_mode="floor")]


def _dequantize_blockwise(A, absmax, code, blocksize, dtype) -> torch.Tensor:
    n = A.numel()
    values = code[A.reshape(-1).long()]
    return (values * block_scale(absmax, n, blocksize)).to(dtype).reshape(A.shape)


@_ops.implements("dequantize_blockwise", _ALL_DEVICES)
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    _ops.check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    return _dequantize_blockwise(A, absmax, code, blocksize, dtype)


@_ops.implements("dequantize_blockwise.out", _ALL_DEVICES)
def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, *, out):
    _ops.check_dequantize_blockwise(A, absmax, code, blocksize, dtype)
    _ops.check_out(out, A.shape, dtype, A.device)
    out.copy_(_dequantize_blockwise(A, absmax, code, blocksize, dtype))


def codes_4bit(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes of scaled values: Note [NF4 decision rule] / Note [FP4 decision rule] (csrc/formats.h)."""
    if quant_type == "nf4":
        return count_below(midpoints(get_4bit_type("nf4", scaled.device)), scaled)
    thresholds = torch.tensor(FP4_THRESHOLDS, dtype=torch.float32, device=scaled.device)
    rank = count_below(thresholds, scaled.abs())
    magnitude = torch.tensor(FP4_MAGNITUDE_CODE, dtype=torch.int64, device=scaled.device)[rank]
    return magnitude + torch.where(scaled < 0, FP4_SIGN_BIT, 0)


@_ops.implements("quantize_4bit", _ALL_DEVICES)
def quantize_4bit(A, blocksize, quant_type, quant_storage):
    _ops.check_quantize_4bit(A, blocksize, quant_type, quant_storage)
    absmax, scaled, n = absmax_and_scaled(A, blocksize)
    codes = codes_4bit(scaled, quant_type)
    if n % 2:  # Note [nibble order]: an odd count pads the last low nibble with the code of 0.0
        codes = torch.cat([codes, codes_4bit(scaled.new_zeros(1), quant_type)])
    pairs = codes.view(-1, 2)
    packed = ((pairs[:, 0] << HIGH_NIBBLE_SHIFT) | pairs[:, 1]).to(torch.uint8)
    rows, _ = packed_4bit_shape(n, quant_storage)
    nbytes = rows * torch.empty((), dtype=quant_storage).element_size()
    if nbytes > packed.numel():
        packed = torch.cat([packed, packed.new_zeros(nbytes - packed.numel())])
    return packed.view(quant_storage).reshape(rows, 1), absmax


def _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype) -> torch.Tensor:
    n = _checks.shape(shape)
    data = A.reshape(-1).view(torch.uint8)[: (n + 1) // 2].long()
    codes = torch.stack([data >> HIGH_NIBBLE_SHIFT, data & 0x0F], dim=1).reshape(-1)[:n]
    values = get_4bit_type(quant_type, A.device)[codes]
    return (values * block_scale(absmax, n, blocksize)).to(dtype).reshape(tuple(shape))


@_ops.implements("dequantize_4bit", _ALL_DEVICES)
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    _ops.check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    return _dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)


@_ops.implements("dequantize_4bit.out", _ALL_DEVICES)
def dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, *, out):
    _ops.check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype)
    _ops.check_out(out, shape, dtype, A.device)
    out.copy_(_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))


def scales_4bit(absmax, absmax_8bit, absmax_code, absmax_offset) -> torch.Tensor:
    """float32 per-block scales of a 4-bit weight, undoing double quantization (blocks of 256)."""
    if absmax_8bit is None:
        return absmax
    return _dequantize_blockwise(absmax_8bit, absmax, absmax_code, _ops.NESTED_BLOCKSIZE, torch.float32) + absmax_offset


@_ops.implements("gemm_4bit", _ALL_DEVICES)
def gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
              absmax_offset=None):
    """F.linear(A, dequantize_4bit(B) in A's dtype, bias): the weight is rounded once, from float32."""
    _ops.check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    scales = scales_4bit(absmax, absmax_8bit, absmax_code, absmax_offset)
    W = _dequantize_4bit(B, scales, blocksize, quant_type, list(shapeB), A.dtype)
    return torch.nn.functional.linear(A, W, bias)
