"""4-bit NF4 / FP4: native kernels (every CPU level) == reference backend == brute-force oracle, bit for bit,
for packed bytes, absmax and dequantized values; bitsandbytes' test vectors and layout (fact sheet 3, 11)."""

from __future__ import annotations

import math

import pytest
import torch

import kbit.functional as F
import oracles
from conftest import NON_CONTIGUOUS, assert_bitwise_equal, randn
from kbit.backends import reference

SIZES = [0, 1, 2, 3, 7, 15, 16, 17, 63, 255, 257, 4095, 4097]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]
STORAGES = [torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32]
TABLES = {"nf4": torch.tensor(oracles.NF4, dtype=torch.float32), "fp4": torch.tensor(oracles.FP4, dtype=torch.float32)}
PAD_CODE = {"nf4": 7, "fp4": 0}  # code of 0.0, used for the low nibble of an odd-sized tensor's last byte
DYNAMIC = F.create_dynamic_map()

# Largest |code value - s| for s in [-1, 1]: half the widest gap between neighbouring table values (NF4: between
# -1 and -0.696; FP4: between 2/3 and 1).
MAX_HALF_GAP = {qt: ((t.sort().values[1:] - t.sort().values[:-1]) / 2).max().item() for qt, t in TABLES.items()}
# float32 roundings between x and its decoded value (reciprocal, x * inv, code * absmax), plus FP4's CUDA
# literals sitting up to 4e-8 away from the exact midpoints.
ROUNDING_SLACK = 4 * torch.finfo(torch.float32).eps
# RMS error of dequantize(quantize(x)) for x ~ N(0, 1), 2^18 samples; worst of 8 seeds: NF4 0.0923 / 0.0991 /
# 0.1117 and FP4 0.1222 / 0.1353 / 0.1618 at bs 64 / 256 / 4096. Bounds add ~3%.
MAX_NF4_ROUNDTRIP_RMSE = {64: 0.095, 256: 0.102, 4096: 0.115}
MAX_FP4_ROUNDTRIP_RMSE = {64: 0.126, 256: 0.139, 4096: 0.167}


def check_all_backends(A: torch.Tensor, blocksize: int, qt: str) -> torch.Tensor:
    """Native (the active level) == reference == oracle; returns the native packed bytes."""
    ocodes, oabs = oracles.quantize_4bit(A, blocksize, qt)
    opacked = oracles.pack_nibbles(ocodes, PAD_CODE[qt]).reshape(-1, 1)
    rp, rabs = reference.quantize_4bit(A, blocksize, qt, torch.uint8)
    np_, nabs = torch.ops.kbit.quantize_4bit(A, blocksize, qt, torch.uint8)
    assert_bitwise_equal(rp, opacked, "reference packed")
    assert_bitwise_equal(np_, opacked, "native packed")
    assert_bitwise_equal(rabs, oabs, "reference absmax")
    assert_bitwise_equal(nabs, oabs, "native absmax")
    shape = list(A.shape)
    od = oracles.dequantize(TABLES[qt][ocodes], oabs, blocksize, A.shape, A.dtype)
    assert_bitwise_equal(reference.dequantize_4bit(rp, rabs, blocksize, qt, shape, A.dtype), od, "reference dequant")
    assert_bitwise_equal(torch.ops.kbit.dequantize_4bit(np_, nabs, blocksize, qt, shape, A.dtype), od, "native dequant")
    return np_


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_native_reference_oracle_agree(cpu_level, n, blocksize, dtype, qt, rng):
    check_all_backends(randn((n,), dtype, rng, scale=2.0), blocksize, qt)


@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_large_tensor(cpu_level, qt, rng):
    check_all_backends(randn((1000, 1000), torch.float32, rng), 64, qt)


TEST_VECTORS = [  # (input, quant_type, packed bytes): bitsandbytes 0.50.2, fact sheet 11
    ([[1.0, -1.0, 0.0, 0.5]], "nf4", "F0 7C"),
    ([[1.0, -1.0, 0.0, 0.5]], "fp4", "3B 05"),
    ((torch.arange(-8, 8) / 8).tolist(), "nf4", "00 11 23 46 79 AB CD EF"),
    ((torch.arange(-8, 8) / 8).tolist(), "fp4", "BB AA DC FE 06 74 52 23"),
]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("values,qt,expected", TEST_VECTORS)
def test_bitsandbytes_vectors(cpu_level, backend, values, qt, expected):
    A = torch.tensor(values)
    quantize = torch.ops.kbit.quantize_4bit if backend == "native" else reference.quantize_4bit
    packed, absmax = quantize(A, 64, qt, torch.uint8)
    assert bytes(packed.flatten().tolist()).hex(" ").upper() == expected
    assert absmax.tolist() == [1.0]


def _decision_points(qt: str) -> torch.Tensor:
    """Every decision threshold, one float32 ulp either side, the table values, 0 and +-1."""
    if qt == "nf4":
        t = TABLES["nf4"]
        thr = (t[:-1] + t[1:]) / 2
    else:
        thr = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333])
        thr = torch.cat([thr, -thr])
    inf = torch.tensor(float("inf"))
    pts = [torch.tensor([1.0, -1.0, 0.0, -0.0]), TABLES[qt], thr, torch.nextafter(thr, inf), torch.nextafter(thr, -inf)]
    return torch.cat(pts).clamp(-1, 1)


@pytest.mark.parametrize("absmax", [1.0, 4.0, 0.125])
@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_values_on_decision_thresholds(cpu_level, qt, absmax):
    s = _decision_points(qt)  # absmax is a power of two, so x * (1 / absmax) is exactly s
    blocksize = 128
    A = torch.cat([s, torch.zeros(blocksize - s.numel())]) * absmax
    packed = check_all_backends(A, blocksize, qt)
    if qt == "nf4":  # on a midpoint -> lower code, one ulp above -> upper code
        codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten()[20:20 + 45].long()
        on, up, down = codes.view(3, 15)
        assert on.tolist() == list(range(15)) == down.tolist() and up.tolist() == list(range(1, 16))


def _ulp_neighbourhood(points: torch.Tensor, ulps: int) -> torch.Tensor:
    """Every float32 within `ulps` representable steps of each point (both sides)."""
    out, up, down = [points], points.clone(), points.clone()
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        out += [up, down]
    return torch.cat(out).clamp(-1, 1)


@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_dense_sweep_near_boundaries(cpu_level, qt):
    # Native kernels may locate the code through a uniform grid of 16 or 32 cells before comparing with the
    # thresholds (Note [4-bit code search]); sweep 40 ulps around every threshold and every cell edge of
    # both grids ([-1, 1] for NF4's s, [0, 1] for FP4's |s|, either sign).
    lo = -1.0 if qt == "nf4" else 0.0
    edges = torch.cat([lo + torch.arange(cells + 1) * (1.0 - lo) / cells for cells in (16, 32)])
    points = torch.cat([_decision_points(qt), edges, -edges])
    s = _ulp_neighbourhood(points, 40)
    A = torch.cat([s, torch.zeros(-s.numel() % 4096)])
    A[::4096] = 1.0  # absmax 1 in every block, so s is the value itself
    check_all_backends(A, 4096, qt)


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", NON_CONTIGUOUS.values(), ids=NON_CONTIGUOUS.keys())
def test_non_contiguous_input(cpu_level, make, dtype, qt, rng):
    A = make(rng, dtype)
    assert not A.is_contiguous()
    check_all_backends(A, 32, qt)


SHAPES = [(), (0,), (1,), (2,), (5,), (64,), (1, 1), (1, 2), (2, 1), (1, 5), (5, 1), (1, 64), (64, 1), (3, 0, 2),
          (2, 3, 5), (7, 3, 33)]


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_output_shape_is_input_shape(cpu_level, shape, qt, rng):
    A = randn(shape, torch.float16, rng)
    check_all_backends(A, 32, qt)
    packed, state = F.quantize_4bit(A, blocksize=32, quant_type=qt)
    assert packed.shape == ((A.numel() + 1) // 2, 1) and state.shape == A.shape
    out = F.dequantize_4bit(packed, state)
    assert out.shape == A.shape and out.dtype == torch.float16  # never transposed, never (1, n)


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("n", [1, 7, 10, 64, 257, 4097])
@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_quant_storage_roundtrip(cpu_level, storage, n, qt, rng):
    A = randn((n,), torch.float32, rng)
    ref_packed, ref_state = F.quantize_4bit(A, blocksize=64, quant_type=qt)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=qt, quant_storage=storage)
    nbytes = (n + 1) // 2
    itemsize = torch.empty((), dtype=storage).element_size()
    # bitsandbytes' shape ((n+1)//2 bytes, 1), viewed as storage; a partial last item is zero padded.
    assert packed.dtype == storage and packed.shape == (math.ceil(nbytes / itemsize), 1)
    raw = packed.reshape(-1).view(torch.uint8)
    assert_bitwise_equal(raw[:nbytes], ref_packed.reshape(-1), "packed bytes")
    assert raw[nbytes:].tolist() == [0] * (raw.numel() - nbytes)
    assert_bitwise_equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(ref_packed, ref_state), "dequantized")


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("n", [100, 64 * 600 + 17])
def test_compress_statistics(cpu_level, n, qt, rng):
    A = randn((n,), torch.bfloat16, rng)
    plain_packed, plain = F.quantize_4bit(A, blocksize=64, quant_type=qt)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=qt, compress_statistics=True)
    blocks = math.ceil(n / 64)
    assert_bitwise_equal(packed, plain_packed, "packed bytes do not depend on nesting")
    assert state.nested and state.absmax.dtype == torch.uint8 and state.absmax.shape == (blocks,)
    assert state.state2.blocksize == 256 and state.state2.absmax.shape == (math.ceil(blocks / 256),)
    assert_bitwise_equal(state.state2.code, DYNAMIC, "nested code is the dynamic map")
    assert_bitwise_equal(state.offset, plain.absmax.mean(), "offset")
    q8, s8 = F.quantize_blockwise(plain.absmax - state.offset, blocksize=256)
    assert_bitwise_equal(state.absmax, q8, "nested codes")
    assert_bitwise_equal(state.state2.absmax, s8.absmax, "nested absmax")
    rebuilt = oracles.dequantize(DYNAMIC[q8.long()], s8.absmax, 256, (blocks,), torch.float32) + state.offset
    codes = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten()[:n].long()
    expected = oracles.dequantize(TABLES[qt][codes], rebuilt, 64, A.shape, A.dtype)
    assert_bitwise_equal(F.dequantize_4bit(packed, state), expected, "nested dequantize")


@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_dequantize_out(cpu_level, qt, rng):
    A = randn((9, 70), torch.float16, rng)
    packed, state = F.quantize_4bit(A, blocksize=128, quant_type=qt)
    expected = F.dequantize_4bit(packed, state)
    out = torch.empty(9, 70, dtype=torch.float16)
    assert F.dequantize_4bit(packed, state, out=out) is out
    assert_bitwise_equal(out, expected, "out=")
    # Without a quant_state: absmax and out give everything else (bitsandbytes' signature).
    out2 = torch.empty(9, 70, dtype=torch.float16)
    F.dequantize_4bit(packed, absmax=state.absmax, out=out2, blocksize=128, quant_type=qt)
    assert_bitwise_equal(out2, expected, "absmax + out")
    with pytest.raises(ValueError, match="requires both absmax and out"):
        F.dequantize_4bit(packed, absmax=state.absmax, blocksize=128, quant_type=qt)
    with pytest.raises(ValueError, match="out must be"):
        F.dequantize_4bit(packed, state, out=torch.empty(70, 9, dtype=torch.float16))


@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_nan_and_inf(cpu_level, qt, rng):
    # A NaN block: absmax NaN, every code 0. An inf block: absmax inf, finite values -> code of 0, infs -> 0.
    A = randn((4, 64), torch.float32, rng)
    A[0, 3], A[1, 9], A[2, 0], A[2, 1] = float("nan"), float("inf"), -float("inf"), float("nan")
    rp, rabs = reference.quantize_4bit(A, 64, qt, torch.uint8)
    np_, nabs = torch.ops.kbit.quantize_4bit(A, 64, qt, torch.uint8)
    assert_bitwise_equal(np_, rp, "packed")
    assert_bitwise_equal(nabs, rabs, "absmax")
    assert torch.isnan(nabs[0]) and nabs[1].item() == float("inf") and torch.isnan(nabs[2])
    assert set(np_[:32].flatten().tolist()) == {0} and set(np_[64:96].flatten().tolist()) == {0}
    assert_bitwise_equal(torch.ops.kbit.dequantize_4bit(np_, nabs, 64, qt, [4, 64], torch.float32),
                         reference.dequantize_4bit(rp, rabs, 64, qt, [4, 64], torch.float32), "dequantized")


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_roundtrip_error(cpu_level, qt, blocksize, rng):
    A = torch.randn(1 << 18, generator=rng)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=qt)
    err = (F.dequantize_4bit(packed, state) - A).abs()
    bound = state.absmax * (MAX_HALF_GAP[qt] + ROUNDING_SLACK)
    assert bool((err.view(-1, blocksize) <= bound[:, None]).all())
    rmse_bound = (MAX_NF4_ROUNDTRIP_RMSE if qt == "nf4" else MAX_FP4_ROUNDTRIP_RMSE)[blocksize]
    assert err.pow(2).mean().sqrt().item() < rmse_bound


@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_wrappers(qt, rng):
    A = randn((33, 65), torch.bfloat16, rng)
    quantize = F.quantize_nf4 if qt == "nf4" else F.quantize_fp4
    dequantize = F.dequantize_nf4 if qt == "nf4" else F.dequantize_fp4
    packed, state = quantize(A, blocksize=128, compress_statistics=True)
    ref_packed, ref_state = F.quantize_4bit(A, blocksize=128, compress_statistics=True, quant_type=qt)
    assert state.quant_type == qt
    assert_bitwise_equal(packed, ref_packed, "packed")
    assert_bitwise_equal(dequantize(packed, state), F.dequantize_4bit(ref_packed, ref_state), "dequantized")
    out = torch.empty(33, 65, dtype=torch.bfloat16)
    absmax = (F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset).float()
    dequantize(packed, absmax=absmax, out=out, blocksize=128)
    assert_bitwise_equal(out, F.dequantize_4bit(ref_packed, ref_state), "wrapper with absmax + out")


def test_default_quant_type_is_fp4(rng):
    # bitsandbytes' default; a silent switch to nf4 would change every byte.
    packed, state = F.quantize_4bit(torch.randn(64, generator=rng))
    assert state.quant_type == "fp4" and state.blocksize == 64


@pytest.mark.parametrize("quantize", [
    lambda t: F.quantize_4bit(t, compress_statistics=True),
    lambda t: F.quantize_blockwise(t.reshape(-1), nested=True),
], ids=["4bit", "blockwise"])
def test_double_quantization_of_an_empty_tensor_has_a_zero_offset(quantize):
    """The mean absmax of no blocks is NaN; the offset must be 0 so the QuantState (and a checkpoint of a
    zero-sized layer) stays valid."""
    _, state = quantize(torch.zeros(0, 64))
    assert float(state.offset) == 0.0
