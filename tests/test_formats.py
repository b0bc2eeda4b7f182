"""Code maps: bit-exact equality with bitsandbytes' tables (fact sheet section 1) and with the native module."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

import kbit
from kbit import formats
from kbit.functional import create_dynamic_map, create_fp8_map, create_linear_map, create_normal_map, get_4bit_type
from conftest import assert_bitwise_equal

try:
    import bitsandbytes.functional as bnbF
except Exception as exc:  # noqa: BLE001  (any import failure means: no reference to compare with)
    bnbF = None
    BNB_IMPORT_ERROR = f"bitsandbytes is not importable here ({type(exc).__name__}: {exc})"
else:
    BNB_IMPORT_ERROR = ""
needs_bnb = pytest.mark.skipif(bnbF is None, reason=BNB_IMPORT_ERROR or "bitsandbytes available")

# sha256 of the 256 float32 little-endian bytes, printed by bitsandbytes 0.50.2 (fact sheet 1.1).
DYNAMIC_SHA256 = {
    True: "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c",
    False: "305f002cc11278fb769d13b25b9fd0c7c83c8402c40a878fe086f4039fde6398",
}

# IEEE bits of get_4bit_type("nf4") / ("fp4") in bitsandbytes 0.50.2 (fact sheet 1.3), index = 4-bit code.
NF4_BITS = [0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
            0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000]
_FP4_POS = [0x0, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000]
# Index 8 is +0.0: bitsandbytes' Python list has the int -0, which becomes +0.0.
FP4_BITS = _FP4_POS + [0x0] + [b | 0x80000000 for b in _FP4_POS[1:]]

# float32 NF4 decision thresholds (midpoints), printed by bitsandbytes (fact sheet 3.1).
NF4_MIDPOINTS = [-0.8480964, -0.6106329, -0.45999527, -0.33967942, -0.2346074, -0.13791174, -0.045525018,
                 0.03979015, 0.12025525, 0.20352125, 0.29201376, 0.38931254, 0.50166345, 0.6427869, 0.86147845]
# bitsandbytes' CUDA FP4 decision literals, in increasing order (fact sheet 11).
FP4_CUDA_LITERALS = [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333]


PRINTED_7_DIGITS_ATOL = 5e-8 + 6e-8


def f32_bits(values) -> list[int]:
    return [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in values]


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_sha256(signed):
    m = create_dynamic_map(signed=signed)
    assert m.dtype == torch.float32 and m.shape == (256,)
    assert hashlib.sha256(m.numpy().astype("<f4").tobytes()).hexdigest() == DYNAMIC_SHA256[signed]


def test_dynamic_map_landmarks():
    m = create_dynamic_map()
    assert bool((m[1:] > m[:-1]).all()), "256 distinct, strictly increasing values"
    assert m[127].item() == 0.0 and m[255].item() == 1.0
    assert f32_bits([m[0]]) == f32_bits([-0.99296874])
    assert_bitwise_equal(m[128:255], -m[:127].flip(0), "positives mirror the negatives")
    u = create_dynamic_map(signed=False)
    assert u[0].item() == 0.0 and u[255].item() == 1.0 and f32_bits([u[1]]) == f32_bits([3.2500003e-07])


def test_normal_map_unique_values_are_the_nf4_table():
    m = create_normal_map()
    assert m.shape == (256,) and bool((m[1:] >= m[:-1]).all())
    assert f32_bits(m.unique().tolist()) == NF4_BITS
    # Layout after sorting: 7 negatives, 241 zeros, 8 positives (fact sheet 1.2).
    assert (m < 0).sum().item() == 7 and (m == 0).sum().item() == 241 and (m > 0).sum().item() == 8


def test_normal_map_without_extra_value_is_symmetric():
    u = create_normal_map(use_extra_value=False).unique()
    assert u.numel() == 15
    assert_bitwise_equal(u[8:], -u[:7].flip(0), "positive half")
    # Values printed by bitsandbytes to 7 digits (fact sheet 1.2): half a unit in the 7th digit (5e-8) plus
    # the float32 rounding of the literal near 0.5-1 (half an ulp, 6e-8).
    expected = torch.tensor([0.0910500, 0.1847734, 0.2844414, 0.3949175, 0.5250731, 0.6961928, 1.0])
    torch.testing.assert_close(u[8:], expected, atol=PRINTED_7_DIGITS_ATOL, rtol=0)


@pytest.mark.parametrize("typename,expected", [("nf4", NF4_BITS), ("fp4", FP4_BITS)])
def test_4bit_tables_exact_bits(typename, expected):
    t = get_4bit_type(typename)
    assert t.dtype == torch.float32 and t.shape == (16,) and t.device.type == "cpu"
    assert t.view(torch.int32).tolist() == [b - (1 << 32) if b >= 1 << 31 else b for b in expected]


def test_fp4_layout():
    t = get_4bit_type("fp4")
    raw = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32)
    assert_bitwise_equal(t[:8], raw / 12, "fp4 magnitudes")
    assert_bitwise_equal(t[9:], -(raw[1:] / 12), "fp4 negatives")
    assert f32_bits([t[8]]) == [0], "index 8 is +0.0, as bitsandbytes' table"


def test_nf4_midpoints_are_bitsandbytes_thresholds():
    t = get_4bit_type("nf4")
    assert f32_bits(((t[:-1] + t[1:]) / 2).tolist()) == f32_bits(NF4_MIDPOINTS)


def test_int4_type():
    t = get_4bit_type("int4")
    expected = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32) / 7
    assert_bitwise_equal(t, expected, "int4")


@pytest.mark.parametrize("typename,exc", [("int8", ValueError), ("NF4", ValueError), ("", ValueError),
                                          ("af4", ValueError), (4, TypeError), (None, TypeError)])
def test_get_4bit_type_errors(typename, exc):
    with pytest.raises(exc):
        get_4bit_type(typename)


def test_native_tables_agree_with_formats():
    t = kbit._native._C.format_tables()
    assert f32_bits(t["nf4"]) == NF4_BITS and f32_bits(t["fp4"]) == FP4_BITS
    assert t["nf4"] == list(formats.NF4_VALUES) == get_4bit_type("nf4").tolist()
    assert t["fp4"] == list(formats.FP4_VALUES) == get_4bit_type("fp4").tolist()
    assert f32_bits(t["fp4_thresholds"]) == f32_bits(FP4_CUDA_LITERALS)
    assert list(formats.FP4_THRESHOLDS) == t["fp4_thresholds"]
    assert t["fp4_magnitude_code"] == list(formats.FP4_MAGNITUDE_CODE) == [0, 1, 6, 7, 4, 5, 2, 3]
    assert t["fp4_sign_bit"] == formats.FP4_SIGN_BIT == 8
    assert t["blocksizes_4bit"] == list(formats.BLOCKSIZES_4BIT) == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert t["nested_blocksize_4bit"] == formats.NESTED_BLOCKSIZE_4BIT == 256
    assert t["code_size_8bit"] == formats.CODE_SIZE_8BIT == 256
    assert t["high_nibble_shift"] == formats.HIGH_NIBBLE_SHIFT == 4


def test_fp4_magnitude_codes_follow_value_order():
    # The magnitude code for "above threshold i-1, at most threshold i" must name increasing FP4 values,
    # and each threshold must lie between the two values it separates.
    t = get_4bit_type("fp4")
    mags = [t[c].item() for c in formats.FP4_MAGNITUDE_CODE]
    assert mags == sorted(mags)
    for i, thr in enumerate(formats.FP4_THRESHOLDS):
        assert mags[i] < thr < mags[i + 1]


# ---- generators that must equal bitsandbytes' bit for bit --------------------------------------------------
FP8_ARGS = [(True, 5, 2, 8), (True, 4, 3, 8), (True, 2, 1, 4), (False, 4, 4, 8), (True, 3, 4, 8), (False, 2, 2, 4)]
LINEAR_ARGS = [(True, 8, True), (True, 8, False), (False, 8, True), (False, 8, False), (True, 4, True),
               (False, 4, True), (True, 1, True)]
DYNAMIC_ARGS = [(True, 7, 8), (False, 7, 8), (True, 5, 8), (True, 3, 4), (False, 3, 4), (True, 4, 5)]
NORMAL_ARGS = [(0.9677083, True), (0.9677083, False), (0.99, True)]


@needs_bnb
@pytest.mark.parametrize("args", FP8_ARGS, ids=str)
def test_fp8_map_equals_bitsandbytes(args):
    assert_bitwise_equal(create_fp8_map(*args), bnbF.create_fp8_map(*args), f"create_fp8_map{args}")


@needs_bnb
@pytest.mark.parametrize("args", LINEAR_ARGS, ids=str)
def test_linear_map_equals_bitsandbytes(args):
    assert_bitwise_equal(create_linear_map(*args), bnbF.create_linear_map(*args), f"create_linear_map{args}")


@needs_bnb
@pytest.mark.parametrize("args", DYNAMIC_ARGS, ids=str)
def test_dynamic_map_equals_bitsandbytes(args):
    assert_bitwise_equal(create_dynamic_map(*args), bnbF.create_dynamic_map(*args), f"create_dynamic_map{args}")


@needs_bnb
@pytest.mark.parametrize("args", NORMAL_ARGS, ids=str)
def test_normal_map_equals_bitsandbytes(args):
    pytest.importorskip("scipy", reason="bitsandbytes' create_normal_map needs scipy")
    assert_bitwise_equal(create_normal_map(*args), bnbF.create_normal_map(*args), f"create_normal_map{args}")


@pytest.mark.parametrize("fn,kwargs", [
    (create_fp8_map, dict(signed=True, exponent_bits=4, precision_bits=4, total_bits=8)),
    (create_fp8_map, dict(signed=False, exponent_bits=4, precision_bits=3, total_bits=8)),
    (create_linear_map, dict(total_bits=9)),
    (create_linear_map, dict(total_bits=0)),
    (create_dynamic_map, dict(total_bits=9)),
    (create_dynamic_map, dict(signed=True, max_exponent_bits=7, total_bits=7)),
    (create_dynamic_map, dict(signed=False, max_exponent_bits=6)),
    (create_dynamic_map, dict(signed=False, max_exponent_bits=2, total_bits=4)),
    (create_normal_map, dict(offset=0.5)),
    (create_normal_map, dict(offset=1.0)),
])
def test_map_generator_argument_errors(fn, kwargs):
    with pytest.raises(ValueError):
        fn(**kwargs)


@pytest.mark.parametrize("total_bits", range(2, 9))
def test_every_accepted_dynamic_map_has_its_full_size(total_bits):
    # Each combination either gives 2**total_bits sorted values (padded to 256) or a ValueError that
    # names the fix, never the construction's own size mismatch.
    for signed in (True, False):
        for exponent_bits in range(1, total_bits + 1):
            try:
                code = create_dynamic_map(signed=signed, max_exponent_bits=exponent_bits, total_bits=total_bits)
            except ValueError as e:
                assert "max_exponent_bits" in str(e) and "internal" not in str(e)
                continue
            assert code.numel() == 256 and bool((code[1:] >= code[:-1]).all())
