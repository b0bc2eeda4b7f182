"""CPU kernel of ``kbit::gemm_4bit``: y = A @ dequantize(B)^T (+ bias) for a 4-bit weight B [N, K].

- Up to cpu_gemv.GEMV_MAX_ROWS input rows: the fused native kernel (csrc/cpu/gemv4-inl.h) reads each packed
  nibble once and never materializes the weight — the memory-bound case, where 4-bit moves ~4x fewer
  bytes than bf16.
- More rows: the weight is dequantized straight into A's dtype, in row tiles of up to TILE_BYTES, into a
  per-thread workspace that is reused across calls (a fresh 32 MiB tensor costs more in page faults than
  the dequantization itself), and each tile goes through torch's GEMM (AMX / oneDNN on recent CPUs): the
  compute-bound case, where no hand kernel beats the vendor GEMM and dequantization only has to stay
  cheap. Tiles are computed as W_tile @ A^T into rows of a transposed output, which oneDNN runs faster
  than writing column slices.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.utils.dlpack import to_dlpack as _dl

from .. import _ops
from . import cpu_gemv
from .cpu_gemv import _c
from .._native import _C
from .._ops import NESTED_BLOCKSIZE, implements

#: Largest tile of dequantized weight, in bytes. Larger tiles run the GEMM faster (measured: a 4096x4096
#: bf16 weight in one tile beats 1 MiB tiles by 25%); the cap bounds the workspace for huge layers.
TILE_BYTES = 64 << 20

_workspace = threading.local()


def _tile_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread scratch tensor of at least ``numel`` elements of ``dtype``, reused across calls."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _workspace.buf = buf
    return buf[:numel]

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
    elif M <= cpu_gemv.GEMV_MAX_ROWS:
        weight = cpu_gemv.prepare(packed, (N, K), blocksize, quant_type, absmax, absmax_8bit, absmax_code, absmax_offset)
        out = cpu_gemv.run(weight, A2, N, None)
    else:
        if absmax_8bit is None:
            scales = absmax.detach().contiguous()
        else:  # the native 8-bit dequantization, not the reference's gather
            scales = torch.ops.kbit.dequantize_blockwise(absmax_8bit, absmax, absmax_code, NESTED_BLOCKSIZE,
                                                         torch.float32) + absmax_offset
        out_t = torch.empty((N, M), dtype=A.dtype)
        rows = _tile_rows(N, K, blocksize, A.element_size())
        tile = _tile_buffer(rows * K, A.dtype).view(rows, K)
        A2_t = A2.t()
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            w = tile[: n1 - n0]
            f0, f1 = n0 * K, n1 * K
            _C.dequantize_4bit(_c(packed[f0 // 2 : (f1 + 1) // 2]), _c(scales[f0 // blocksize : -(-f1 // blocksize)]),
                               _dl(w), blocksize, quant_type, threads)
            torch.mm(w, A2_t, out=out_t[n0:n1])
        out = out_t.t().contiguous()
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*lead, N)
