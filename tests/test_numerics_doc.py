"""Every claim of docs/numerics.md, pinned: NaN/Inf gradients in each optimizer (32-bit, 8-bit blockwise and
tensor-wise, percentile clipping) and the helpers that find and clear poisoned state; NaN/Inf/huge/subnormal
values and all-zero blocks in 8-bit and 4-bit quantization; rounding; reproducibility across thread counts and
CPU kernel levels. The section of the document each test pins is named in its docstring.
"""

from __future__ import annotations

import pytest
import torch

import kbit
import kbit.functional as F
import kbit.optim as O
from conftest import CPU_LEVELS, assert_bitwise_equal
from kbit.backends import reference_optim

NAN, INF = float("nan"), float("inf")
N = 1000  # 4 blocks of 256 (the last one partial)
BAD = 300  # an element of block 1 (elements 256..511)
BLOCK = slice(256, 512)

#: One row per update rule: (id, class, kwargs). min_8bit_size=0 so that N-element parameters get 8-bit state.
RULES = [
    ("Adam", O.Adam, {}), ("AdamW", O.AdamW, {}), ("Lion", O.Lion, {}),
    ("SGD", O.SGD, dict(lr=0.01, momentum=0.9)), ("RMSprop", O.RMSprop, dict(lr=0.01)),
    ("Adagrad", O.Adagrad, dict(lr=0.01)), ("AdEMAMix", O.AdEMAMix, {}),
    ("LAMB", O.LAMB, {}), ("LARS", O.LARS, dict(lr=0.01, momentum=0.9)),
]
RULE_IDS = [r[0] for r in RULES]


def _grad(seed, bad=None):
    g = torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.01
    if bad is not None:
        g[BAD] = bad
    return g


def _run(cls, kwargs, bits, bad, good_steps_after=3, **extra):
    """One good step, one step whose gradient has `bad` at BAD, then `good_steps_after` good steps."""
    p = torch.nn.Parameter(torch.randn(N, generator=torch.Generator().manual_seed(0)) * 0.1)
    opt = cls([p], optim_bits=bits, min_8bit_size=0, **kwargs, **extra)
    p.grad = _grad(1)
    opt.step()
    p.grad = _grad(2, bad)
    opt.step()
    after_bad = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    for i in range(good_steps_after):
        p.grad = _grad(3 + i)
        opt.step()
    return p, opt, after_bad


def _state_values(state: dict, key: str) -> torch.Tensor:
    """A state as float values per element (rows stacked first), dequantized when 8-bit."""
    s = state[key]
    if s.dtype != torch.uint8:
        return s.reshape(-1, N)
    j = key[-1]
    scales = state.get(f"absmax{j}", state.get(f"max{j}"))
    rows = s.numel() // N
    qmap = state[f"qmap{j}"]
    blocks = scales.reshape(rows, -1)
    blocksize = 256 if f"absmax{j}" in state else N
    scale = blocks.repeat_interleave(blocksize, dim=1)[:, :N]
    return qmap[s.reshape(rows, N).long()] * scale


# ---- "NaN and Inf gradients": 32-bit state ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("rule", RULES, ids=RULE_IDS)
def test_32bit_bad_gradient_poisons_only_its_element(rule, bad):
    """numerics.md, 32-bit state: a non-finite gradient element makes that element's state non-finite (and its
    parameter, except with Lion and +-Inf: its sign update moves by lr); every other element stays finite."""
    _, cls, kwargs = rule
    p, opt, (p_bad, state_bad) = _run(cls, kwargs, 32, bad)
    others = torch.ones(N, dtype=torch.bool)
    others[BAD] = False
    assert bool(torch.isfinite(p[others]).all())
    for key in ("state1", "state2"):
        if key in opt.state[p]:
            values = _state_values(opt.state[p], key)
            assert bool(torch.isfinite(values[:, others]).all()), key
    assert not bool(torch.isfinite(_state_values(state_bad, "state1")[:, BAD]).all())
    if rule[0] == "Lion" and bad != bad or rule[0] != "Lion":  # Lion: sign(NaN) is NaN, sign(+-Inf) is +-1
        assert not bool(torch.isfinite(p_bad[BAD]))
    else:
        assert bool(torch.isfinite(p[BAD]))


# ---- 8-bit blockwise state --------------------------------------------------------------------------------
RULES_8BIT_BLOCKWISE = [r for r in RULES if r[0] not in ("LAMB", "LARS")]  # LAMB/LARS: tensor-wise 8-bit state


@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("rule", RULES_8BIT_BLOCKWISE, ids=[r[0] for r in RULES_8BIT_BLOCKWISE])
def test_8bit_blockwise_bad_gradient_poisons_its_block_for_good(rule, bad):
    """numerics.md, 8-bit blockwise state: the block's absmax becomes NaN/Inf at the bad step; from the next
    step on, all 256 parameters of the block are NaN, and stay so. Other blocks are untouched."""
    _, cls, kwargs = rule
    p, opt, (_, state_bad) = _run(cls, kwargs, 8, bad)
    scales = state_bad["absmax1"].reshape(-1, 4)
    assert not bool(torch.isfinite(scales[:, 1]).all())
    assert bool(torch.isnan(p[BLOCK]).all())
    outside = torch.cat([p[:256], p[512:]])
    assert bool(torch.isfinite(outside).all())
    found = O.find_nonfinite_state(opt)
    assert found and found[0].parameter_nonfinite == 256 and found[0].values == 256 * (2 if rule[0] == "AdEMAMix" else 1)


@pytest.mark.parametrize("cls", [O.Adam, O.Lion], ids=["Adam4bit", "Lion4bit"])
def test_4bit_bad_gradient_poisons_its_block_of_128(cls):
    """numerics.md, 4-bit state: as 8-bit blockwise, with blocks of 128 (elements 256..383 hold BAD = 300)."""
    p, opt, _ = _run(cls, {}, 4, NAN)
    assert bool(torch.isnan(p[256:384]).all())
    assert bool(torch.isfinite(p[:256]).all()) and bool(torch.isfinite(p[384:]).all())
    found = O.find_nonfinite_state(opt)
    assert found and all(f.values == 128 and f.parameter_nonfinite == 128 for f in found)


@pytest.mark.parametrize("cls, kwargs", [(O.LAMB, {}), (O.Adam, dict(block_wise=False))], ids=["LAMB", "Adam-tensorwise"])
def test_8bit_tensorwise_bad_gradient_poisons_the_whole_tensor(cls, kwargs):
    """numerics.md, 8-bit tensor-wise state (block_wise=False, LAMB, LARS): one scale per tensor, so the whole
    parameter is lost."""
    p, opt, _ = _run(cls, kwargs, 8, NAN)
    assert bool(torch.isnan(p).all())
    assert O.find_nonfinite_state(opt)[0].values == N


def test_find_and_reset_nonfinite_state_recovers_training():
    """numerics.md, finding and clearing poisoned state: find_nonfinite_state names the parameter and state;
    after restoring the parameter and reset_nonfinite_state, training continues with finite values."""
    p, opt, _ = _run(O.AdamW, {}, 8, NAN, good_steps_after=0)
    found = O.find_nonfinite_state(opt)
    assert [(f.group, f.index, f.key) for f in found] == [(0, 0, "state1"), (0, 0, "state2")]
    assert found[0].parameter_nonfinite == 1  # only the bad element so far: the block follows on the next step
    with torch.no_grad():
        p[BAD] = 0.0  # the caller restores the parameter (here: the one bad element)
    reset = O.reset_nonfinite_state(opt)
    assert len(reset) == 2 and O.find_nonfinite_state(opt) == []
    for i in range(5):
        p.grad = _grad(10 + i)
        opt.step()
    assert bool(torch.isfinite(p).all()) and O.find_nonfinite_state(opt) == []


def test_reset_of_32bit_state_zeroes_only_nonfinite_values():
    p, opt, _ = _run(O.Adam, {}, 32, INF, good_steps_after=0)
    before = opt.state[p]["state1"].clone()
    O.reset_nonfinite_state(opt)
    after = opt.state[p]["state1"]
    assert after[BAD] == 0 and torch.equal(torch.cat([after[:BAD], after[BAD + 1:]]),
                                           torch.cat([before[:BAD], before[BAD + 1:]]))


def test_percentile_clipping_keeps_its_history_finite_but_not_the_step():
    """numerics.md, percentile clipping: a non-finite gradient norm is not recorded (the 100-step history stays
    usable) and the gradient is not scaled, so the bad element still reaches the state as above."""
    p, opt, _ = _run(O.Adam, {}, 32, NAN, good_steps_after=2, percentile_clipping=90)
    assert bool(torch.isfinite(opt.state[p]["gnorm_vec"]).all())
    assert bool(torch.isnan(p[BAD])) and int(torch.isnan(p).sum()) == 1


# ---- quantization of special values ----------------------------------------------------------------------
def _roundtrip_8bit(x, blocksize):
    codes, qs = F.quantize_blockwise(x, blocksize=blocksize)
    return qs.absmax, F.dequantize_blockwise(codes, qs)


def _roundtrip_4bit(x, blocksize, quant_type):
    packed, qs = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return qs.absmax, F.dequantize_4bit(packed, qs)


def _roundtrips(x, blocksize):
    yield "8bit", *_roundtrip_8bit(x, blocksize)
    for qt in ("nf4", "fp4"):
        yield qt, *_roundtrip_4bit(x, blocksize, qt)


def _two_blocks(first):
    """A block of 32 built around `first`, then a normal block of 32."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, generator=g)
    x[: len(first)] = torch.tensor(first)
    return x


def test_nan_weight_makes_its_whole_block_nan():
    """numerics.md, NaN: the block's absmax is NaN and every value of the block dequantizes to NaN; other
    blocks are exact as usual."""
    x = _two_blocks([1.0, NAN, 0.5])
    for kind, absmax, out in _roundtrips(x, 32):
        assert torch.isnan(absmax[0]) and bool(torch.isnan(out[:32]).all()), kind
        assert bool(torch.isfinite(out[32:]).all()), kind


@pytest.mark.parametrize("inf", [INF, -INF], ids=["+inf", "-inf"])
def test_inf_weight_makes_its_block_nan_and_itself_minus_inf(inf):
    """numerics.md, Inf: absmax is Inf; the other values scale to 0 and dequantize to 0 * Inf = NaN; the Inf
    itself scales to Inf/Inf = NaN, takes code 0 and dequantizes to -Inf whatever its sign (NF4 and 8-bit;
    FP4's code 0 is +0, so it gives NaN)."""
    x = _two_blocks([1.0, inf, 0.5])
    for kind, absmax, out in _roundtrips(x, 32):
        assert absmax[0] == INF, kind
        others = torch.cat([out[:1], out[2:32]])
        assert bool(torch.isnan(others).all()), kind
        if kind == "fp4":
            assert torch.isnan(out[1])
        else:
            assert out[1] == -INF, kind
        assert bool(torch.isfinite(out[32:]).all()), kind


def test_all_zero_block_has_absmax_zero_and_dequantizes_to_zero():
    """numerics.md, all-zero blocks: absmax is 0 (no division by zero: the reciprocal is taken as 0), every
    value dequantizes to +0.0 (the sign of -0.0 is not kept)."""
    x = _two_blocks([0.0] * 31 + [-0.0])
    for kind, absmax, out in _roundtrips(x, 32):
        assert absmax[0] == 0, kind
        assert_bitwise_equal(out[:32], torch.zeros(32), kind)


def test_huge_values_round_trip_finite():
    """numerics.md, huge magnitudes: values up to float32's max quantize without overflow; the block's absmax
    element comes back exactly, the rest with the format's usual relative error."""
    big = torch.finfo(torch.float32).max
    x = _two_blocks([big, -3e38, 1e38, 1.0])
    for kind, absmax, out in _roundtrips(x, 32):
        assert absmax[0] == big and out[0] == big, kind
        assert bool(torch.isfinite(out).all()), kind
    half = torch.tensor([60000.0, 65504.0, -65504.0, 1.0], dtype=torch.float16)
    for kind, absmax, out in _roundtrips(half, 64):
        assert out.dtype == torch.float16 and bool(torch.isfinite(out).all()) and out[1] == 65504, kind


def test_subnormal_blocks_stay_finite_and_shrink():
    """numerics.md, subnormals: a block whose absmax is below ~2.9e-39 has no finite float32 reciprocal; it is
    scaled by float32's max instead, so its values dequantize finite, with their sign, never larger in magnitude
    (and much smaller: precision is lost). Subnormals next to normal values quantize to about 0 as usual."""
    x = torch.tensor([1e-40, -2e-41, 5e-42, 0.0] * 8)
    for kind, absmax, out in _roundtrips(x, 32):
        assert absmax[0] == torch.tensor(1e-40), kind
        assert bool(torch.isfinite(out).all()), kind
        assert bool((out.abs() <= x.abs()).all()), kind
        assert bool((torch.sign(out) * torch.sign(x) >= 0).all()), kind
    mixed = torch.tensor([1.0, 1e-40, -1e-41, 3e-39] * 8)
    for kind, absmax, out in _roundtrips(mixed, 32):
        assert absmax[0] == 1 and bool((out[1::4] == 0).all() & (out[2::4] == 0).all() & (out[3::4] == 0).all()), kind


# ---- rounding ---------------------------------------------------------------------------------------------
def test_codes_are_nearest_and_midpoints_go_to_the_lower_code():
    """numerics.md, rounding: a scaled value gets the nearest code; exactly on the float32 midpoint of two codes
    it gets the lower one (8-bit dynamic map and NF4; bitsandbytes' CUDA rule)."""
    code = F.create_dynamic_map()
    i = 200
    mid = (code[i] + code[i + 1]) / 2
    x = torch.tensor([mid.item(), 1.0])  # absmax 1: scaled values are the values
    codes, _ = F.quantize_blockwise(x, blocksize=2)
    assert codes[0] == i
    above = torch.nextafter(mid, torch.tensor(2.0))
    assert F.quantize_blockwise(torch.tensor([above.item(), 1.0]), blocksize=2)[0][0] == i + 1
    nf4 = F.get_4bit_type("nf4")
    mid4 = (nf4[9] + nf4[10]) / 2
    packed, _ = F.quantize_4bit(torch.tensor([mid4.item(), 1.0]), blocksize=32, quant_type="nf4")
    assert packed.view(-1)[0] >> 4 == 9  # first value in the high nibble


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_each_write_rounds_once_to_nearest_even(dtype):
    """numerics.md, rounding: results are computed in float32 and rounded once, to nearest-even, when written in
    a 16-bit dtype: dequantized values, and optimizer parameters."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    codes, qs = F.quantize_blockwise(x, blocksize=256)
    want = F.dequantize_blockwise(codes, qs).to(dtype)  # float32 result, then one RNE rounding
    qs.dtype = dtype
    assert_bitwise_equal(F.dequantize_blockwise(codes, qs), want)
    packed, qs4 = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    qs4.dtype = torch.float32
    want = F.dequantize_4bit(packed, qs4).to(dtype)
    qs4.dtype = dtype
    assert_bitwise_equal(F.dequantize_4bit(packed, qs4), want)
    # An optimizer step on 16-bit parameters: the reference computes in float32 and rounds once (Tensor.copy_).
    p = x[:1000].to(dtype)
    args = ([p], [(x[1000:2000] * 0.01).to(dtype)], [torch.zeros(1000)], [torch.zeros(1000)], [], [], [], 0, [1e-3],
            [1], [1.0], [], 0.9, 0.999, 1e-8, 0.0, 0.0, False, True)
    ref = tuple([t.clone() if isinstance(t, torch.Tensor) else t for t in a] if isinstance(a, list) else a
                for a in args)
    torch.ops.kbit.adam_step_(*args)
    reference_optim.adam_step_(*ref)
    assert_bitwise_equal(args[0][0], ref[0][0])


# ---- reproducibility --------------------------------------------------------------------------------------
def _quantization_outputs():
    x = torch.randn(3, 70_001, generator=torch.Generator().manual_seed(9))
    codes, qs = F.quantize_blockwise(x, blocksize=4096)
    packed, qs4 = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = x[:, :4096].reshape(-1, 256)[:96]
    pw, qw = F.quantize_4bit(w, quant_type="fp4")
    A = torch.randn(8, 256, generator=torch.Generator().manual_seed(10)).bfloat16()
    return [codes, qs.absmax, F.dequantize_blockwise(codes, qs), packed, qs4.absmax, F.dequantize_4bit(packed, qs4),
            kbit.matmul_4bit(A[:1], pw, qw), kbit.matmul_4bit(A, pw, qw)]


def _optimizer_outputs():
    outs = []
    for cls, kw, dtype in [(O.AdamW8bit, dict(min_8bit_size=0), torch.float32), (O.LAMB, {}, torch.float32),
                           (O.Lion8bit, dict(min_8bit_size=0), torch.float32),
                           (O.AdamW, dict(percentile_clipping=95), torch.float32), (O.AdamW4bit, {}, torch.float32),
                           (O.AdamW8bit, dict(min_8bit_size=0, bf16_stochastic_round=True), torch.bfloat16)]:
        torch.manual_seed(0)  # the stochastic-rounding seed is drawn from torch's generator
        p = torch.nn.Parameter((torch.randn(70_001, generator=torch.Generator().manual_seed(11)) * 0.1).to(dtype))
        opt = cls([p], **kw)
        for i in range(3):
            p.grad = (torch.randn(70_001, generator=torch.Generator().manual_seed(20 + i)) * 0.01).to(dtype)
            opt.step()
        outs += [p.detach().clone()] + [v.clone() for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    return outs


@pytest.mark.parametrize("outputs", [_quantization_outputs, _optimizer_outputs], ids=["quantization", "optimizers"])
def test_same_bits_at_every_thread_count_and_cpu_level(outputs):
    """numerics.md, reproducibility: quantization, dequantization, the 4-bit matmul (fused and tiled) and optimizer
    steps (8-bit, 4-bit and 32-bit state; trust ratios, percentile clipping, stochastic rounding) give the same bits with 1, 2 or 3 threads and at every
    CPU kernel level."""
    threads = torch.get_num_threads()
    want = outputs()
    try:
        for level in CPU_LEVELS:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                with kbit.cpu_capability(level):
                    got = outputs()
                for i, (a, b) in enumerate(zip(got, want)):
                    assert_bitwise_equal(a, b, f"output {i} at {level} with {n} threads")
    finally:
        torch.set_num_threads(threads)
