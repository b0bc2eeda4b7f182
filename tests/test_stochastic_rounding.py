"""bf16 stochastic rounding (``bf16_stochastic_round=True``, Note [stochastic rounding]): the native kernels
equal the pure-PyTorch reference bit for bit at every CPU level and thread count; the rounding is unbiased
and only ever picks one of the two neighbouring bfloat16 values; every optimizer accepts the setting;
checkpoints resume the same random sequence; and it un-stalls updates smaller than bfloat16's resolution."""

from __future__ import annotations

import io

import pytest
import torch

import kbit
import kbit.optim as O
from conftest import CPU_LEVELS, assert_bitwise_equal
from kbit.backends import reference_optim as R
from kbit.optim.stochastic_rounding import step_seed
from optim_cases import ALL_OPTIMIZER_CLASSES
from test_optim_numerics import MODES, OPS, TAIL_SIZES, _clone_args, _hyper, _mutable, _op_args, _op_inputs


def _seeds(n: int) -> list[int]:
    return [step_seed(1234, 0, i, 7) for i in range(n)]


@pytest.mark.parametrize("variant", ["plain", "decay-skip-scale"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", OPS)
def test_native_op_equals_reference_op_with_stochastic_rounding(name, mode, variant, cpu_level):
    args = _op_args(name, _op_inputs(name, mode, torch.bfloat16, TAIL_SIZES, seed=OPS.index(name)), mode,
                    _hyper(variant))
    ref_args = _clone_args(args)
    seeds = _seeds(len(args[0]))
    getattr(torch.ops.kbit, name)(*args, sr_seed=seeds)
    getattr(R, name)(*ref_args, sr_seed=seeds)
    for i, (a, b) in enumerate(zip(_mutable(args), _mutable(ref_args))):
        assert_bitwise_equal(a, b, f"{name} {mode} tensor {i}")


@pytest.mark.parametrize("mode", MODES)
def test_same_bits_at_every_thread_count(mode):
    """The random bits depend on the element index only: 1 and 2 threads (different work splits) agree."""
    sizes = [70_001, 120_000]  # several OpenMP work items of 32k elements each
    inputs = _op_inputs("adam_step_", mode, torch.bfloat16, sizes, seed=5)
    outputs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            args = _clone_args(_op_args("adam_step_", inputs, mode, _hyper("plain")))
            torch.ops.kbit.adam_step_(*args, sr_seed=_seeds(len(args[0])))
            outputs.append(_mutable(args))
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(*outputs)):
        assert_bitwise_equal(a, b, f"tensor {i}")


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    torch.manual_seed(0)
    x = torch.randn(400_000) * 10
    r = R.round_bf16_stochastic(x, seed=99)
    # Both neighbours in magnitude: truncation (toward zero) and one bf16 ulp further out.
    trunc = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    up = ((x.view(torch.int32) & ~0xFFFF) + 0x10000).view(torch.float32)
    assert bool(((r.float() == trunc) | (r.float() == up)).all())
    # Unbiased: the mean error over many values vanishes (each error is at most one ulp ~ |x| / 128).
    err = (r.float() - x).double()
    assert abs(err.mean().item()) < 4 * (err.std().item() / len(x) ** 0.5)
    # Probability of rounding out is the dropped fraction: for x = 1 + ulp/8 it is 1/8.
    y = torch.full((200_000,), 1.0 + 2**-10)
    frac_up = (R.round_bf16_stochastic(y, seed=3).float() > 1.0).double().mean().item()
    assert abs(frac_up - 0.125) < 0.005


def test_exact_values_and_specials_round_to_themselves():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, float("inf"), float("-inf")]).to(torch.bfloat16).float()
    r = R.round_bf16_stochastic(exact, seed=1)
    assert torch.equal(r.float().view(torch.int32), exact.view(torch.int32))
    nan = R.round_bf16_stochastic(torch.tensor([float("nan"), -float("nan")]), seed=1)
    assert nan.view(torch.int16).tolist() == [0x7FC0, 0x7FC0]


def _lowbias32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_random_bits_match_their_definition_above_2_to_the_32():
    index = torch.tensor([0, 1, 2**31 + 7, 2**32 - 1, 2**32, 2**32 + 12345, 2**40 + 3], dtype=torch.int64)
    got = R.sr_bits_at(0xDEADBEEF, index).tolist()
    want = [_lowbias32(_lowbias32((i & 0xFFFFFFFF) ^ 0xDEADBEEF) ^ (i >> 32)) for i in index.tolist()]
    assert got == want


def _bf16_params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in shapes]


def _run(cls, params, steps, seed=0, **kw):
    opt = cls(params, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("cls", ALL_OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_every_optimizer_accepts_the_setting(cls):
    """Each class takes bf16_stochastic_round, and with it moves bf16 parameters by updates that round to
    nearest would lose (lr 1e-4 steps against an ulp of ~1/128 at |p| ~ 1)."""
    kw = {"lr": 1e-4}
    if cls.__name__ in ("SGD", "SGD8bit", "SGD32bit", "LARS", "LARS8bit", "LARS32bit"):
        kw["momentum"] = 0.9
    shapes = [(64, 80), (33,)]  # 5120 elements: 8-bit state; 33: 32-bit state
    torch.manual_seed(0)
    sr = _bf16_params(shapes)
    rne = _bf16_params(shapes)
    _run(cls, sr, 3, bf16_stochastic_round=True, **kw)
    _run(cls, rne, 3, **kw)
    start = _bf16_params(shapes)
    moved_sr = sum(int((a != b).sum()) for a, b in zip(sr, start))
    moved_rne = sum(int((a != b).sum()) for a, b in zip(rne, start))
    assert moved_sr > moved_rne, f"{cls.__name__}: {moved_sr} elements moved with stochastic rounding, {moved_rne} without"


def test_float32_parameters_are_unaffected_and_float16_rejected():
    p1 = [torch.nn.Parameter(torch.randn(5000))]
    p2 = [torch.nn.Parameter(p1[0].detach().clone())]
    _run(O.AdamW8bit, p1, 3, bf16_stochastic_round=True)
    _run(O.AdamW8bit, p2, 3)
    assert_bitwise_equal(p1[0].detach(), p2[0].detach(), "float32 parameter")
    with pytest.raises(ValueError, match="bfloat16 parameters"):
        _run(O.AdamW, [torch.nn.Parameter(torch.randn(10, dtype=torch.float16))], 1, bf16_stochastic_round=True)
    with pytest.raises(TypeError, match="True or False"):
        O.AdamW([torch.nn.Parameter(torch.randn(3))], bf16_stochastic_round="yes")


def test_setting_off_leaves_param_groups_as_bitsandbytes_writes_them():
    opt = O.AdamW8bit([torch.nn.Parameter(torch.randn(3))])
    assert "sr_seed" not in opt.param_groups[0] and "bf16_stochastic_round" not in opt.param_groups[0]


def test_seeded_runs_repeat_and_checkpoints_resume_the_same_sequence():
    shapes = [(96, 70), (17,)]
    torch.manual_seed(3)
    a = _bf16_params(shapes)
    opt_a = _run(O.AdamW8bit, a, 6, bf16_stochastic_round=True)
    torch.manual_seed(3)
    b = _bf16_params(shapes)
    opt_b = _run(O.AdamW8bit, b, 3, bf16_stochastic_round=True)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in b], "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(12345)  # a different global seed: the resumed run must not depend on it
    c = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt_c = O.AdamW8bit(c, bf16_stochastic_round=True)
    opt_c.load_state_dict(saved["opt"])
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # replay the first run's first 3 gradient draws, then continue with the next 3
        for p in c:
            torch.randn(p.shape, generator=g)
    for _ in range(3):
        for p in c:
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)
        opt_c.step()
    for x, y in zip(a, c):
        assert_bitwise_equal(y.detach(), x.detach(), "resumed parameter")
    del opt_a


def test_stochastic_rounding_unstalls_small_updates():
    """A bf16 linear regression at a learning rate far below bf16's resolution: round to nearest never moves
    the weights; stochastic rounding trains as far as float32 weights do."""
    torch.manual_seed(0)
    n_in, n_out = 64, 32
    w_true = torch.sign(torch.randn(n_out, n_in)) * (1 + torch.rand(n_out, n_in))  # |w| in [1, 2): ulp 2^-7
    x = torch.randn(512, n_in)
    y = x @ w_true.t()
    w0 = w_true + 0.03 * torch.randn(n_out, n_in)

    def train(dtype, sr):
        w = torch.nn.Parameter(w0.clone().to(dtype))
        opt = O.Adam([w], lr=2e-4, bf16_stochastic_round=sr)
        for _ in range(200):
            loss = (x.to(dtype) @ w.t() - y.to(dtype)).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (x @ w.detach().float().t() - y).square().mean().item()

    loss0 = (x @ w0.t() - y).square().mean().item()
    rne, sr, fp32 = train(torch.bfloat16, False), train(torch.bfloat16, True), train(torch.float32, False)
    assert rne > 0.99 * loss0, (loss0, rne)  # stalled: updates of 2e-4 vs half an ulp of 4e-3
    assert sr < 0.3 * loss0 and sr < 0.3 * rne, (loss0, rne, sr, fp32)
    assert abs(sr - fp32) < 0.1 * loss0, (sr, fp32)  # bf16 weights keep a quantization floor fp32 has not
