"""Optimizer checkpoints: bit-identical resumption for every optimizer of the table, bitsandbytes' state_dict
layout (fact sheet 4 and 8), the older flat and pre-0.44 layouts, interchange with bitsandbytes 0.50.2 in both
directions, and validation that rejects a bad state dict with ValueError before changing anything."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

import kbit
import kbit.optim as O
from conftest import assert_bitwise_equal
from kbit.backends import reference_optim
from optim_cases import BY_ID, CASES, all_tensors, kbit_state

WRAPPED = "__bnb_optimizer_quant_state__"
PAGED_WARNING = "ignore:kbit. paged optimizer state"
STEPS_BEFORE, STEPS_AFTER = 3, 3

pytestmark = pytest.mark.filterwarnings(PAGED_WARNING)


# ---- a small model with two parameter groups ---------------------------------------------------------------
#: group 0: a 64x65 weight (4160 elements: 8-bit state in 8-bit optimizers, 17 blocks, the last partial) and a
#: (7,) bias (32-bit state); group 1 (half the lr): a 33x130 weight, and a (5, 5) parameter that gets its first
#: gradient only after the checkpoint (so it has no state in it).
SHAPES = [[(64, 65), (7,)], [(33, 130), (5, 5)]]
LATE = (1, 1)  # group, index of the parameter without state in the checkpoint


def _init(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g) * 0.1).to(dtype) for s in shapes] for shapes in SHAPES]


def _grads(steps, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[[(torch.randn(s, generator=g) * 0.01).to(dtype) for s in shapes] for shapes in SHAPES]
            for _ in range(steps)]


def _model(values):
    return [[torch.nn.Parameter(v.clone()) for v in group] for group in values]


def _optimizer(case, params, **extra):
    groups = [{"params": params[0]}, {"params": params[1], "lr": case._default("lr") / 2}]
    return case.make(groups, **extra)


def _step(opt, params, grads, step_index):
    for gi, (group, gs) in enumerate(zip(params, grads)):
        for pi, (p, g) in enumerate(zip(group, gs)):
            p.grad = None if ((gi, pi) == LATE and step_index < STEPS_BEFORE) else g.clone()
    opt.step()


def _save_load(state_dict):
    """torch.save, then torch.load with weights_only=True: a checkpoint must hold only plain data and tensors."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _flat(params):
    return [p for group in params for p in group]


def _assert_same(params_a, opt_a, params_b, opt_b, what):
    for i, (a, b) in enumerate(zip(_flat(params_a), _flat(params_b))):
        assert_bitwise_equal(a.detach(), b.detach(), f"{what}: param {i}")
    ta, tb = all_tensors(opt_a), all_tensors(opt_b)
    assert ta.keys() == tb.keys(), f"{what}: state keys differ"
    for key in ta:
        assert_bitwise_equal(ta[key], tb[key], f"{what}: state {key}")
    for a, b in zip(_flat(params_a), _flat(params_b)):
        assert opt_a.state[a].get("step") == opt_b.state[b].get("step")


def _resume(case, dtype=torch.float32, transform=lambda sd: sd, **extra):
    """(uninterrupted run, resumed run): STEPS_BEFORE steps, checkpoint, STEPS_AFTER more steps in each."""
    grads = _grads(STEPS_BEFORE + STEPS_AFTER, dtype)
    params = _model(_init(dtype))
    opt = _optimizer(case, params, **extra)
    for i in range(STEPS_BEFORE):
        _step(opt, params, grads[i], i)
    checkpoint = _save_load(opt.state_dict())
    values = [[p.detach().clone() for p in group] for group in params]
    for i in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        _step(opt, params, grads[i], i)
    resumed_params = _model(values)
    resumed = _optimizer(case, resumed_params, **extra)
    resumed.load_state_dict(transform(checkpoint))
    for i in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
        _step(resumed, resumed_params, grads[i], i)
    return (params, opt), (resumed_params, resumed)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_resume_is_bit_identical(case):
    (params, opt), (resumed_params, resumed) = _resume(case)
    _assert_same(params, opt, resumed_params, resumed, "resumed vs uninterrupted")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_id", ["Adam8bit", "AdEMAMix", "Lion8bit-tensorwise-wd", "LAMB8bit", "Adagrad8bit"])
def test_resume_16bit_params_is_bit_identical(case_id, dtype):
    """States stay float32/uint8 for 16-bit parameters: loading must not cast them to the parameter's dtype."""
    (params, opt), (resumed_params, resumed) = _resume(BY_ID[case_id], dtype)
    _assert_same(params, opt, resumed_params, resumed, "resumed vs uninterrupted")


def _unwrap(state_dict):
    sd = copy.copy(state_dict)
    sd["state"] = {}
    for key, st in state_dict["state"].items():
        st = dict(st)
        st.update(st.pop(WRAPPED, {}))
        sd["state"][key] = st
    return sd


@pytest.mark.parametrize("case_id", ["Adam8bit", "AdamW", "AdEMAMix8bit", "LAMB", "LARS8bit", "Lion8bit-tensorwise-wd",
                                     "RMSprop8bit", "Adagrad32bit-decay-init-wd", "SGD8bit"])
def test_flat_state_dict_loads(case_id):
    """bitsandbytes before 0.49 wrote every state tensor at the top level of a parameter's state."""
    (params, opt), (resumed_params, resumed) = _resume(BY_ID[case_id], transform=_unwrap)
    _assert_same(params, opt, resumed_params, resumed, "resumed from a flat state dict")


def test_legacy_2048_blocks_load_and_continue():
    """bitsandbytes before 0.44 used 2048-element blocks: such a checkpoint loads, and the next step uses (and
    keeps) 2048-element blocks: bit-identical to the reference op run with blocksize 2048."""
    g = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(64, 65, generator=g) * 0.1)
    opt = O.Adam8bit([p])
    for _ in range(3):
        p.grad = torch.randn(64, 65, generator=g) * 0.01
        opt.step()
    sd = _save_load(opt.state_dict())
    inner = sd["state"][0][WRAPPED]
    for j in (1, 2):  # re-quantize both states in blocks of 2048, as bitsandbytes < 0.44 stored them
        codes, qs = kbit.functional.quantize_blockwise(kbit_state(opt, p, f"state{j}", None), code=inner[f"qmap{j}"],
                                                       blocksize=2048)
        inner[f"state{j}"], inner[f"absmax{j}"] = codes, qs.absmax
    assert inner["absmax1"].shape == (math.ceil(p.numel() / 2048),)
    q = torch.nn.Parameter(p.detach().clone())
    fresh = O.Adam8bit([q])
    fresh.load_state_dict(sd)
    grad = torch.randn(64, 65, generator=g) * 0.01
    st = {k: v.clone() for k, v in fresh.state[q].items() if isinstance(v, torch.Tensor)}
    expected_p = q.detach().clone()
    reference_optim.adam_step_([expected_p], [grad], [st["state1"]], [st["state2"]], [st["absmax1"]],
                               [st["absmax2"]], [st["qmap1"], st["qmap2"]], 2048, [1e-3], [4], [1.0], [], 0.9, 0.999,
                               1e-8, 0.0, 0.0, False, True)
    q.grad = grad
    fresh.step()
    assert_bitwise_equal(q.detach(), expected_p, "param")
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert_bitwise_equal(fresh.state[q][key], st[key], key)


# ---- layout ------------------------------------------------------------------------------------------------
def _expected_layout(case, opt, p):
    """{key: (dtype, shape)} of a parameter's state per the fact sheet's section 4."""
    two_state = opt.optimizer_name in ("adam", "lamb", "ademamix")
    rows1 = 2 if opt.optimizer_name == "ademamix" else 1
    shape1 = (rows1, *p.shape) if rows1 > 1 else tuple(p.shape)
    eight_bit = case.eight_bit and p.numel() >= 4096
    layout = {}
    for j, rows, shape in [(1, rows1, shape1)] + ([(2, 1, tuple(p.shape))] if two_state else []):
        if not eight_bit:
            layout[f"state{j}"] = (torch.float32, shape)
            continue
        layout[f"state{j}"] = (torch.uint8, shape)
        layout[f"qmap{j}"] = (torch.float32, (256,))
        if case.block_wise:
            blocks = math.ceil(p.numel() / 256)
            layout[f"absmax{j}"] = (torch.float32, (rows, blocks) if rows > 1 else (blocks,))
        else:
            layout[f"max{j}"] = (torch.float32, (rows,))
            layout[f"new_max{j}"] = (torch.float32, (rows,))
    if case.max_unorm > 0:
        layout["unorm_vec"] = (torch.float32, (1,))
    return layout


BNB_GROUP_KEYS_2STATE = {"lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3"}
BNB_GROUP_KEYS_1STATE = {"lr", "betas", "eps", "weight_decay"}


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_state_dict_layout(case):
    params = _model(_init())
    opt = _optimizer(case, params)
    _step(opt, params, _grads(1)[0], 0)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    group_keys = BNB_GROUP_KEYS_2STATE if opt.optimizer_name in ("adam", "lamb", "ademamix") else BNB_GROUP_KEYS_1STATE
    for group in sd["param_groups"]:
        assert group_keys <= set(group), f"bitsandbytes' group keys missing: {group_keys - set(group)}"
    assert sd["param_groups"][1]["lr"] == sd["param_groups"][0]["lr"] / 2
    assert set(sd["state"]) == {0, 1, 2}, "the parameter without a gradient has no state"
    flat = _flat(params)
    for index, st in sd["state"].items():
        p = flat[index]
        assert set(st) == {"step", WRAPPED}, "only `step` stays at the top level (bitsandbytes >= 0.49)"
        assert type(st["step"]) is int and st["step"] == 1
        layout = _expected_layout(case, opt, p)
        inner = st[WRAPPED]
        assert {k: (v.dtype, tuple(v.shape)) for k, v in inner.items()} == layout
        if "qmap1" in inner:
            assert_bitwise_equal(inner["qmap1"], kbit.functional.create_dynamic_map(signed=True), "qmap1")
        if "qmap2" in inner:
            assert_bitwise_equal(inner["qmap2"], kbit.functional.create_dynamic_map(signed=False), "qmap2")
    # state_dict() must not disturb the optimizer's own (flat) state.
    assert "state1" in opt.state[flat[0]] and WRAPPED not in opt.state[flat[0]]


def test_optimizer_without_state_round_trips():
    params = _model(_init())
    opt = _optimizer(BY_ID["Adam8bit"], params)
    sd = _save_load(opt.state_dict())
    assert sd["state"] == {}
    fresh = _optimizer(BY_ID["Adam8bit"], _model(_init()))
    fresh.load_state_dict(sd)
    assert len(fresh.state) == 0


def test_load_takes_hyperparameters_from_the_checkpoint():
    """As torch.optim: the checkpoint's param_groups (lr, betas, ...) replace the new optimizer's."""
    params = _model(_init())
    opt = _optimizer(BY_ID["Adam"], params)
    opt.param_groups[0]["lr"] = 0.123
    opt.param_groups[1]["betas"] = (0.5, 0.6)
    _step(opt, params, _grads(1)[0], 0)
    fresh_params = _model(_init())
    fresh = _optimizer(BY_ID["Adam"], fresh_params)
    fresh.load_state_dict(_save_load(opt.state_dict()))
    assert fresh.param_groups[0]["lr"] == 0.123
    assert tuple(fresh.param_groups[1]["betas"]) == (0.5, 0.6)
    assert [g["params"] for g in fresh.param_groups] == fresh_params, "the groups keep the new optimizer's params"


def test_load_copies_the_state():
    """The loaded state does not alias the caller's state dict: stepping must not write into the checkpoint."""
    params = _model(_init())
    opt = _optimizer(BY_ID["Adam8bit"], params)
    _step(opt, params, _grads(1)[0], 0)
    checkpoint = _save_load(opt.state_dict())
    kept = {k: v.clone() for k, v in checkpoint["state"][0][WRAPPED].items()}
    fresh_params = _model([[p.detach().clone() for p in g] for g in params])
    fresh = _optimizer(BY_ID["Adam8bit"], fresh_params)
    fresh.load_state_dict(checkpoint)
    _step(fresh, fresh_params, _grads(2)[1], 1)
    for key, value in kept.items():
        assert_bitwise_equal(checkpoint["state"][0][WRAPPED][key], value, f"checkpoint {key}")
    assert WRAPPED in checkpoint["state"][0], "the caller's dict is not unwrapped in place"


def test_loaded_code_maps_are_shared_again():
    """Loaded qmaps equal to the optimizer's are replaced by its shared map, so parameters keep batching together."""
    params = [torch.nn.Parameter(torch.randn(64, 65)), torch.nn.Parameter(torch.randn(70, 70))]
    opt = O.Adam8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = O.Adam8bit(fresh_params)
    fresh.load_state_dict(_save_load(opt.state_dict()))
    a, b = (fresh.state[p] for p in fresh_params)
    assert a["qmap1"] is b["qmap1"] and a["qmap2"] is b["qmap2"]


# ---- rejected state dicts ----------------------------------------------------------------------------------
def _inner(sd, index=0):
    return sd["state"][index][WRAPPED]


def _set(key, value_fn, index=0):
    def corrupt(sd):
        _inner(sd, index)[key] = value_fn(_inner(sd, index)[key])
        return sd
    return corrupt


def _drop(key, index=0, wrapped=True):
    def corrupt(sd):
        (_inner(sd, index) if wrapped else sd["state"][index]).pop(key)
        return sd
    return corrupt


def _torch_adam_state_dict(sd):
    params = _model(_init())
    opt = torch.optim.Adam([{"params": params[0]}, {"params": params[1]}])
    _step(opt, params, _grads(1)[0], 0)
    return opt.state_dict()


def _extra_group(sd):
    sd["param_groups"].append(dict(sd["param_groups"][0], params=[99]))
    return sd


def _short_group(sd):
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]
    return sd


def _qmap_unsorted(q):
    return q.flip(0)


def _qmap_nan(q):
    q = q.clone()
    q[5] = float("nan")
    return q


BAD_8BIT = {  # for Adam8bit (param 0 has 8-bit state)
    "state1 wrong shape": _set("state1", lambda s: s.reshape(65, 64)),
    "state1 too small": _set("state1", lambda s: s[:-1]),
    "state1 float16": _set("state1", lambda s: s.half()),
    "state1 float32 but state2 uint8": _set("state1", lambda s: s.float()),
    "qmap1 float64": _set("qmap1", lambda q: q.double()),
    "qmap1 128 entries": _set("qmap1", lambda q: q[:128]),
    "qmap1 unsorted": _set("qmap1", _qmap_unsorted),
    "qmap1 with NaN": _set("qmap1", _qmap_nan),
    "absmax1 wrong block count": _set("absmax1", lambda a: a[:-1]),
    "absmax2 float16": _set("absmax2", lambda a: a.half()),
    "absmax1 2-D": _set("absmax1", lambda a: a[None]),
    "missing state2": _drop("state2"),
    "missing qmap2": _drop("qmap2"),
    "missing absmax1": _drop("absmax1"),
    "missing step": _drop("step", wrapped=False),
    "negative step": lambda sd: (sd["state"][0].__setitem__("step", -1), sd)[1],
    "fractional step": lambda sd: (sd["state"][0].__setitem__("step", 1.5), sd)[1],
    "unknown state key": lambda sd: (_inner(sd).__setitem__("exp_avg", torch.zeros(64, 65)), sd)[1],
    "wrapped value not a dict": lambda sd: (sd["state"][0].__setitem__(WRAPPED, torch.zeros(3)), sd)[1],
    "one group too many": _extra_group,
    "group of the wrong size": _short_group,
    "torch.optim.Adam state dict": _torch_adam_state_dict,
    "not a state dict": lambda sd: {"state": sd["state"]},
}
BAD_32BIT = {  # for Adam (32-bit), AdEMAMix and Lion
    "state1 wrong shape": _set("state1", lambda s: s.reshape(-1)),
    "state1 float64": _set("state1", lambda s: s.double()),
    "state1 bfloat16": _set("state1", lambda s: s.bfloat16()),
    "missing state1": _drop("state1"),
    "unorm_vec with 2 values": lambda sd: (_inner(sd).__setitem__("unorm_vec", torch.zeros(2)), sd)[1],
    "gnorm_vec with 10 values": lambda sd: (_inner(sd).__setitem__("gnorm_vec", torch.zeros(10)), sd)[1],
}


def _snapshot(opt):
    return ({k: v.clone() for k, v in all_tensors(opt).items()},
            {id(p): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)} for p, st in opt.state.items()},
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
            [list(g["params"]) for g in opt.param_groups])


def _assert_unchanged(opt, snapshot):
    tensors, scalars, groups, group_params = snapshot
    now = _snapshot(opt)
    assert now[0].keys() == tensors.keys()
    for key in tensors:
        assert_bitwise_equal(now[0][key], tensors[key], f"state {key} changed by a rejected load")
    assert now[1] == scalars and now[2] == groups
    assert all(a == b for a, b in zip(now[3], group_params))


def _check_rejected(case_id, corrupt):
    case = BY_ID[case_id]
    params = _model(_init())
    opt = _optimizer(case, params)
    grads = _grads(2)
    _step(opt, params, grads[0], 0)
    bad = corrupt(_save_load(opt.state_dict()))
    snapshot = _snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    _assert_unchanged(opt, snapshot)
    # ... and still steps exactly like an optimizer that never saw the bad state dict.
    twin_params = _model(_init())
    twin = _optimizer(case, twin_params)
    _step(twin, twin_params, grads[0], 0)
    _step(opt, params, grads[1], 1)
    _step(twin, twin_params, grads[1], 1)
    _assert_same(params, opt, twin_params, twin, "after a rejected load")


@pytest.mark.parametrize("corruption", BAD_8BIT, ids=str)
def test_bad_8bit_state_dict_raises_and_changes_nothing(corruption):
    _check_rejected("Adam8bit", BAD_8BIT[corruption])


@pytest.mark.parametrize("corruption", BAD_32BIT, ids=str)
@pytest.mark.parametrize("case_id", ["Adam", "AdEMAMix", "Lion"])
def test_bad_32bit_state_dict_raises_and_changes_nothing(case_id, corruption):
    _check_rejected(case_id, BAD_32BIT[corruption])


@pytest.mark.parametrize("corruption", ["max1 missing", "new_max1 with 2 values"])
def test_bad_tensorwise_state_dict_raises(corruption):
    corrupt = _drop("max1") if corruption == "max1 missing" else _set("new_max1", lambda m: torch.zeros(2))
    _check_rejected("Adam8bit-tensorwise", corrupt)


def test_ademamix_state_of_bitsandbytes_broken_32bit_layout_raises():
    """bitsandbytes' AdEMAMix32bit allocates state1 with the parameter's shape instead of (2, *shape) (fact sheet
    12.1); such a state must be rejected, not read out of bounds."""
    _check_rejected("AdEMAMix", _set("state1", lambda s: s[0].clone()))


def test_lion_state_into_adam_raises():
    """A 1-state checkpoint lacks state2: loading it into a 2-state optimizer is an error, not a crash later."""
    params = _model(_init())
    lion = _optimizer(BY_ID["Lion8bit"], params)
    _step(lion, params, _grads(1)[0], 0)
    adam = _optimizer(BY_ID["Adam8bit"], _model(_init()))
    with pytest.raises(ValueError):
        adam.load_state_dict(_save_load(lion.state_dict()))
    assert len(adam.state) == 0


# ---- checkpoints that are valid but come from a differently configured optimizer ---------------------------
def test_checkpoint_without_gnorm_vec_into_percentile_clipping_optimizer():
    """A checkpoint written without percentile clipping (any bitsandbytes 0.50 checkpoint) loads into an
    optimizer with ``percentile_clipping=5``; stepping must not fail (the gradient-norm history starts afresh)."""
    params = _model(_init())
    opt = _optimizer(BY_ID["Adam"], params)
    grads = _grads(2)
    _step(opt, params, grads[0], 0)
    clipped_params = _model(_init())
    clipped = _optimizer(BY_ID["Adam"], clipped_params, percentile_clipping=5)
    clipped.load_state_dict(_save_load(opt.state_dict()))
    _step(clipped, clipped_params, grads[1], 1)  # kbit 0.1.0: KeyError: 'gnorm_vec'
    assert all(torch.isfinite(p).all() for p in _flat(clipped_params))


def test_adam_checkpoint_with_partial_state_into_lamb():
    """An Adam checkpoint has no unorm_vec. Loaded into LAMB (max_unorm=1.0), where the first parameter had no
    state in the checkpoint (its fresh state gets a unorm_vec) and the second has, the step must work."""
    g = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(10, 10, generator=g)), torch.nn.Parameter(torch.randn(20, generator=g))]
    adam = O.Adam(params)
    params[1].grad = torch.randn(20, generator=g)  # params[0] has no gradient: no state in the checkpoint
    adam.step()
    lamb_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lamb = O.LAMB(lamb_params)
    lamb.load_state_dict(_save_load(adam.state_dict()))
    for p in lamb_params:
        p.grad = torch.randn(p.shape, generator=g)
    lamb.step()  # kbit 0.1.0: KeyError: 'unorm_vec'
    assert all(bool(torch.isfinite(p).all()) for p in lamb_params)


# ---- bitsandbytes 0.50.2 interchange -----------------------------------------------------------------------
def _bitsandbytes_cpu_optimizers():
    """bitsandbytes.optim if it imports and steps an 8-bit optimizer on this CPU, else the reason it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its import uses torch.jit.script_method
            import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.randn(4096))
        p.grad = torch.randn(4096)
        bnb.optim.Adam8bit([p]).step()
        return bnb.optim, None
    except Exception as exc:  # noqa: BLE001  (any failure means: nothing to compare with)
        return None, f"bitsandbytes cannot run its CPU optimizers here ({type(exc).__name__}: {exc})"


BNB_OPTIM, BNB_SKIP_REASON = _bitsandbytes_cpu_optimizers()
needs_bnb = pytest.mark.skipif(BNB_OPTIM is None, reason=str(BNB_SKIP_REASON))
#: Rows whose kbit semantics equal bitsandbytes' (LAMB/LARS/AdEMAMix schedules differ: kbit LAMB's norm is
#: bias-corrected and applies in 8-bit, SGD's dampening/nesterov, Adagrad's lr_decay... are not in bnb).
INTEROP_CASES = [c for c in CASES if c.bnb_kwargs is not None]
INTEROP_STEPS_BEFORE, INTEROP_STEPS_AFTER = 3, 5
#: 32-bit states: both libraries compute the same float32 rule, in a different operation order.
INTEROP_32BIT_ATOL, INTEROP_32BIT_RTOL = 1e-6, 1e-5
#: 8-bit states: bitsandbytes' CPU quantizer (a 65536-entry lookup table, fact sheet 6.3) resolves only 3e-5 of a
#: block's absmax and maps an exact 0 to a nonzero code, while kbit picks the exact nearest code. States near 0
#: therefore get different codes, and the few parameters whose momentum is near 0 move differently. Measured
#: after 5 steps: max difference 1.6% of the largest movement, mean 0.008% of the mean movement.
INTEROP_8BIT_MAX_DIFF_OF_MOVEMENT = 0.03
INTEROP_8BIT_MEAN_DIFF_OF_MOVEMENT = 1e-3


def _interop(case, source, target):
    shapes = [(64, 65), (7,)]
    g = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=g) * 0.01 for s in shapes]
             for _ in range(INTEROP_STEPS_BEFORE + INTEROP_STEPS_AFTER)]
    src_params = [torch.nn.Parameter(x.clone()) for x in init]
    src = source(src_params)
    for gs in grads[:INTEROP_STEPS_BEFORE]:
        for p, grad in zip(src_params, gs):
            p.grad = grad.clone()
        src.step()
    checkpoint = _save_load(src.state_dict())
    at_load = [p.detach().clone() for p in src_params]
    dst_params = [torch.nn.Parameter(x.clone()) for x in at_load]
    dst = target(dst_params)
    dst.load_state_dict(checkpoint)
    for p, q in zip(src_params, dst_params):  # the raw state arrives unchanged
        for key, value in src.state[p].items():
            if isinstance(value, torch.Tensor):
                assert_bitwise_equal(dst.state[q][key], value, f"loaded {key}")
            else:
                assert dst.state[q][key] == value
    for gs in grads[INTEROP_STEPS_BEFORE:]:
        for p, q, grad in zip(src_params, dst_params, gs):
            p.grad, q.grad = grad.clone(), grad.clone()
        src.step()
        dst.step()
    for p, q, start in zip(src_params, dst_params, at_load):
        p, q = p.detach(), q.detach()
        if q.numel() < 4096 or not case.eight_bit:
            torch.testing.assert_close(q, p, atol=INTEROP_32BIT_ATOL, rtol=INTEROP_32BIT_RTOL)
            continue
        movement, diff = (p - start).abs(), (q - p).abs()
        assert float(diff.max()) <= INTEROP_8BIT_MAX_DIFF_OF_MOVEMENT * float(movement.max())
        assert float(diff.mean()) <= INTEROP_8BIT_MEAN_DIFF_OF_MOVEMENT * float(movement.mean())


@needs_bnb
@pytest.mark.parametrize("case", INTEROP_CASES, ids=repr)
def test_bitsandbytes_checkpoint_loads_and_continues(case):
    bnb_cls = getattr(BNB_OPTIM, case.cls.__name__)
    _interop(case, lambda ps: bnb_cls(ps, **case.bnb_kwargs), case.make)


@needs_bnb
@pytest.mark.parametrize("case", INTEROP_CASES, ids=repr)
def test_kbit_checkpoint_loads_into_bitsandbytes_and_continues(case):
    bnb_cls = getattr(BNB_OPTIM, case.cls.__name__)
    _interop(case, case.make, lambda ps: bnb_cls(ps, **case.bnb_kwargs))


@needs_bnb
@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_bitsandbytes_trust_ratio_checkpoints_load(name):
    """bitsandbytes' CPU LAMB/LARS compute the trust ratio differently (fact sheet 5.2, 5.3): their checkpoints
    (with unorm_vec) load and train, but the continuation is not compared."""
    kwargs = dict(lr=0.01, momentum=0.9) if name == "LARS" else {}
    params = [torch.nn.Parameter(torch.randn(64, 65) * 0.1)]
    src = getattr(BNB_OPTIM, name)(params, **kwargs)
    params[0].grad = torch.randn(64, 65) * 0.01
    src.step()
    dst_params = [torch.nn.Parameter(params[0].detach().clone())]
    dst = getattr(O, name)(dst_params, **kwargs)
    dst.load_state_dict(_save_load(src.state_dict()))
    dst_params[0].grad = torch.randn(64, 65) * 0.01
    dst.step()
    assert dst.state[dst_params[0]]["step"] == 2 and float(dst.state[dst_params[0]]["unorm_vec"]) > 0
