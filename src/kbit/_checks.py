"""Argument checks shared by the op layer (fake, reference and CPU kernels) and the functional API.

Every check raises a ValueError or TypeError that names the problem and the fix, before any kernel
reads or writes memory. The native layer re-checks the sizes it indexes with (csrc/bindings.cpp).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .formats import BLOCKSIZES_4BIT, CODE_SIZE_8BIT, QUANT_TYPES_4BIT

#: Largest block size accepted: the native layer counts in int64 (any size >= numel means one block).
MAX_BLOCKSIZE = 2**63 - 1

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STORAGE_DTYPES_4BIT = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)


def float_input(A: torch.Tensor, what: str = "A") -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} must be float32, float16 or bfloat16 (got {A.dtype}); convert it first, e.g. {what}.float()"
        )


def float_dtype(dtype: torch.dtype, what: str = "dtype") -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be torch.float32, torch.float16 or torch.bfloat16 (got {dtype})")


def blocksize_8bit(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if not 0 < blocksize <= MAX_BLOCKSIZE:
        raise ValueError(f"blocksize must be a positive int below 2**63 (got {blocksize}); bitsandbytes uses 64..4096")


def blocksize_4bit(blocksize: int) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"4-bit blocksize must be one of {', '.join(map(str, BLOCKSIZES_4BIT))} (got {blocksize})")


def quant_type(qt: str) -> None:
    if qt not in QUANT_TYPES_4BIT:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' (got {qt!r})")


def quant_storage(dtype: torch.dtype) -> None:
    if dtype not in STORAGE_DTYPES_4BIT:
        raise TypeError(
            f"quant_storage must be one of {', '.join(str(d) for d in STORAGE_DTYPES_4BIT)} (got {dtype})"
        )


def code_map(code: torch.Tensor, device: torch.device | None = None) -> None:
    if not isinstance(code, torch.Tensor):
        raise TypeError(f"code must be a torch.Tensor, got {type(code).__name__}")
    if code.dtype != torch.float32 or code.dim() != 1 or code.numel() != CODE_SIZE_8BIT:
        raise ValueError(
            f"code must be a 1-D float32 tensor of {CODE_SIZE_8BIT} values (got {code.dtype} of shape "
            f"{tuple(code.shape)}); build one with kbit.functional.create_dynamic_map()"
        )
    if device is not None and code.device != device:
        raise ValueError(f"code is on {code.device} but the data is on {device}; move it with code.to({str(device)!r})")


def code_map_values(code: torch.Tensor) -> None:
    """Value checks that read the map (kept apart from code_map so fake kernels never read data)."""
    if bool(torch.isnan(code).any()):
        raise ValueError("code must not contain NaN")
    if bool((code[1:] < code[:-1]).any()):
        raise ValueError("code must be sorted ascending (nearest-code search relies on it); sort it with code.sort().values")


def codes_8bit(A: torch.Tensor, what: str = "A") -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype != torch.uint8:
        raise TypeError(f"{what} must hold uint8 codes (got {A.dtype}); did you pass the float tensor instead of its codes?")


def absmax_for(absmax: torch.Tensor, n: int, blocksize: int, device: torch.device, what: str = "absmax") -> None:
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(absmax).__name__}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"{what} must be float32 (got {absmax.dtype})")
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"{what} has {absmax.numel()} values but {n} elements in blocks of {blocksize} need {blocks}; "
            "the statistics do not belong to this data (check blocksize and shape)"
        )
    if absmax.device != device:
        raise ValueError(f"{what} is on {absmax.device} but the data is on {device}")


def out_tensor(out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(shape)} on {device} "
            f"(got {out.dtype} of shape {tuple(out.shape)} on {out.device})"
        )


def same_device(t: torch.Tensor, device: torch.device, what: str) -> None:
    """Mixed devices would dispatch to one device's kernel (a meta tensor among CPU ones: the shape-only fake
    kernel, which computes nothing), so they are rejected."""
    if t.device != device:
        raise ValueError(f"{what} is on {t.device} but the data is on {device}; move it with .to({str(device)!r})")


def packed_4bit_for(A: torch.Tensor, n: int) -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"A must be a torch.Tensor, got {type(A).__name__}")
    quant_storage(A.dtype)
    nbytes = A.numel() * A.element_size()
    need = (n + 1) // 2
    if nbytes < need:
        raise ValueError(
            f"packed 4-bit data holds {nbytes} bytes but shape with {n} elements needs {need}; "
            "the data does not match quant_state.shape"
        )


def shape(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"shape must be a sequence of non-negative ints (got {tuple(shape)})")
        n *= s
    return n


def indices(idx: torch.Tensor) -> None:
    """Embedding lookups: integer indices (out-of-range ones raise torch's IndexError, as nn.Embedding)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"embedding indices must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"embedding indices must be int64 or int32 (got {idx.dtype}); convert them with .long()")
