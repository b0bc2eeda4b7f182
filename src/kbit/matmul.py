"""Matrix products with 4-bit weights: ``matmul_4bit`` (autograd) and ``gemv_4bit`` (bitsandbytes' names).

The weight convention is nn.Linear's: the packed weight B holds W of shape ``quant_state.shape == [N, K]``
(out_features, in_features), and ``matmul_4bit(A, B, qs)`` computes ``A @ W.T`` in A's dtype. Gradients
flow to A and the bias, never to the frozen 4-bit weight (QLoRA).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks
from .backends import cpu_gemv
from .formats import NESTED_BLOCKSIZE_4BIT
from .functional import QuantState, dequantize_4bit, dequantize_blockwise
from .quant_state import check_4bit_state

__all__ = ["matmul_4bit", "gemv_4bit", "MatMul4Bit"]


def _scale_args(quant_state: QuantState) -> dict:
    """The gemm_4bit op's scale arguments for a state (double-quantized scales are passed as such when their
    nested block size is the standard 256, else decoded here)."""
    if not quant_state.nested:
        return dict(absmax=quant_state.absmax)
    if quant_state.state2.blocksize == NESTED_BLOCKSIZE_4BIT:
        return dict(absmax=quant_state.state2.absmax, absmax_8bit=quant_state.absmax,
                    absmax_code=quant_state.state2.code, absmax_offset=quant_state.offset)
    absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    return dict(absmax=absmax.float())


def _check_state(quant_state) -> None:
    if quant_state is None:
        raise ValueError("quant_state is required: it comes from quantize_4bit() or the Params4bit weight")
    check_4bit_state(quant_state)
    if len(quant_state.shape) != 2:
        raise ValueError(f"matmul_4bit: quant_state.shape must be 2-D [N, K], got {quant_state.shape}")


def _gemm(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.kbit.gemm_4bit(A, B, list(quant_state.shape), blocksize=quant_state.blocksize,
                                    quant_type=quant_state.quant_type, bias=bias, **_scale_args(quant_state))


class MatMul4Bit(torch.autograd.Function):
    """``A @ W.T + bias`` with W in 4 bits: gradients for A and bias; W is frozen (None gradient)."""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, quant_state=None):
        ctx.quant_state = quant_state
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(B)
        result = _gemm(A, B, quant_state, bias)
        if out is not None:
            out.copy_(result)
            return out
        return result

    @staticmethod
    def backward(ctx, grad_output):
        (B,) = ctx.saved_tensors
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            W = dequantize_4bit(B, ctx.quant_state).to(grad_output.dtype)
            grad_A = grad_output @ W
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_A, None, None, grad_bias, None


def matmul_4bit(A: torch.Tensor, B: torch.Tensor, quant_state: QuantState, out: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``A @ W.T (+ bias)`` for a 4-bit weight (packed ``B``, its ``quant_state``), output in A's dtype.

    Any leading shape of A works; the inner dimension must equal the weight's in_features. Without a
    gradient to compute this calls the ``kbit::gemm_4bit`` op directly (fused kernel for a few rows, tiled
    dequantization + GEMM for many), or for a few rows on CPU the same fused kernel through a weight
    prepared once (kbit/backends/cpu_gemv.py: same bits, ~40 us less per call); otherwise it goes through
    :class:`MatMul4Bit`.
    """
    if out is None and isinstance(A, torch.Tensor) and A.device.type == "cpu":
        result = cpu_gemv.try_linear(A, B, quant_state, bias)  # small CPU batches without the dispatcher
        if result is not None:
            return result
    _check_state(quant_state)
    _checks.float_input(A, "A")
    if A.dim() == 0 or A.shape[-1] != quant_state.shape[1]:
        raise ValueError(
            f"matmul_4bit: input has {A.shape[-1] if A.dim() else 0} features (shape {tuple(A.shape)}), the weight "
            f"expects {quant_state.shape[1]} (weight shape {list(quant_state.shape)})"
        )
    if out is not None:  # checked before computing, so a bad `out` fails fast and is left untouched
        _checks.out_tensor(out, (*A.shape[:-1], quant_state.shape[0]), A.dtype, A.device)
    needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return MatMul4Bit.apply(A, B, out, bias, quant_state)
    result = _gemm(A, B, quant_state, bias)
    if out is not None:
        out.copy_(result)
        return out
    return result


def gemv_4bit(A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None, transposed_A: bool = False,
              transposed_B: bool = False, state: Optional[QuantState] = None) -> torch.Tensor:
    """bitsandbytes' ``F.gemv_4bit``: ``A @ W.T`` for a 4-bit weight, without bias or autograd.
    ``transposed_A`` / ``transposed_B`` are not supported (bitsandbytes ignores them) and must be False."""
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    if transposed_A or transposed_B:
        raise ValueError("gemv_4bit: transposed_A / transposed_B are not supported; transpose the inputs instead")
    with torch.no_grad():
        return matmul_4bit(A, B, state, out=out)
