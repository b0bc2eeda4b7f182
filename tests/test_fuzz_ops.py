"""Hypothesis fuzzing of the optimizer ops and the 4-bit matmul/dequantize ops: native (every CPU level) against
the pure-PyTorch reference.

- Optimizer ops (every rule, 32-bit / 8-bit blockwise / 8-bit tensor-wise / 4-bit, every parameter dtype, bf16
  stochastic rounding on and off): parameters,
  gradients, states and absmax seeded with special values (NaN, +-Inf, subnormals, huge magnitudes, exact zeros,
  all-zero blocks, zero absmax) must give the reference's bits (NaN equals any NaN), as test_optim_numerics.py
  requires for ordinary values. Trust ratios (max_unorm > 0) are fuzzed by test_optim_numerics.py's tolerance
  tests; here they stay off, so the comparison can be bit for bit.
- gemm_4bit (fused rows and tiled GEMM; plain and double-quantized scales; bias; strided, 3-D and 16-bit inputs
  with NaN/Inf/zero rows): finite outputs within test_linear4bit.py's tolerances, the same non-finite positions,
  and the same bits at every CPU level.
- dequantize ops with strided inputs and outputs and special absmax values (0, NaN, Inf, subnormal): bit for bit.

The default profile is derandomized (fixed examples, CI, ~30 s); ``KBIT_FUZZ_PROFILE=long`` runs a longer random
one by hand.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kbit
from conftest import CPU_LEVELS, assert_bitwise_equal
from kbit.backends import cpu, reference, reference_optim
from kbit.formats import (BLOCKSIZES_4BIT, OPTIMIZER_4BIT_SIGNED_MAP, OPTIMIZER_4BIT_UNSIGNED_MAP,
                          OPTIMIZER_BLOCKSIZE_4BIT, create_dynamic_map)
from test_optim_numerics import MODES, OPS, _clone_args, _mutable, _op_args, _op_inputs

PROFILE = os.environ.get("KBIT_FUZZ_PROFILE", "ci")
#: Examples per test in each profile (the CI one keeps this module under ~30 s on two cores).
EXAMPLES = {"ci": {"optim": 300, "gemm": 120, "dequant": 150}, "long": {"optim": 3000, "gemm": 1500, "dequant": 2000}}


def _settings(kind: str):
    return settings(max_examples=EXAMPLES[PROFILE][kind], derandomize=PROFILE == "ci", deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


SPECIALS = [float("nan"), float("inf"), float("-inf"), 1e-40, -1e-42, 0.0, -0.0, 1e30, -1e30, 3e38]
#: Ops with 4-bit states: rows per state storage, signed map per storage.
LAYOUT_4BIT = {"adam_step_": ((1, 1), (True, False)), "lion_step_": ((1,), (True,)), "momentum_step_": ((1,), (True,))}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODE = create_dynamic_map()


def _poke(draw, t: torch.Tensor, values, max_hits=4) -> None:
    """Write a few drawn special values at drawn positions of ``t`` (in place, through its flat view)."""
    flat = t.view(-1)
    if flat.numel() == 0:
        return
    for _ in range(draw(st.integers(0, max_hits))):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(values))


# ---- optimizer ops ----------------------------------------------------------------------------------------
@st.composite
def _optim_calls(draw):
    name, mode, dtype = draw(st.sampled_from(OPS)), draw(st.sampled_from(MODES)), draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 7, 17, 255, 256, 257, 600, 4097]), min_size=1, max_size=3))
    inputs = _op_inputs(name, mode, dtype, sizes, seed=draw(st.integers(0, 2**31 - 1)), extra_2d=False)
    params, grads, states, absmaxes, _, t = inputs
    for g in grads:
        _poke(draw, g, SPECIALS)
    for p in params:
        _poke(draw, p, SPECIALS, max_hits=2)
    for per_state in states:
        for s in per_state:
            if s.dtype == torch.float32:
                _poke(draw, s, SPECIALS, max_hits=2)
            elif draw(st.booleans()):  # an all-zero stretch of codes (the map's -1 / 0 entries)
                a = draw(st.integers(0, s.numel() - 1))
                s.view(-1)[a: a + 300] = draw(st.sampled_from([0, 127, 255]))
    for per_state in absmaxes:
        for a in per_state:
            _poke(draw, a, [0.0, float("nan"), float("inf"), 1e-40, 1e30], max_hits=2)
    t["gnorm_scale"] = [draw(st.sampled_from([1.0, 0.5, 0.0, 1e-30])) for _ in sizes]
    t["step"] = [draw(st.sampled_from([1, 2, 10, 10_000])) for _ in sizes]
    t["lr"] = [draw(st.sampled_from([0.0, 1e-3, 0.1])) for _ in sizes]
    h = dict(beta1=draw(st.sampled_from([0.0, 0.9])), beta2=draw(st.sampled_from([0.0, 0.999])), lion_beta2=0.99,
             momentum=draw(st.sampled_from([0.5, 0.9])), rms_alpha=draw(st.sampled_from([0.0, 0.9])),
             eps=draw(st.sampled_from([0.0, 1e-8])), adagrad_eps=1e-10,
             weight_decay=draw(st.sampled_from([0.0, 0.01])), skip_zeros=draw(st.booleans()),
             scale_gradients=True, bias_correction=draw(st.booleans()), dampening=draw(st.sampled_from([0.0, 0.1])),
             nesterov=draw(st.booleans()), lr_decay=draw(st.sampled_from([0.0, 0.01])), max_unorm=0.0, trust_eps=0.0)
    args = _op_args(name, inputs, mode, h)
    if dtype == torch.bfloat16 and draw(st.booleans()):  # bf16 stochastic rounding: one seed per tensor
        args = (*args, [draw(st.integers(0, 2**32 - 1)) for _ in sizes])
    return name, mode, args


@st.composite
def _optim_4bit_calls(draw):
    """4-bit states (Note [4-bit optimizer states]): two codes per byte, blocks of 128, 16-value maps."""
    name = draw(st.sampled_from(list(LAYOUT_4BIT)))
    dtype = draw(st.sampled_from(DTYPES))
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 127, 128, 129, 257, 1001]), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    params, grads = [], []
    for n in sizes:
        p, grad = torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g) * 0.01
        _poke(draw, p, SPECIALS, max_hits=2)
        _poke(draw, grad, SPECIALS)
        params.append(p.to(dtype))
        grads.append(grad.to(dtype))
    states, absmaxes, qmaps = [], [], []
    for r, sgn in zip(*LAYOUT_4BIT[name]):
        states.append([torch.randint(0, 256, (r * ((n + 1) // 2),), generator=g, dtype=torch.uint8) for n in sizes])
        per = [torch.rand(r * -(-n // OPTIMIZER_BLOCKSIZE_4BIT), generator=g) * 0.05 for n in sizes]
        for a in per:
            _poke(draw, a, [0.0, float("nan"), float("inf"), 1e-40, 1e30], 2)
        absmaxes.append(per)
        qmaps.append(torch.tensor(OPTIMIZER_4BIT_SIGNED_MAP if sgn else OPTIMIZER_4BIT_UNSIGNED_MAP))
    k = len(sizes)
    common = (OPTIMIZER_BLOCKSIZE_4BIT, [draw(st.sampled_from([0.0, 1e-3])) for _ in sizes],
              [draw(st.sampled_from([1, 3, 1000])) for _ in sizes], [draw(st.sampled_from([1.0, 0.0, 0.5])) for _ in sizes])
    wd, skip = draw(st.sampled_from([0.0, 0.05])), draw(st.booleans())
    if name == "adam_step_":
        args = (params, grads, states[0], states[1], absmaxes[0], absmaxes[1], qmaps, *common, [], 0.9, 0.999, 1e-8, wd,
                0.0, skip, draw(st.booleans()))
    elif name == "lion_step_":
        args = (params, grads, states[0], absmaxes[0], qmaps, *common, 0.9, 0.99, wd, skip)
    else:
        args = (params, grads, states[0], absmaxes[0], qmaps, *common, [], 0.9, draw(st.sampled_from([0.0, 0.2])), wd,
                draw(st.booleans()), 0.0, 0.0, skip)
    if dtype == torch.bfloat16 and draw(st.booleans()):
        args = (*args, [draw(st.integers(0, 2**32 - 1)) for _ in range(k)])
    return name, "4bit", args


@_settings("optim")
@given(st.one_of(_optim_calls(), _optim_4bit_calls()))
def test_fuzz_optimizer_ops_special_values_native_equals_reference(call):
    name, mode, args = call
    ref_args = _clone_args(args)
    getattr(reference_optim, name)(*ref_args)
    want = _mutable(ref_args)
    for level in CPU_LEVELS:
        got_args = _clone_args(args)
        with kbit.cpu_capability(level):
            getattr(torch.ops.kbit, name)(*got_args)
        for i, (a, b) in enumerate(zip(_mutable(got_args), want)):
            assert_bitwise_equal(a, b, f"{name} {mode} at {level}: tensor {i}")


@pytest.mark.parametrize("p, s", [(0.1541, float("nan")), (-0.0, -0.0)], ids=["nan-state", "negative-zero"])
def test_lion_sign_native_equals_reference(p, s):
    """Lion's sign() passes NaN and signed zeros through, natively and in the reference (found by this module: the
    reference used torch.sign, which maps both to +0.0)."""
    args = ([torch.tensor([p])], [torch.tensor([-0.0])], [torch.tensor([s])], [], [], 0, [1e-3], [1], [1.0], 0.9,
            0.99, 0.0, False)
    ref = _clone_args(args)
    torch.ops.kbit.lion_step_(*args)
    reference_optim.lion_step_(*ref)
    assert_bitwise_equal(args[0][0], ref[0][0], "parameter")


# ---- gemm_4bit --------------------------------------------------------------------------------------------
@st.composite
def _gemm_calls(draw):
    blocksize = draw(st.sampled_from(BLOCKSIZES_4BIT[:4]))
    K = draw(st.sampled_from([1, 3, 17, 32, 64, 100, 257]))
    N = draw(st.sampled_from([1, 2, 5, 33, 130]))
    M = draw(st.sampled_from([1, 2, 3, 4, 5, 9, 33]))  # <= 4: the fused kernel; more: the tiled GEMM
    quant_type = draw(st.sampled_from(["nf4", "fp4"]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    W = torch.randn(N, K, generator=g) * draw(st.sampled_from([1.0, 1e-3, 1e3]))
    if draw(st.booleans()):  # an all-zero stretch: zero absmax blocks
        a = draw(st.integers(0, N * K - 1))
        W.view(-1)[a: a + draw(st.integers(1, 2 * blocksize))] = 0.0
    nested = draw(st.booleans())
    packed, qs = kbit.functional.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type,
                                               compress_statistics=nested)
    A = torch.randn(M, K, generator=g)
    if draw(st.booleans()):  # special rows: NaN / Inf / zero / subnormal entries
        for _ in range(draw(st.integers(1, 3))):
            A[draw(st.integers(0, M - 1)), draw(st.integers(0, K - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1e-40]))
    A = A.to(dtype)
    shape = draw(st.sampled_from(["2d", "3d", "strided"]))
    if shape == "3d" and M % 3 == 0:
        A = A.reshape(3, M // 3, K)
    elif shape == "strided":
        A = torch.stack([A, torch.zeros_like(A)], dim=-1)[..., 0]  # last-dim stride 2
    bias = torch.randn(N, generator=g).to(dtype) if draw(st.booleans()) else None
    if nested:
        scales = dict(absmax=qs.state2.absmax, absmax_8bit=qs.absmax, absmax_code=qs.state2.code,
                      absmax_offset=qs.offset)
    else:
        scales = dict(absmax=qs.absmax)
    return (A, packed, [N, K], blocksize, quant_type, bias, scales)


@_settings("gemm")
@given(_gemm_calls())
def test_fuzz_gemm_4bit_native_matches_reference(call):
    A, packed, shapeB, blocksize, quant_type, bias, scales = call
    want = reference.gemm_4bit(A, packed, shapeB, blocksize=blocksize, quant_type=quant_type, bias=bias, **scales)
    outs = {}
    for level in CPU_LEVELS:
        with kbit.cpu_capability(level):
            outs[level] = torch.ops.kbit.gemm_4bit(A, packed, shapeB, blocksize=blocksize, quant_type=quant_type,
                                                   bias=bias, **scales)
    got = outs[CPU_LEVELS[0]]
    for level in CPU_LEVELS[1:]:
        assert_bitwise_equal(outs[level], got, f"gemm at {level} vs {CPU_LEVELS[0]}")
    assert got.shape == want.shape and got.dtype == want.dtype
    # Non-finite inputs give non-finite outputs in the same places (a NaN or Inf in a row reaches every output of
    # that row that a non-zero weight multiplies; Inf * 0 is NaN in both).
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    finite = torch.isfinite(want)
    bound = _gemm_error_bound(A, packed, shapeB, blocksize, quant_type, bias, scales, want)
    diff = (got.float() - want.float()).abs()
    assert bool((diff[finite] <= bound[finite]).all()), f"max excess {(diff - bound)[finite].max().item()}"


#: Per-element error bound of the native gemm against the reference. Both accumulate in float32 (summation order
#: differs: at most (K + 2) float32 roundings of the sum of |terms|). The reference rounds the dequantized weight to
#: A's dtype first (one rounding of each term: a half-ulp of the 16-bit dtype times the sum of |terms|), while the
#: fused kernel multiplies by the float32 weight; and a 16-bit output with a bias is rounded up to twice on one
#: side (product, then product + bias) and once on the other: three half-ulps of the output's magnitude.
OUTPUT_ROUNDINGS = 3


def _gemm_error_bound(A, packed, shapeB, blocksize, quant_type, bias, scales, want):
    N, K = shapeB
    absmax = reference.scales_4bit(scales["absmax"], scales.get("absmax_8bit"), scales.get("absmax_code"),
                                   scales.get("absmax_offset"))
    W = reference._dequantize_4bit(packed, absmax, blocksize, quant_type, [N, K], torch.float32)
    terms = A.float().abs().reshape(-1, K) @ W.abs().t()
    terms = terms.reshape(want.shape)
    magnitude = want.float().abs() + (bias.float().abs() if bias is not None else 0.0)
    eps_out = torch.finfo(want.dtype).eps / 2  # unit roundoff of the output dtype (also A's and the weight's)
    weight_rounding = eps_out if want.dtype != torch.float32 else 0.0
    return (OUTPUT_ROUNDINGS * eps_out * magnitude
            + ((K + 2) * torch.finfo(torch.float32).eps + weight_rounding) * terms)


# ---- dequantize ops: strides and special absmax -----------------------------------------------------------
@st.composite
def _dequant_calls(draw):
    n = draw(st.sampled_from([1, 2, 3, 63, 64, 65, 257, 1000, 4097]))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["8bit", "nf4", "fp4"]))
    if kind == "8bit":
        blocksize = draw(st.sampled_from([1, 7, 64, 256, 4096]))
        data = torch.randint(0, 256, (2 * n,), generator=g, dtype=torch.uint8)
        data = data[::2] if draw(st.booleans()) else data[:n]  # strided or contiguous codes
    else:
        blocksize = draw(st.sampled_from(BLOCKSIZES_4BIT))
        nbytes = (n + 1) // 2
        data = torch.randint(0, 256, (2 * nbytes,), generator=g, dtype=torch.uint8)
        data = (data[::2] if draw(st.booleans()) else data[:nbytes]).view(nbytes, 1)
    absmax = torch.rand(-(-n // blocksize), generator=g) * draw(st.sampled_from([1.0, 1e-30, 1e30]))
    _poke(draw, absmax, [0.0, float("nan"), float("inf"), 1e-40, 3e38])
    strided_out = draw(st.booleans())
    return kind, data, absmax, blocksize, n, dtype, strided_out


@_settings("dequant")
@given(_dequant_calls())
def test_fuzz_dequantize_strided_and_special_absmax_native_equals_reference(call):
    kind, data, absmax, blocksize, n, dtype, strided_out = call
    if kind == "8bit":
        want = reference.dequantize_blockwise(data, absmax, CODE, blocksize, dtype)
        run = lambda: cpu.dequantize_blockwise(data, absmax, CODE, blocksize, dtype)  # noqa: E731
        run_out = lambda out: torch.ops.kbit.dequantize_blockwise.out(data, absmax, CODE, blocksize, dtype,  # noqa: E731
                                                                       out=out)
    else:
        want = reference.dequantize_4bit(data, absmax, blocksize, kind, [n], dtype)
        run = lambda: cpu.dequantize_4bit(data, absmax, blocksize, kind, [n], dtype)  # noqa: E731
        run_out = lambda out: torch.ops.kbit.dequantize_4bit.out(data, absmax, blocksize, kind, [n], dtype,  # noqa: E731
                                                                  out=out)
    for level in CPU_LEVELS:
        with kbit.cpu_capability(level):
            assert_bitwise_equal(run(), want, f"{kind} dequantize at {level}")
            out = torch.full((2 * n,), 7.0, dtype=dtype)[::2] if strided_out else torch.empty(n, dtype=dtype)
            run_out(out)
            assert_bitwise_equal(out, want, f"{kind} dequantize out= at {level}")


def test_fuzz_profile_is_fixed_in_ci():
    """The default profile is derandomized, so CI always runs the same examples."""
    if PROFILE == "ci":
        assert _settings("optim").derandomize and _settings("gemm").derandomize


@pytest.mark.parametrize("name", OPS)
def test_special_value_inputs_cover_every_rule(name):
    """Sanity of the generator: every rule is reachable (a typo in OPS would silently skip one)."""
    assert hasattr(torch.ops.kbit, name) and hasattr(reference_optim, name)
