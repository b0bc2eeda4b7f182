"""The fused 4-bit gemv on CPU (csrc/cpu/gemv4-inl.h) and the small-batch fast path that calls it.

``kbit::gemm_4bit`` reaches the kernel through the dispatcher, the op's checks and a DLPack conversion of
every scale tensor: about 40 us around a 4096x4096 kernel of about 400 us. For inference on CPU (no
gradient to compute, not under ``torch.compile``, at most ``GEMV_MAX_ROWS`` input rows), ``Linear4bit``
and ``matmul_4bit`` instead call a native ``Gemv4bitWeight`` prepared once per weight: the weight's
tensors are checked and converted when it is prepared, and a call converts only the input and output.
The result is the op's, bit for bit (the same kernel, and the bias added the same way).

A prepared weight is cached per QuantState (by a weak reference, so it dies with the state) under a key of everything
it was built from — the tensors' data pointers, the shape, block size and type — so replacing any of them
prepares a new one. The kernel reads the tensors' memory at every call, so in-place updates are seen.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.utils.dlpack import to_dlpack as _dl

from .._native import _C
from .._ops import NESTED_BLOCKSIZE
from ..quant_state import QuantState

#: Input rows up to which the fused gemv is used (it handles at most 8; past 4 the tiled GEMM wins here).
GEMV_MAX_ROWS = 4

_EMPTY = torch.empty(0)
# id(QuantState) -> (weak reference to it, key, prepared weight); QuantState defines __eq__, so it is not
# hashable and a WeakKeyDictionary cannot hold it. The weak reference's callback drops the entry.
_prepared: dict = {}


def _c(t: torch.Tensor):
    """DLPack capsule of a contiguous tensor (nanobind's own __dlpack__ call costs ~2 us per tensor)."""
    return _dl(t.detach().contiguous())


def prepare(packed_u8: torch.Tensor, shape, blocksize: int, quant_type: str, absmax: torch.Tensor,
            absmax_8bit: Optional[torch.Tensor] = None, absmax_code: Optional[torch.Tensor] = None,
            absmax_offset: Optional[torch.Tensor] = None):
    """A native Gemv4bitWeight for W = ``shape`` [N, K] packed in ``packed_u8`` (flat uint8); ``absmax`` is
    float32 per block, or with ``absmax_8bit`` the nested float32 scales of double quantization."""
    N, K = shape
    if absmax_8bit is not None:
        return _C.Gemv4bitWeight(_c(packed_u8), _c(_EMPTY), _c(absmax_8bit), _c(absmax_code), _c(absmax),
                                 NESTED_BLOCKSIZE, _c(absmax_offset), N, K, blocksize, quant_type)
    return _C.Gemv4bitWeight(_c(packed_u8), _c(absmax), _c(_EMPTY), _c(_EMPTY), _c(_EMPTY), NESTED_BLOCKSIZE,
                             _c(_EMPTY), N, K, blocksize, quant_type)


def run(weight, A2: torch.Tensor, N: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``A2 @ W.T (+ bias)`` for a contiguous [M, K] input, M <= GEMV_MAX_ROWS, in A2's dtype."""
    out = torch.empty((A2.shape[0], N), dtype=A2.dtype)
    weight.run(_dl(A2), _dl(out), torch.get_num_threads())
    if bias is not None:
        out += bias if bias.dtype == out.dtype else bias.to(out.dtype)
    return out


def _key(B: torch.Tensor, qs) -> tuple:
    s2 = qs.state2 if qs.nested else None
    nested = None if s2 is None else (s2.absmax.data_ptr(), s2.code.data_ptr(), s2.blocksize, qs.offset.data_ptr())
    return (B.data_ptr(), B.dtype, B.numel(), qs.absmax.data_ptr(), qs.absmax.dtype, tuple(qs.shape), qs.blocksize,
            qs.quant_type, nested)


def _prepared_for(B: torch.Tensor, qs):
    """The cached Gemv4bitWeight of (B, qs), prepared (after the op's own checks) on first use; None when the
    state's scales are not in a form the kernel takes directly (nested blocks other than 256)."""
    try:
        key = _key(B, qs)
    except (AttributeError, TypeError):
        return None  # a malformed state: the op's checks name what is wrong
    hit = _prepared.get(id(qs))
    if hit is not None and hit[0]() is qs and hit[1] == key:
        return hit[2]
    from .. import _ops
    from ..matmul import _check_state, _scale_args

    _check_state(qs)
    if qs.nested and qs.state2.blocksize != NESTED_BLOCKSIZE:
        return None
    scales = _scale_args(qs)
    # The prepared weight must read these tensors' own memory (a contiguous copy would miss later in-place
    # updates), so anything non-contiguous takes the op, which copies per call.
    if not B.is_contiguous() or not all(t.is_contiguous() for t in scales.values()):
        return None
    N, K = qs.shape
    probe = torch.empty((1, K))  # the op's checks, with a stand-in input
    _ops.check_gemm_4bit(probe, B, [N, K], scales["absmax"], qs.blocksize, qs.quant_type, None,
                         scales.get("absmax_8bit"), scales.get("absmax_code"), scales.get("absmax_offset"))
    weight = prepare(B.detach().contiguous().view(-1).view(torch.uint8), (N, K), qs.blocksize, qs.quant_type, **scales)
    ident = id(qs)
    _prepared[ident] = (weakref.ref(qs, lambda _, ident=ident: _prepared.pop(ident, None)), key, weight)
    return weight


def try_linear(A: torch.Tensor, B: torch.Tensor, qs, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``A @ W.T (+ bias)`` through the fast path, or None where it does not apply (the caller then takes the
    op, which also raises the errors for bad input)."""
    if (type(A) is not torch.Tensor or A.device.type != "cpu" or B.device.type != "cpu" or A.dim() == 0
            or A.dtype not in (torch.float32, torch.bfloat16, torch.float16)):
        return None
    if torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if torch.compiler.is_compiling() or not isinstance(qs, QuantState) or qs.shape is None or len(qs.shape) != 2:
        return None
    N, K = qs.shape
    if A.shape[-1] != K or (bias is not None and (bias.device.type != "cpu" or bias.shape != (N,)
                                                  or not bias.is_floating_point())):
        return None
    rows = A.numel() // K if K else 0
    if rows < 1 or rows > GEMV_MAX_ROWS:
        return None
    weight = _prepared_for(B, qs)
    if weight is None:
        return None
    return run(weight, A.detach().reshape(rows, K).contiguous(), N, bias).reshape(*A.shape[:-1], N)
