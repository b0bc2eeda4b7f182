"""kbit.functional: blockwise 8-bit and 4-bit (NF4/FP4) quantization with bitsandbytes' names and signatures.

Semantics are bitsandbytes' *reference* semantics (its CUDA kernels and pure-PyTorch backend), with
its CPU-specific deviations fixed:

- 8-bit codes are the exact nearest entry of the code map (bitsandbytes' CPU kernel uses an
  approximate lookup table and is occasionally off by one code).
- NF4 bytes equal bitsandbytes'; FP4 follows its CUDA rule (its CPU path differs for tiny values).
- Every shape dequantizes correctly and output shapes are exactly the input's: no transposition for
  ``shape[0] == 1`` and no (1, n) result for 1-D tensors.
- ``out=`` works on every device (bitsandbytes raises NotImplementedError on CPU).
- A packed 4-bit tensor whose byte count is not a multiple of ``quant_storage``'s item size is padded
  instead of truncated (bitsandbytes loses data on CUDA and raises on CPU).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _ops  # noqa: F401  (_ops registers the op schemas)
from . import backends  # noqa: F401  (registers the kernels)
from .formats import (
    NESTED_BLOCKSIZE_4BIT,
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    get_4bit_type,
)
from .quant_state import QuantState, check_4bit_state, pack_dict_to_tensor, unpack_tensor_to_dict

__all__ = [
    "QuantState",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "get_4bit_type",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
    "dequantize_fp4",
    "dequantize_nf4",
    "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
    "name2qmap",
]

DEFAULT_BLOCKSIZE_4BIT = 64
DEFAULT_BLOCKSIZE_8BIT = 4096

#: Code maps by name ("dynamic": the signed dynamic map, the default of the 8-bit functions). Built at
#: import (about a millisecond) rather than lazily, so torch.compile never traces the map's construction.
name2qmap: dict[str, torch.Tensor] = {"dynamic": create_dynamic_map()}


def _nested_offset(absmax: torch.Tensor) -> torch.Tensor:
    """Double quantization subtracts the mean absmax; an empty tensor has no blocks, so its offset is 0 (the
    mean of nothing is NaN, which loaders rightly reject)."""
    return absmax.mean() if absmax.numel() else absmax.new_zeros(())


def _dynamic_map(device: torch.device) -> torch.Tensor:
    code = name2qmap["dynamic"]
    return code if code.device == device else code.to(device)


def _copy_into(dst: torch.Tensor, src: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(dst, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(dst).__name__}")
    if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
        raise ValueError(
            f"{what} must be a {src.dtype} tensor of shape {tuple(src.shape)} on {src.device} "
            f"(got {dst.dtype} of shape {tuple(dst.shape)} on {dst.device})"
        )
    return dst.copy_(src)


# ---- 8-bit blockwise ------------------------------------------------------------------------------
def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = DEFAULT_BLOCKSIZE_8BIT,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 8-bit codes of ``code`` (default: the signed dynamic map), one absmax per block of
    ``blocksize`` consecutive elements of the flattened tensor.

    Args:
        A: float32, float16 or bfloat16 tensor of any shape.
        code: sorted float32 map of 256 values in [-1, 1].
        absmax, out: optional tensors to write the statistics / codes into.
        blocksize: any positive int (bitsandbytes' CUDA kernels need 64..4096, powers of two).
        nested: also quantize the absmax (minus its mean) with 8-bit blocks of the same size.

    Returns:
        ``(codes, quant_state)``: uint8 codes of A's shape, and the state ``dequantize_blockwise`` needs.
    """
    _checks.float_input(A)
    _checks.blocksize_8bit(blocksize)
    code = _dynamic_map(A.device) if code is None else code
    codes, _absmax = torch.ops.kbit.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = _nested_offset(_absmax)
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=blocksize, nested=False)
        state = QuantState(absmax=qabsmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype, offset=offset,
                           state2=state2)
    else:
        state = QuantState(absmax=_absmax, code=code.clone(), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        codes = _copy_into(out, codes, "out")
    if absmax is not None:
        state.absmax = _copy_into(absmax, state.absmax, "absmax")
    return codes, state


def _absmax_of(quant_state: QuantState) -> torch.Tensor:
    """The float32 per-block absmax of a state, undoing double quantization."""
    if quant_state.nested:
        absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
        return (absmax + quant_state.offset).float()
    return quant_state.absmax


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = DEFAULT_BLOCKSIZE_8BIT,
    nested: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[A[k]] * absmax[k // blocksize]`` in float32, returned in
    the state's dtype (float32 when only ``absmax`` is given) and A's shape.

    Whether the absmax is itself quantized (double quantization) is read from ``quant_state``;
    ``nested`` exists for bitsandbytes' signature and must agree with it (bitsandbytes ignores it)."""
    _checks.codes_8bit(A)
    if nested and (quant_state is None or not quant_state.nested):
        raise ValueError("nested=True needs the quant_state of a nested quantize_blockwise(..., nested=True); a plain "
                         "absmax is not double-quantized (leave nested=False)")
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise requires either quant_state or absmax")
        quant_state = QuantState(absmax=absmax, code=_dynamic_map(A.device) if code is None else code,
                                 blocksize=blocksize, dtype=torch.float32)
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a kbit.functional.QuantState, got {type(quant_state).__name__}")
    _checks.blocksize_8bit(quant_state.blocksize)
    scale = _absmax_of(quant_state)
    dtype = quant_state.dtype if quant_state.dtype is not None else torch.float32
    if out is not None:
        torch.ops.kbit.dequantize_blockwise.out(A, scale, quant_state.code, quant_state.blocksize, dtype, out=out)
        return out
    return torch.ops.kbit.dequantize_blockwise(A, scale, quant_state.code, quant_state.blocksize, dtype)


# ---- 4-bit NF4 / FP4 ------------------------------------------------------------------------------
def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 4-bit NF4 or FP4 codes, two per byte (Note [nibble order] in csrc/formats.h).

    Args:
        A: float32, float16 or bfloat16 tensor of any shape (odd sizes and empty tensors included).
        blocksize: 32, 64 (default), 128, ..., 4096.
        compress_statistics: double quantization — the absmax minus its mean is itself quantized to 8 bits
            with blocks of 256 (saves ~0.37 bits per parameter at blocksize 64).
        quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
        quant_storage: dtype the packed bytes are viewed as (uint8, or bf16/fp16/fp32 for FSDP).

    Returns:
        ``(packed, quant_state)`` with ``packed`` of shape ``((n + 1) // 2 // itemsize, 1)``.
    """
    _checks.float_input(A)
    blocksize = DEFAULT_BLOCKSIZE_4BIT if blocksize is None else blocksize
    _checks.blocksize_4bit(blocksize)
    _checks.quant_type(quant_type)
    _checks.quant_storage(quant_storage)
    packed, _absmax = torch.ops.kbit.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        offset = _nested_offset(_absmax)
        qabsmax, state2 = quantize_blockwise(_absmax - offset, blocksize=NESTED_BLOCKSIZE_4BIT)
        state = QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type)
    if out is not None:
        packed = _copy_into(out, packed, "out")
    if absmax is not None:
        state.absmax = _copy_into(absmax, state.absmax, "absmax")
    return packed, state


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`; returns a tensor of ``quant_state.shape`` and ``quant_state.dtype``.

    Without ``quant_state``, ``absmax`` and ``out`` are both required (``out`` gives shape and dtype).
    """
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit requires both absmax and out when quant_state is not provided")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=DEFAULT_BLOCKSIZE_4BIT if blocksize is None else blocksize,
                                 quant_type=quant_type)
    check_4bit_state(quant_state)
    _checks.float_dtype(quant_state.dtype, "quant_state.dtype")
    scale = _absmax_of(quant_state)
    args = (A, scale, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), quant_state.dtype)
    if out is not None:
        torch.ops.kbit.dequantize_4bit.out(*args, out=out)
        return out
    return torch.ops.kbit.dequantize_4bit(*args)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="fp4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type="nf4"``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type="fp4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type="nf4"``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def __getattr__(name):
    # gemv_4bit lives with the matmul code (kbit/matmul.py), which imports this module.
    if name == "gemv_4bit":
        from .matmul import gemv_4bit

        return gemv_4bit
    raise AttributeError(f"module 'kbit.functional' has no attribute {name!r}")
