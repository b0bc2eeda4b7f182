"""Hypothesis fuzzing of the quantization ops: native (every CPU level) against the reference, bit for bit.

Draws shapes (empty, 1, primes, larger than the block), dtypes, block sizes, strided views and special
values (NaN, +-Inf, subnormals, all-zero blocks, huge magnitudes). The default profile is derandomized
(fixed examples, CI); `KBIT_FUZZ_PROFILE=long python -m pytest tests/test_fuzz_quantize.py` runs a longer,
random one by hand.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kbit
from kbit.backends import cpu, reference
from kbit.formats import BLOCKSIZES_4BIT, create_dynamic_map

from conftest import assert_bitwise_equal

settings.register_profile("ci", max_examples=300, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("KBIT_FUZZ_PROFILE", "ci"))

SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e-40, -1e-42, 0.0, -0.0, 3e38, -3e38, 1e-30]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LEVELS = kbit.supported_cpu_capabilities()
CODE = create_dynamic_map()


@st.composite
def tensors(draw):
    n = draw(st.sampled_from([0, 1, 2, 3, 7, 13, 31, 63, 64, 65, 127, 257, 1021, 4099]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 1e-30, 1e30, 1e-3]))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    if n:
        for _ in range(draw(st.integers(0, 4))):
            x[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIALS))
        if draw(st.booleans()):  # an all-zero stretch
            a = draw(st.integers(0, n - 1))
            x[a : a + draw(st.integers(1, 80))] = 0.0
    x = x.to(dtype)
    if n > 2 and draw(st.booleans()):  # a strided view
        x = torch.stack([x, x]).t().reshape(-1)[::2].clone()[: n].as_strided((n // 2,), (2,))
    return x


@given(x=tensors(), blocksize=st.sampled_from([1, 5, 64, 256, 4096, 100_000]))
def test_fuzz_blockwise_native_equals_reference(x, blocksize):
    want_codes, want_absmax = reference.quantize_blockwise(x, CODE, blocksize)
    want_out = reference.dequantize_blockwise(want_codes, want_absmax, CODE, blocksize, x.dtype)
    for level in LEVELS:
        with kbit.cpu_capability(level):
            codes, absmax = cpu.quantize_blockwise(x, CODE, blocksize)
            assert_bitwise_equal(codes, want_codes, f"codes [{level}]")
            assert_bitwise_equal(absmax, want_absmax, f"absmax [{level}]")
            out = cpu.dequantize_blockwise(want_codes, want_absmax, CODE, blocksize, x.dtype)
            assert_bitwise_equal(out, want_out, f"dequantized [{level}]")


@given(x=tensors(), blocksize=st.sampled_from(BLOCKSIZES_4BIT), quant_type=st.sampled_from(["nf4", "fp4"]),
       storage=st.sampled_from([torch.uint8, torch.bfloat16, torch.float32]))
def test_fuzz_4bit_native_equals_reference(x, blocksize, quant_type, storage):
    want_packed, want_absmax = reference.quantize_4bit(x, blocksize, quant_type, storage)
    shape = list(x.shape)
    want_out = reference.dequantize_4bit(want_packed, want_absmax, blocksize, quant_type, shape, x.dtype)
    for level in LEVELS:
        with kbit.cpu_capability(level):
            packed, absmax = cpu.quantize_4bit(x, blocksize, quant_type, storage)
            assert_bitwise_equal(packed.view(torch.uint8), want_packed.view(torch.uint8), f"packed [{level}]")
            assert_bitwise_equal(absmax, want_absmax, f"absmax [{level}]")
            out = cpu.dequantize_4bit(want_packed, want_absmax, blocksize, quant_type, shape, x.dtype)
            assert_bitwise_equal(out, want_out, f"dequantized [{level}]")


def test_fuzz_profile_is_fixed_in_ci():
    """The default profile must be derandomized, so CI always runs the same examples."""
    if os.environ.get("KBIT_FUZZ_PROFILE", "ci") == "ci":
        assert settings.default.derandomize and settings.default.max_examples >= 300
