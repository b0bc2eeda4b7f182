"""Interchangeability with bitsandbytes 0.50.2: the same NF4 bytes, FP4 values and statistics, and QuantStates
that load in either library and decode to the same numbers."""

from __future__ import annotations

import pytest
import torch

import kbit.functional as F
import oracles
from conftest import assert_bitwise_equal, randn

try:
    import bitsandbytes.functional as bnbF
except Exception as exc:  # noqa: BLE001  (any import failure means: nothing to compare with)
    pytest.skip(f"bitsandbytes is not importable here ({type(exc).__name__}: {exc})", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DYNAMIC = F.create_dynamic_map()
FP4 = torch.tensor(oracles.FP4, dtype=torch.float32)

# Shapes for quantization: row-aligned, straddling rows, 3-D, 1-D odd, and a single row.
QUANT_SHAPES = [(64, 128), (128, 300), (5, 7, 33), (4097,), (1, 64)]
# Shapes for decoding with bitsandbytes' own dequantize_4bit, chosen around its CPU bugs (fact sheet 10):
# shape[0] != 1 (it transposes otherwise), shape[-1] even and a multiple of the blocksize (its AVX-512 kernel
# indexes absmax per row, wrong whenever a block straddles two rows).
DECODE_CASES = [((64, 128), 64), ((128, 256), 128), ((16, 4096), 4096), ((3, 5, 64), 32), ((300, 512), 256)]


def assert_codes_at_least_as_near(ours: torch.Tensor, theirs: torch.Tensor, A: torch.Tensor, blocksize: int) -> None:
    """Our 8-bit codes are exact nearest; bitsandbytes' CPU lookup table is occasionally one index off. In an
    all-zero block it writes code 0 where we write the code of 0.0; both decode to 0 (checked elsewhere)."""
    absmax, s = oracles.scaled_blocks(A, blocksize)
    live = absmax.repeat_interleave(blocksize)[: s.numel()] != 0
    ours, theirs, s = ours.reshape(-1)[live].long(), theirs.reshape(-1)[live].long(), s[live].double()
    assert ours.numel() == 0 or int((ours - theirs).abs().max()) <= 1
    ours_d, theirs_d = (DYNAMIC.double()[ours] - s).abs(), (DYNAMIC.double()[theirs] - s).abs()
    # The one exception is a tie by the rule: s exactly on the float32 midpoint of the two codes (which may sit
    # a rounding away from the real midpoint) goes to the lower code. Low-precision inputs hit such ties often.
    mids32 = ((DYNAMIC[:-1] + DYNAMIC[1:]) / 2).double()
    tie = (ours < theirs) & (s == mids32[torch.minimum(ours, theirs).clamp(max=254)])
    assert bool(((ours_d <= theirs_d) | tie).all()), "a kbit code is farther from the value than bitsandbytes'"


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_nf4_same_bytes_and_absmax(shape, blocksize, dtype, nested, rng):
    A = randn(shape, dtype, rng)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    their_packed, theirs = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    assert_bitwise_equal(packed, their_packed, "packed NF4")
    assert state.shape == theirs.shape and state.dtype == theirs.dtype and state.blocksize == theirs.blocksize
    if not nested:
        assert_bitwise_equal(state.absmax, theirs.absmax, "absmax")
        return
    plain_absmax = F.quantize_4bit(A, blocksize=blocksize, quant_type="nf4")[1].absmax
    assert_bitwise_equal(state.offset, theirs.offset, "offset")
    assert_bitwise_equal(state.state2.absmax, theirs.state2.absmax, "nested absmax")
    assert state.state2.blocksize == theirs.state2.blocksize == 256
    assert_codes_at_least_as_near(state.absmax, theirs.absmax, plain_absmax - state.offset, 256)


def _fp4_ambiguous(s: torch.Tensor) -> torch.Tensor:
    """Where bitsandbytes' CPU FP4 (exact float32 midpoints, ties down) and its CUDA rule (decimal literals,
    which kbit follows) may choose neighbouring levels: |s| between a literal and the exact midpoint."""
    mags = FP4[:8].sort().values
    mids = (mags[:-1] + mags[1:]) / 2
    lits = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333])
    a = s.abs()
    lo, hi = torch.minimum(mids, lits), torch.maximum(mids, lits)
    return ((a[:, None] >= lo) & (a[:, None] <= hi)).any(dim=1)


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=str)
def test_fp4_same_values(shape, blocksize, dtype, rng):
    # Bytes may differ (fact sheet 3.1: bitsandbytes' CPU path puts tiny magnitudes in the other zero code);
    # values are equal except where the two decision rules legitimately disagree: |s| between a CUDA literal
    # and the exact midpoint (windows ~4e-8 wide). There both must be one of the two neighbouring levels.
    A = randn(shape, dtype, rng)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type="fp4")
    their_packed, theirs = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type="fp4")
    assert_bitwise_equal(state.absmax, theirs.absmax, "absmax")
    ours = F.dequantize_4bit(packed, state).float().reshape(-1)
    their_values = F.dequantize_4bit(their_packed, state).float().reshape(-1)  # decoded with kbit: see DECODE_CASES
    _, s = oracles.scaled_blocks(A, blocksize)
    window = _fp4_ambiguous(s)
    # Random float32 data essentially never lands there; fp16/bf16 ratios such as 7/12 do, but rarely.
    assert int(window.sum()) <= (2 if dtype == torch.float32 else A.numel() // 100)
    assert bool((ours[~window] == their_values[~window]).all()), "FP4 values (+0 == -0)"
    mags = FP4[:8].sort().values
    ours_mag, their_mag = FP4[_nibbles(packed, A.numel())].abs(), FP4[_nibbles(their_packed, A.numel())].abs()
    k = (mags[None, :] < s.abs()[:, None]).sum(1).clamp(1, 7) - 1  # the window below level k + 1
    for m in (ours_mag[window], their_mag[window]):
        assert bool(((m == mags[k[window]]) | (m == mags[k[window] + 1])).all())


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", DECODE_CASES, ids=str)
def test_our_state_loads_in_bitsandbytes(shape, blocksize, dtype, nested, qt, rng):
    A = randn(shape, dtype, rng)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=qt, compress_statistics=nested)
    theirs = bnbF.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    assert theirs.nested == nested and tuple(theirs.shape) == shape and theirs.dtype == dtype
    assert_bitwise_equal(bnbF.dequantize_4bit(packed, theirs), F.dequantize_4bit(packed, state), "bnb decode of ours")


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,blocksize", DECODE_CASES, ids=str)
def test_their_state_loads_in_kbit(shape, blocksize, dtype, nested, qt, rng):
    A = randn(shape, dtype, rng)
    their_packed, theirs = bnbF.quantize_4bit(A, blocksize=blocksize, quant_type=qt, compress_statistics=nested)
    d = {"weight." + k: v for k, v in theirs.as_dict(packed=True).items()}
    ours = F.QuantState.from_dict(d, device="cpu")
    assert ours.nested == nested and ours.shape == shape and ours.dtype == dtype and ours.quant_type == qt
    expected = bnbF.dequantize_4bit(their_packed, theirs)
    assert_bitwise_equal(F.dequantize_4bit(their_packed, ours), expected, "kbit decode of theirs")


def test_bf16_storage_state_loads_in_bitsandbytes(rng):
    A = randn((64, 128), torch.bfloat16, rng)
    packed, state = F.quantize_4bit(A, quant_type="nf4", quant_storage=torch.bfloat16, compress_statistics=True)
    theirs = bnbF.QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    assert_bitwise_equal(bnbF.dequantize_4bit(packed, theirs), F.dequantize_4bit(packed, state), "bf16 storage")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("shape", [(5000,), (33, 100), (4, 4096)], ids=str)
def test_8bit_codes_and_decoding(shape, blocksize, dtype, rng):
    A = randn(shape, dtype, rng, scale=4.0)
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    their_codes, theirs = bnbF.quantize_blockwise(A, blocksize=blocksize)
    assert_bitwise_equal(state.absmax, theirs.absmax, "absmax")
    assert_bitwise_equal(codes, oracles.quantize_8bit(A, DYNAMIC, blocksize)[0], "kbit codes are exact nearest")
    assert_codes_at_least_as_near(codes, their_codes, A, blocksize)
    # Decoding bitsandbytes' codes with kbit gives bitsandbytes' values.
    as_ours = F.QuantState(absmax=theirs.absmax, code=theirs.code, blocksize=blocksize, dtype=dtype)
    assert_bitwise_equal(F.dequantize_blockwise(their_codes, as_ours), bnbF.dequantize_blockwise(their_codes, theirs),
                         "kbit decode of bnb codes")
    assert_bitwise_equal(F.dequantize_blockwise(their_codes, absmax=theirs.absmax, blocksize=blocksize),
                         bnbF.dequantize_blockwise(their_codes, absmax=theirs.absmax, blocksize=blocksize),
                         "absmax-only form")


def test_8bit_zero_block_decodes_to_zero_in_both(rng):
    # bitsandbytes' CPU kernel writes code 0 for an all-zero block, kbit the code of 0.0: both decode to 0.
    A = torch.cat([torch.zeros(64), torch.randn(64, generator=rng)])
    codes, state = F.quantize_blockwise(A, blocksize=64)
    their_codes, theirs = bnbF.quantize_blockwise(A, blocksize=64)
    assert_bitwise_equal(state.absmax, theirs.absmax, "absmax")
    assert bool((F.dequantize_blockwise(their_codes[:64], absmax=theirs.absmax[:1], blocksize=64) == 0).all())
    assert bool((bnbF.dequantize_blockwise(codes, theirs)[:64] == 0).all())
