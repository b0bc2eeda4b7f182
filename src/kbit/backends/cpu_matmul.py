"""CPU kernel of ``kbit::gemm_4bit``: y = A @ dequantize(B)^T (+ bias) for a 4-bit weight B [N, K].

- Up to GEMV_MAX_ROWS input rows: the fused native kernel (csrc/cpu/gemv4-inl.h) reads each packed
  nibble once and never materializes the weight — the memory-bound case, where 4-bit moves ~4x fewer
  bytes than bf16.
- More rows: the weight is dequantized in row tiles (each fits in L2) straight into A's dtype, and each
  tile goes through torch's GEMM (AMX / oneDNN on recent CPUs): the compute-bound case, where no hand
  kernel beats the vendor GEMM and dequantization only has to stay cheap.
"""

from __future__ import annotations

import math

import torch

from .. import _ops
from .._native import _C
from .._ops import NESTED_BLOCKSIZE, implements
from . import reference

#: Input rows up to which the fused gemv is used (it handles at most 8; past 4 the tiled GEMM wins here).
GEMV_MAX_ROWS = 4
#: Bytes of dequantized weight per tile: small enough to stay in L2 between dequantization and GEMM.
TILE_BYTES = 1 << 20

_EMPTY = torch.empty(0)


def _flat_u8(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _tile_rows(N: int, K: int, blocksize: int, itemsize: int) -> int:
    """Rows per tile: a multiple of the rows after which blocks and bytes realign (so a tile starts at a
    block boundary on a whole byte), about TILE_BYTES of dequantized weight."""
    step = blocksize // math.gcd(K, blocksize)
    step = step if (step * K) % 2 == 0 else 2 * step
    rows = max(step, (TILE_BYTES // max(K * itemsize, 1)) // step * step)
    return min(rows, N) if N >= step else N


@implements("gemm_4bit", "cpu")
def gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
              absmax_offset=None):
    _ops.check_gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset)
    N, K = shapeB
    lead = A.shape[:-1]
    A2 = A.detach().reshape(-1, K).contiguous()
    M = A2.shape[0]
    packed = _flat_u8(B)
    threads = torch.get_num_threads()
    if M == 0 or N == 0:
        out = A.new_zeros((M, N))
    elif M <= GEMV_MAX_ROWS:
        out = torch.empty((M, N), dtype=A.dtype)
        if absmax_8bit is not None:
            _C.gemv_4bit(A2, packed, _EMPTY, absmax_8bit.detach().contiguous(), absmax_code.detach().contiguous(),
                         absmax.detach().contiguous(), NESTED_BLOCKSIZE, float(absmax_offset), N, K, blocksize,
                         quant_type, out, threads)
        else:
            _C.gemv_4bit(A2, packed, absmax.detach().contiguous(), _EMPTY, _EMPTY, _EMPTY, NESTED_BLOCKSIZE, 0.0, N, K,
                         blocksize, quant_type, out, threads)
    else:
        scales = reference.scales_4bit(absmax, absmax_8bit, absmax_code, absmax_offset).detach().contiguous()
        out = torch.empty((M, N), dtype=A.dtype)
        rows = _tile_rows(N, K, blocksize, A.element_size())
        tile = torch.empty((rows, K), dtype=A.dtype)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = tile[: n1 - n0]
            f0, f1 = n0 * K, n1 * K
            _C.dequantize_4bit(packed[f0 // 2 : (f1 + 1) // 2], scales[f0 // blocksize : -(-f1 // blocksize)],
                               w.view(-1), blocksize, quant_type, threads)
            torch.mm(A2, w.t(), out=out[:, n0:n1])
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*lead, N)
