"""Brute-force oracles for the quantizers, written independently of kbit's kernels (no searchsorted, no
shared tables except the code map under test): slow, obvious, and the yardstick every backend meets.

The rules (fact sheet section 11):
- blocks of ``blocksize`` consecutive elements of the flattened (row-major) tensor; absmax = max |x| in
  float32, NaN if the block has a NaN; s = clamp(x * float32(1 / absmax), -1, 1), 0 for an all-zero block.
- sorted maps (8-bit, NF4): code = number of float32 midpoints (c[i] + c[i+1]) / 2 strictly below s
  (a value on a midpoint goes to the lower index; NaN -> 0).
- FP4: bitsandbytes' CUDA decision tree on |s| with its decimal float32 literals, sign bit 8 iff s < 0.
"""

from __future__ import annotations

import torch

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
FP4 = tuple(v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3)) + tuple(-v / 12.0 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3))

# Elements compared per chunk in the brute-force search (keeps the n x 255 comparison matrix ~16 MB).
_CHUNK = 1 << 16


def scaled_blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax per block, scaled values s of every element in row-major order)."""
    x = A.contiguous().reshape(-1).float()
    n = x.numel()
    blocks = -(-n // blocksize)
    # Zero padding changes neither a block's max |x| nor whether it holds a NaN.
    padded = torch.cat([x, x.new_zeros(blocks * blocksize - n)]).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1) if blocks else x.new_zeros(0)
    absmax = torch.where(torch.isnan(padded).any(dim=1), float("nan"), absmax)
    inv = torch.where(absmax == 0, 0.0, torch.ones_like(absmax) / absmax)  # float32 reciprocal
    s = (padded * inv[:, None]).clamp(-1.0, 1.0).reshape(-1)[:n]
    return absmax, s


def count_midpoints_below(s: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Code index of each scaled value under the midpoint rule, by comparing with every midpoint."""
    mids = (code[:-1] + code[1:]) / 2  # float32, as the kernels compute them
    out = [(mids[None, :] < c[:, None]).sum(dim=1) for c in s.split(_CHUNK)] if s.numel() else []
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def nearest_index_exact(s: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """argmin |code - s| in float64 with ties to the lower index: the meaning of the midpoint rule."""
    c = code.double()
    out = []
    for chunk in s.double().split(_CHUNK):
        d = (c[None, :] - chunk[:, None]).abs()
        out.append(d.argmin(dim=1))  # argmin returns the first (lowest) index of equal minima
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def quantize_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """(uint8 codes of A's shape, absmax)."""
    absmax, s = scaled_blocks(A, blocksize)
    codes = count_midpoints_below(s, code).to(torch.uint8).reshape(A.shape)
    return codes, absmax


def dequantize(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype) -> torch.Tensor:
    """values[k] * absmax[k // blocksize] in float32, then rounded to dtype, in ``shape``."""
    flat = values.reshape(-1).float()
    scale = absmax[torch.arange(flat.numel()) // blocksize] if flat.numel() else flat
    return (flat * scale).to(dtype).reshape(shape)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def fp4_cuda_codes(s: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CUDA dQuantizeFP4 tree, transcribed literally (strict '>' on |s|)."""
    a = s.abs()
    w = torch.where
    code = w(a > _f32(0.29166667),
             w(a > _f32(0.583333), w(a > _f32(0.8333333), 3, 2), w(a > _f32(0.4166667), 5, 4)),
             w(a > _f32(0.0859375), w(a > _f32(0.20833333), 7, 6), w(a > _f32(0.00260417), 1, 0)))
    return code + w(s < 0, 8, 0)


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str):
    """(4-bit codes of every element as int64 (row-major), absmax)."""
    absmax, s = scaled_blocks(A, blocksize)
    if quant_type == "nf4":
        codes = count_midpoints_below(s, torch.tensor(NF4, dtype=torch.float32))
    else:
        codes = fp4_cuda_codes(s)
    return codes.long(), absmax


def pack_nibbles(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """Element 2j -> high nibble of byte j, 2j+1 -> low nibble; odd counts padded with ``pad_code``."""
    c = codes.reshape(-1).long()
    if c.numel() % 2:
        c = torch.cat([c, torch.tensor([pad_code])])
    pairs = c.view(-1, 2)
    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)
