"""4-bit optimizer states (Note [4-bit optimizer states]; Adam4bit, AdamW4bit, Lion4bit, optim_bits=4): the
native fused kernels equal the pure-PyTorch reference bit for bit at every CPU level, dtype and odd size;
state is ~1.06 bytes per parameter; checkpoints resume bit for bit; unsupported settings are rejected; and
AdamW4bit trains a byte-level model on the standard library's sources to within 3% of torch's AdamW."""

from __future__ import annotations

import io
import math
import sysconfig
from pathlib import Path

import pytest
import torch

import kbit
import kbit.optim as O
from conftest import assert_bitwise_equal
from kbit.backends import reference_optim as R
from kbit.formats import OPTIMIZER_4BIT_SIGNED_MAP, OPTIMIZER_4BIT_UNSIGNED_MAP, OPTIMIZER_BLOCKSIZE_4BIT

#: Sizes around the 128-element blocks, odd counts (a final high nibble alone) and several work items.
SIZES = [1, 2, 3, 17, 127, 128, 129, 255, 257, 4097, 70_001]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: op -> (rows per state storage, signed map per storage)
LAYOUT = {"adam_step_": ((1, 1), (True, False)), "lion_step_": ((1,), (True,)), "momentum_step_": ((1,), (True,))}
#: AdamW4bit's state per parameter: two states of 4 bits plus a float32 absmax per 128 values each.
STATE_BYTES_PER_PARAM = 2 * (0.5 + 4 / OPTIMIZER_BLOCKSIZE_4BIT)


def _inputs(name, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows, signed = LAYOUT[name]
    params = [(torch.randn(n, generator=g) * 0.1).to(dtype) for n in SIZES]
    grads = []
    for n in SIZES:
        grad = torch.randn(n, generator=g) * 0.01
        grad[torch.rand(n, generator=g) < 0.1] = 0.0  # skip_zeros has something to skip
        grads.append(grad.to(dtype))
    states, absmaxes, qmaps = [], [], []
    for r, sgn in zip(rows, signed):
        states.append([torch.randint(0, 256, (r * ((n + 1) // 2),), generator=g, dtype=torch.uint8) for n in SIZES])
        absmaxes.append([torch.rand(r * math.ceil(n / OPTIMIZER_BLOCKSIZE_4BIT), generator=g) * (0.05 if sgn else 1e-4)
                         + 1e-6 for n in SIZES])
        qmaps.append(torch.tensor(OPTIMIZER_4BIT_SIGNED_MAP if sgn else OPTIMIZER_4BIT_UNSIGNED_MAP))
    return params, grads, states, absmaxes, qmaps


def _args(name, inputs, full):
    params, grads, states, absmaxes, qmaps = inputs
    n = len(params)
    common = (OPTIMIZER_BLOCKSIZE_4BIT, [1e-3 * (1 + 0.1 * i) for i in range(n)], [1 + (i % 4) * 3 for i in range(n)],
              [0.37 if full and i % 3 == 0 else 1.0 for i in range(n)])
    wd, skip = (0.05, True) if full else (0.0, False)
    if name == "adam_step_":
        return (params, grads, states[0], states[1], absmaxes[0], absmaxes[1], qmaps, *common, [], 0.9, 0.999, 1e-8,
                wd, 0.0, skip, not full)
    if name == "lion_step_":
        return (params, grads, states[0], absmaxes[0], qmaps, *common, 0.9, 0.99, wd, skip)
    return (params, grads, states[0], absmaxes[0], qmaps, *common, [], 0.9, 0.2 if full else 0.0, wd, full, 0.0, 0.0,
            skip)


def _clone(args):
    return tuple([t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
                 for a in args)


def _mutable(args):
    return [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("full", [False, True], ids=["plain", "decay-skip-scale"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("name", LAYOUT)
def test_native_4bit_op_equals_reference(name, dtype, full, cpu_level):
    args = _args(name, _inputs(name, dtype, seed=list(LAYOUT).index(name)), full)
    ref = _clone(args)
    getattr(torch.ops.kbit, name)(*args)
    getattr(R, name)(*ref)
    for i, (a, b) in enumerate(zip(_mutable(args), _mutable(ref))):
        assert_bitwise_equal(a, b, f"{name} tensor {i}")


#: 16-value maps for the search's edge cases: the defaults, two entries of 1.0 (a threshold at 1.0, so a value
#: scaled to just above 1 must be clamped first), values beyond [-1, 1], and thresholds a few ulps apart.
SPECIAL_4BIT_MAPS = {
    "default": None,
    "top-pair": lambda: torch.cat([torch.linspace(-1.0, 1.0, 15), torch.ones(1)]),
    "wide": lambda: torch.linspace(-3.0, 3.0, 16),
    "crowded": lambda: torch.cat([torch.linspace(-1.0, 1.0, 8), 0.5 + torch.arange(1, 9) * 2.0 ** -22]).sort().values,
}


@pytest.mark.parametrize("qmap", list(SPECIAL_4BIT_MAPS))
@pytest.mark.parametrize("name", ["adam_step_", "lion_step_"])
def test_native_4bit_op_equals_reference_special_blocks(name, qmap, cpu_level):
    """NaN and inf states, blocks whose 1 / absmax is subnormal (a scaled state can exceed 1) and unusual maps."""
    params, grads, states, absmaxes, qmaps = inputs = _inputs(name, torch.float32, seed=5)
    grads[9][128 * 3 + 1] = float("nan")
    grads[9][128 * 5 + 2] = float("inf")
    for absmax in absmaxes:
        absmax[10][4:8] = torch.tensor([1.1e38, 1.7e38, 2.3e38, 3.1e38])
    if SPECIAL_4BIT_MAPS[qmap] is not None:
        qmaps[:] = [SPECIAL_4BIT_MAPS[qmap]() for _ in qmaps]
    args = _args(name, inputs, False)
    ref = _clone(args)
    getattr(torch.ops.kbit, name)(*args)
    getattr(R, name)(*ref)
    for i, (a, b) in enumerate(zip(_mutable(args), _mutable(ref))):
        assert_bitwise_equal(a, b, f"{name} with the {qmap} map: tensor {i}")


def test_4bit_with_stochastic_rounding_equals_reference(cpu_level):
    args = _args("adam_step_", _inputs("adam_step_", torch.bfloat16, seed=9), False)
    ref = _clone(args)
    seeds = [1000 + i for i in range(len(args[0]))]
    torch.ops.kbit.adam_step_(*args, sr_seed=seeds)
    R.adam_step_(*ref, sr_seed=seeds)
    for i, (a, b) in enumerate(zip(_mutable(args), _mutable(ref))):
        assert_bitwise_equal(a, b, f"tensor {i}")


def test_codes_are_nearest_and_nibbles_in_weight_order():
    """One step from zero state: the stored codes are the nearest map entries of the reference's states, element
    2i in the high nibble (the order of 4-bit weights)."""
    p = torch.nn.Parameter(torch.randn(5001) * 0.1)
    opt = O.AdamW4bit([p], lr=1e-3)
    p.grad = torch.randn(5001) * 0.01
    opt.step()
    st = opt.state[p]
    assert st["state1"].shape == (2501,) and st["absmax1"].shape == (math.ceil(5001 / 128),)
    codes = torch.stack([st["state1"] >> 4, st["state1"] & 15], 1).reshape(-1)[:5001].long()
    m = st["qmap1"][codes] * st["absmax1"].repeat_interleave(128)[:5001]
    expected = 0.1 * p.grad  # m after one step from 0 (beta1 = 0.9)
    block_max = expected.abs().reshape(-1)[: 39 * 128].reshape(39, 128).amax(1)
    assert torch.allclose(st["absmax1"][:39], block_max, rtol=1e-6)
    gap = (torch.tensor(OPTIMIZER_4BIT_SIGNED_MAP)[1:] - torch.tensor(OPTIMIZER_4BIT_SIGNED_MAP)[:-1]).max()
    assert ((m - expected).abs() <= gap / 2 * st["absmax1"].repeat_interleave(128)[:5001] * (1 + 1e-6)).all()


def test_state_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = O.AdamW4bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
                 if isinstance(v, torch.Tensor) and not k.startswith("qmap"))
    assert nbytes / p.numel() == pytest.approx(STATE_BYTES_PER_PARAM) and nbytes / p.numel() <= 1.1


def _run(opt, params, steps, g):
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("cls", [O.AdamW4bit, O.Lion4bit, O.Adam4bit])
def test_checkpoint_resume_is_bit_identical(cls):
    shapes = [(96, 70), (33,), (4099,)]
    torch.manual_seed(0)
    init = [torch.randn(s) * 0.1 for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    _run(cls(a, lr=1e-3), a, 6, torch.Generator().manual_seed(1))
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_b = cls(b, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    _run(opt_b, b, 3, g)
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = cls(c, lr=1e-3)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    _run(opt_c, c, 3, g)
    for x, y in zip(a, c):
        assert_bitwise_equal(y.detach(), x.detach(), "resumed parameter")


def test_loading_a_mismatched_4bit_state_is_rejected():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW4bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    inner = sd["state"][0]["__bnb_optimizer_quant_state__"]
    inner["state1"] = inner["state1"][:-1].clone()
    with pytest.raises(ValueError, match="state1 has shape"):
        O.AdamW4bit([torch.nn.Parameter(torch.randn(5000))]).load_state_dict(sd)


@pytest.mark.parametrize("make, match", [
    (lambda ps: O.RMSprop(ps, optim_bits=4), "optim_bits=4 is implemented for"),
    (lambda ps: O.LAMB(ps, optim_bits=4), "optim_bits=4 is implemented for"),
    (lambda ps: O.Adam(ps, optim_bits=4, block_wise=False), "always blockwise"),
    (lambda ps: O.Adam(ps, optim_bits=5), "optim_bits must be 32, 8 or 4"),
])
def test_unsupported_4bit_settings_raise(make, match):
    p = torch.nn.Parameter(torch.randn(5000))
    with pytest.raises(ValueError, match=match):
        opt = make([p])
        p.grad = torch.randn_like(p)
        opt.step()


def _stdlib_bytes() -> torch.Tensor:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:12]
    return torch.tensor(list(b"".join(f.read_bytes() for f in files)), dtype=torch.long)


@pytest.mark.slow
def test_adamw4bit_trains_a_byte_model_within_3_percent_of_adamw():
    """A next-byte MLP on Python's own sources: AdamW4bit's held-out loss within 3% of torch.optim.AdamW's."""
    data = _stdlib_bytes()
    split = int(0.9 * len(data))
    ctx = 16

    def batch(g, lo, hi, bs):
        i = torch.randint(lo, hi - ctx - 1, (bs,), generator=g)
        return torch.stack([data[j:j + ctx] for j in i.tolist()]), data[i + ctx]

    def train(make):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Embedding(256, 48), torch.nn.Flatten(), torch.nn.Linear(48 * ctx, 384),
                                    torch.nn.GELU(), torch.nn.Linear(384, 256))
        opt = make(model.parameters())
        g = torch.Generator().manual_seed(2)
        for _ in range(250):
            x, y = batch(g, 0, split, 64)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ge = torch.Generator().manual_seed(3)
        with torch.no_grad():
            return sum(torch.nn.functional.cross_entropy(model(x), y).item()
                       for x, y in (batch(ge, split, len(data), 512) for _ in range(8))) / 8

    base = train(lambda ps: torch.optim.AdamW(ps, lr=2e-3))
    four = train(lambda ps: O.AdamW4bit(ps, lr=2e-3))
    assert four < base * 1.03, (base, four)
