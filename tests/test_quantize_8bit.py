"""Blockwise 8-bit quantization: native kernels (every CPU level) == reference backend == brute-force oracle,
bit for bit, for codes, absmax and dequantized values (fact sheet section 2, kbit Note [op semantics])."""

from __future__ import annotations

import math

import pytest
import torch

import kbit.functional as F
import oracles
from conftest import NON_CONTIGUOUS, assert_bitwise_equal, randn
from kbit.backends import reference

SIZES = [1, 2, 3, 7, 15, 16, 17, 63, 255, 257, 4095, 4097]
BLOCKSIZES = [1, 7, 64, 100, 256, 4096, 8192]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DYNAMIC = F.create_dynamic_map()

# Largest distance from a value in [-1, 1] to its nearest code: half the widest gap of the dynamic map, which
# equals 1 + code[0] (the gap below -0.99296874 to the clamp at -1).
MAX_HALF_GAP = max(((DYNAMIC[1:] - DYNAMIC[:-1]) / 2).max().item(), 1 + DYNAMIC[0].item())
# float32 roundings between x and its decoded value: the reciprocal, x * inv, the midpoint, code * absmax.
ROUNDING_SLACK = 4 * torch.finfo(torch.float32).eps
# RMS error of dequantize(quantize(x)) for x ~ N(0, 1), 2^18 samples: worst of 8 seeds was 0.00954 / 0.01089 /
# 0.01326 (bs 64 / 256 / 4096); bounds add ~3%, well below what a systematic one-code error would cost.
MAX_8BIT_ROUNDTRIP_RMSE = {64: 0.0098, 256: 0.0112, 4096: 0.0137}


def _clustered_map(k: int, at: float = 0.3, step: float = 1e-6) -> torch.Tensor:
    """A sorted map with k entries 1e-6 apart just above `at`: several midpoints in one LUT bin."""
    base = torch.linspace(-1, 1, 256 - k).tolist()
    return torch.tensor(sorted(base + [at + j * step for j in range(k)]), dtype=torch.float32)


# Sorted maps besides the default one. The normal map and the 4-bit fp8 map hold hundreds of equal zeros; the
# clustered maps put 1, 2, 3, 4 and 59 midpoints into one 16-bit order-key bin (kbit's LUT finishes with up
# to 3 compare-and-step rounds and switches to a binary search above that: both sides of the switch).
CUSTOM_MAPS = {
    "udynamic": F.create_dynamic_map(signed=False),
    "linear": F.create_linear_map(),
    "linear_nozero": F.create_linear_map(add_zero=False),
    "fp8_e5m2": F.create_fp8_map(),
    "fp8_e4m3": F.create_fp8_map(True, 4, 3, 8),
    "fp8_e2m1_padded": F.create_fp8_map(True, 2, 1, 4),
    "normal": F.create_normal_map(),
    **{f"clustered{k}@{at}": _clustered_map(k, at) for k, at in ((2, 0.3), (3, 0.3), (4, 0.4), (4, 0.3), (60, 0.3))},
}


def check_all_backends(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Native (the active level) == reference == oracle for codes, absmax and dequantized values."""
    oq, oabs = oracles.quantize_8bit(A, code, blocksize)
    rq, rabs = reference.quantize_blockwise(A, code, blocksize)
    nq, nabs = torch.ops.kbit.quantize_blockwise(A, code, blocksize)
    assert_bitwise_equal(rq, oq, "reference codes")
    assert_bitwise_equal(nq, oq, "native codes")
    assert_bitwise_equal(rabs, oabs, "reference absmax")
    assert_bitwise_equal(nabs, oabs, "native absmax")
    od = oracles.dequantize(code[oq.reshape(-1).long()], oabs, blocksize, A.shape, A.dtype)
    assert_bitwise_equal(reference.dequantize_blockwise(rq, rabs, code, blocksize, A.dtype), od, "reference dequant")
    assert_bitwise_equal(torch.ops.kbit.dequantize_blockwise(nq, nabs, code, blocksize, A.dtype), od, "native dequant")
    return nq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_native_reference_oracle_agree(cpu_level, n, blocksize, dtype, rng):
    check_all_backends(randn((n,), dtype, rng, scale=3.0), DYNAMIC, blocksize)


@pytest.mark.parametrize("blocksize", [256, 4096])
def test_large_tensor(cpu_level, blocksize, rng):
    A = randn((1000, 1000), torch.float32, rng)
    codes = check_all_backends(A, DYNAMIC, blocksize)
    # The parallel split must not change a single code (blocks are independent).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_bitwise_equal(torch.ops.kbit.quantize_blockwise(A, DYNAMIC, blocksize)[0], codes, "1-thread codes")
    finally:
        torch.set_num_threads(threads)




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", NON_CONTIGUOUS.values(), ids=NON_CONTIGUOUS.keys())
def test_non_contiguous_input(cpu_level, make, dtype, rng):
    A = make(rng, dtype)
    assert not A.is_contiguous()
    codes = check_all_backends(A, DYNAMIC, 64)
    assert codes.shape == A.shape


def test_oracle_is_exact_nearest_with_ties_low(rng):
    # The midpoint rule == argmin |code - s| (exact arithmetic, ties to the lower index) wherever the float32
    # midpoint is the exact one: on random values, and exactly on every exactly representable midpoint.
    mids32 = (DYNAMIC[:-1] + DYNAMIC[1:]) / 2
    exact = (DYNAMIC[:-1].double() + DYNAMIC[1:].double()) / 2 == mids32.double()
    s = torch.cat([torch.rand(100_000, generator=rng) * 2 - 1, mids32[exact]])
    assert_bitwise_equal(oracles.count_midpoints_below(s, DYNAMIC), oracles.nearest_index_exact(s, DYNAMIC))
    assert exact.sum() >= 100, "enough exact ties to exercise the tie rule (148 of 255 are exact)"


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_roundtrip_error(cpu_level, blocksize, rng):
    A = torch.randn(1 << 18, generator=rng)
    codes, state = F.quantize_blockwise(A, blocksize=blocksize)
    err = (F.dequantize_blockwise(codes, state) - A).abs()
    per_block_bound = state.absmax * (MAX_HALF_GAP + ROUNDING_SLACK)
    assert bool((err.view(-1, blocksize) <= per_block_bound[:, None]).all())
    assert err.pow(2).mean().sqrt().item() < MAX_8BIT_ROUNDTRIP_RMSE[blocksize]


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_example_vector(cpu_level, backend):
    # bitsandbytes 0.50.2 prints these for quantize_blockwise(tensor([0.5, -0.25, 1.0, -2.0]), blocksize=64).
    A = torch.tensor([0.5, -0.25, 1.0, -2.0])
    quantize = torch.ops.kbit.quantize_blockwise if backend == "native" else reference.quantize_blockwise
    codes, absmax = quantize(A, DYNAMIC, 64)
    assert codes.tolist() == [201, 62, 219, 0] and absmax.tolist() == [2.0]
    deq = F.dequantize_blockwise(codes, absmax=absmax, blocksize=64)
    assert_bitwise_equal(deq, DYNAMIC[[201, 62, 219, 0]] * 2.0, "dequantized")
    # bitsandbytes printed these rounded to 7 decimals: half a unit there plus half an ulp of float32 at 2.
    printed = torch.tensor([0.4953125, -0.2421875, 1.0015625, -1.9859375])
    torch.testing.assert_close(deq, printed, atol=5e-8 + 1.2e-7, rtol=0)


def test_nested_roundtrip(cpu_level, rng):
    A = randn((300, 64), torch.float32, rng)
    plain_codes, plain = F.quantize_blockwise(A, blocksize=64)
    codes, state = F.quantize_blockwise(A, blocksize=64, nested=True)
    assert_bitwise_equal(codes, plain_codes, "codes do not depend on nesting")
    assert state.nested and state.absmax.dtype == torch.uint8 and state.absmax.shape == (300,)
    assert state.state2.blocksize == 64 and state.state2.absmax.shape == (math.ceil(300 / 64),)
    assert_bitwise_equal(state.offset, plain.absmax.mean(), "offset is the mean absmax")
    rebuilt = oracles.dequantize(DYNAMIC[state.absmax.long()], state.state2.absmax, 64, (300,), torch.float32)
    rebuilt = rebuilt + state.offset
    bound = state.state2.absmax[torch.arange(300) // 64] * (MAX_HALF_GAP + ROUNDING_SLACK) + ROUNDING_SLACK * 4
    assert bool(((rebuilt - plain.absmax).abs() <= bound).all())
    expected = oracles.dequantize(DYNAMIC[codes.reshape(-1).long()], rebuilt, 64, A.shape, torch.float32)
    assert_bitwise_equal(F.dequantize_blockwise(codes, state), expected, "nested dequantize")


def test_out_and_absmax_kwargs(rng):
    A = randn((5, 77), torch.bfloat16, rng)
    ref_codes, ref_state = F.quantize_blockwise(A, blocksize=64)
    out, absmax = torch.empty(5, 77, dtype=torch.uint8), torch.empty(7)
    codes, state = F.quantize_blockwise(A, blocksize=64, out=out, absmax=absmax)
    assert codes is out and state.absmax is absmax
    assert_bitwise_equal(out, ref_codes, "out")
    assert_bitwise_equal(absmax, ref_state.absmax, "absmax")
    deq_out = torch.empty(5, 77, dtype=torch.bfloat16)
    assert F.dequantize_blockwise(codes, state, out=deq_out) is deq_out
    assert_bitwise_equal(deq_out, F.dequantize_blockwise(codes, state), "dequantize out=")
    # With only absmax, the result is float32 (bitsandbytes' behaviour).
    assert F.dequantize_blockwise(codes, absmax=absmax, blocksize=64).dtype == torch.float32
    with pytest.raises(ValueError, match="out must be"):
        F.quantize_blockwise(A, blocksize=64, out=torch.empty(77, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absmax must be"):
        F.quantize_blockwise(A, blocksize=64, absmax=torch.empty(6))
    with pytest.raises(ValueError, match="requires either quant_state or absmax"):
        F.dequantize_blockwise(codes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_all_zero_blocks(cpu_level, dtype, zero, rng):
    # Block 0 all zero, block 1 random, trailing partial block (28 elements) all zero.
    A = torch.cat([torch.full((64,), zero), torch.randn(64, generator=rng), torch.full((28,), zero)]).to(dtype)
    codes = check_all_backends(A, DYNAMIC, 64)
    absmax = torch.ops.kbit.quantize_blockwise(A, DYNAMIC, 64)[1]
    assert absmax[0].item() == 0 and absmax[2].item() == 0
    zero_index = int((DYNAMIC == 0).nonzero()[0])
    assert set(codes[:64].tolist()) == {zero_index} and set(codes[128:].tolist()) == {zero_index}
    deq = F.dequantize_blockwise(codes, absmax=absmax, blocksize=64)
    assert_bitwise_equal(deq[:64], torch.zeros(64), "zero block decodes to +0.0")
    assert_bitwise_equal(deq[128:], torch.zeros(28), "zero tail decodes to +0.0")


def _on_and_around_midpoints(code: torch.Tensor) -> torch.Tensor:
    mids = (code[:-1] + code[1:]) / 2
    inf = torch.tensor(float("inf"))
    pts = [torch.tensor([1.0, -1.0, 0.0]), code, mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf)]
    return torch.cat(pts).clamp(-1, 1)


@pytest.mark.parametrize("absmax", [1.0, 2.0, 0.25])
@pytest.mark.parametrize("name", ["dynamic", *CUSTOM_MAPS])
def test_values_on_midpoints(cpu_level, name, absmax):
    # With a power-of-two absmax the scaled value s = x * (1 / absmax) is exactly the point constructed.
    code = DYNAMIC if name == "dynamic" else CUSTOM_MAPS[name]
    s = _on_and_around_midpoints(code)
    check_all_backends(s * absmax, code, s.numel())
    if name == "dynamic":  # distinct midpoints: on a midpoint -> lower index, one ulp above -> upper index
        q = torch.ops.kbit.quantize_blockwise(s * absmax, code, s.numel())[0][-3 * 255:].long()
        on, up, down = q.view(3, 255)
        assert on.tolist() == list(range(255)) == down.tolist() and up.tolist() == list(range(1, 256))


@pytest.mark.parametrize("name", list(CUSTOM_MAPS))
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_custom_maps(cpu_level, name, blocksize, rng):
    code = CUSTOM_MAPS[name]
    # Magnitudes from 1e-7 to 10 so that every region of the maps is visited ...
    spread = torch.randn(4097, generator=rng) * 10 ** (torch.rand(4097, generator=rng) * 8 - 7)
    check_all_backends(spread, code, blocksize)
    # ... and values within 1e-6 of random entries (absmax 1 via the leading 1.0), which probes the clusters.
    idx = torch.randint(0, 256, (4096,), generator=rng)
    near = (code[idx] + (torch.rand(4096, generator=rng) - 0.5) * 2e-6).clamp(-1, 1)
    check_all_backends(torch.cat([torch.ones(1), near]), code, blocksize)


def test_many_maps_in_turn(cpu_level, rng):
    # More maps than kbit's LUT cache holds (8), twice round: evicted tables must be rebuilt correctly.
    maps = [_clustered_map(k, at=0.1 * (k % 9)) for k in range(1, 12)]
    A = torch.rand(1000, generator=rng) * 2 - 1
    for _ in range(2):
        for code in maps:
            check_all_backends(A, code, 128)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf(cpu_level, dtype, rng):
    # Documented behaviour: a block with a NaN gets absmax NaN and every element in it scales to NaN -> code 0;
    # an inf block gets absmax inf, finite elements scale to 0 and the infs to inf * 0 = NaN -> code 0.
    nan, inf = float("nan"), float("inf")
    A = randn((5, 64), torch.float32, rng)
    A[0, 5] = nan
    A[1, 7] = inf
    A[2, 3], A[2, 9] = -inf, nan
    A[3, 0] = -inf
    A = A.to(dtype)
    code = DYNAMIC
    rq, rabs = reference.quantize_blockwise(A, code, 64)
    nq, nabs = torch.ops.kbit.quantize_blockwise(A, code, 64)
    assert_bitwise_equal(nq, rq, "codes")
    assert_bitwise_equal(nabs, rabs, "absmax")
    assert torch.isnan(nabs[0]) and torch.isnan(nabs[2]) and nabs[1].item() == inf and nabs[3].item() == inf
    assert set(nq[0].tolist()) == {0} and set(nq[2].tolist()) == {0}
    assert nq[1, 7].item() == 0 and set(nq[1, :7].tolist()) == {127} and nq[3, 0].item() == 0
    assert_bitwise_equal(nq[4], torch.ops.kbit.quantize_blockwise(A[4], code, 64)[0], "clean block unaffected")
    assert_bitwise_equal(torch.ops.kbit.dequantize_blockwise(nq, nabs, code, 64, dtype),
                         reference.dequantize_blockwise(rq, rabs, code, 64, dtype), "dequantized")


@pytest.mark.parametrize("backend", ["functional", "native", "reference"])
@pytest.mark.parametrize("bad", ["unsorted", "linear4_gap", "nan"])
def test_bad_code_map_raises(backend, bad):
    code = {"unsorted": DYNAMIC.flip(0), "linear4_gap": F.create_linear_map(True, 4),
            "nan": torch.where(torch.arange(256) == 40, float("nan"), DYNAMIC)}[bad]
    A = torch.randn(100)
    call = {"functional": lambda: F.quantize_blockwise(A, code=code, blocksize=64),
            "native": lambda: torch.ops.kbit.quantize_blockwise(A, code, 64),
            "reference": lambda: reference.quantize_blockwise(A, code, 64)}[backend]
    with pytest.raises(ValueError, match="sorted" if bad != "nan" else "NaN"):
        call()


@pytest.mark.parametrize("blocksize", [100, 101, 8192, 2**31, 2**62, 2**63 - 1])
def test_blocksize_beyond_size_is_one_block(cpu_level, blocksize, rng):
    # Native only (on CPU the op runs the native kernel): any blocksize >= n is one block. Huge values must
    # neither overflow the block count nor be padded in memory.
    A = torch.randn(100, generator=rng)
    codes, state = F.quantize_blockwise(A, blocksize=100)
    codes2, state2 = F.quantize_blockwise(A, blocksize=blocksize)
    assert_bitwise_equal(codes2, codes, "codes")
    assert_bitwise_equal(state2.absmax, state.absmax, "absmax")
    assert_bitwise_equal(F.dequantize_blockwise(codes, state2), F.dequantize_blockwise(codes, state), "dequant")


def test_input_requiring_grad(cpu_level, rng):
    A = torch.randn(300, generator=rng, requires_grad=True)
    codes, state = F.quantize_blockwise(A, blocksize=64)
    assert_bitwise_equal(codes, F.quantize_blockwise(A.detach(), blocksize=64)[0], "codes")


def test_dequantize_blockwise_nested_flag_must_agree_with_the_state():
    A = torch.randn(1000)
    q, state = F.quantize_blockwise(A)
    with pytest.raises(ValueError, match="nested=True"):
        F.dequantize_blockwise(q, state, nested=True)
    with pytest.raises(ValueError, match="nested=True"):
        F.dequantize_blockwise(q, absmax=state.absmax, nested=True)
    qn, nested_state = F.quantize_blockwise(A, nested=True)
    assert torch.equal(F.dequantize_blockwise(qn, nested_state, nested=True), F.dequantize_blockwise(qn, nested_state))
