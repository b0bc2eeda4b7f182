"""Optimizer configuration and behaviour around the update rule: GlobalOptimManager overrides (fact sheet 10,
13.4, and kbit's Note [override identity]), the 32-bit embeddings, min_8bit_size, argument validation, gradient
errors, non-finite gradients, skip_zeros, percentile clipping, trust ratios, multi-tensor batching."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

import kbit
import kbit.optim as O
from conftest import assert_bitwise_equal
from kbit.optim import GlobalOptimManager, MockArgs
from optim_cases import BY_ID, CASES, OPTIMIZER_CLASSES, kbit_state

PAGED_WARNING = "ignore:kbit. paged optimizer state"
pytestmark = pytest.mark.filterwarnings(PAGED_WARNING)


@pytest.fixture(autouse=True)
def manager():
    """The process-wide manager, emptied before and after each test (overrides must not leak between tests)."""
    mng = GlobalOptimManager.get_instance()
    mng.initialize()
    yield mng
    mng.initialize()


def _param(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype))


def _moved(p):
    """What ``p.to(device)`` does to a parameter on another device: a new tensor object with the same values."""
    return torch.nn.Parameter(p.detach().clone())


def _grad_for(p, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(p.shape, generator=g) * 0.01).to(p.dtype)


def _steps(opt, params, n=1, seed=0):
    for i in range(n):
        for j, p in enumerate(params):
            p.grad = _grad_for(p, seed + 100 * i + j)
        opt.step()


def _state_dtype(opt, p):
    return opt.state[p]["state1"].dtype


# ---- GlobalOptimManager -------------------------------------------------------------------------------------
def test_manager_is_a_singleton(manager):
    with pytest.raises(RuntimeError, match="get_instance"):
        GlobalOptimManager()
    assert GlobalOptimManager.get_instance() is manager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_override_before_register_then_move(manager, dtype):
    """bitsandbytes' test_global_config: override p3 -> register [p1, p2, p3] -> replace each by a moved copy."""
    p1, p2, p3 = _param(64, 65, seed=1, dtype=dtype), _param(64, 65, seed=2, dtype=dtype), _param(33, 130, seed=3,
                                                                                                  dtype=dtype)
    manager.override_config(p3, "optim_bits", 8)
    manager.register_parameters([p1, p2, p3])
    p1, p2, p3 = _moved(p1), _moved(p2), _moved(p3)
    opt = O.Adam([p1, p2, p3])
    _steps(opt, [p1, p2, p3], n=5)
    assert _state_dtype(opt, p1) == torch.float32 and _state_dtype(opt, p2) == torch.float32
    assert opt.state[p3]["state1"].dtype == torch.uint8 and opt.state[p3]["state2"].dtype == torch.uint8
    # ... and p3 trained exactly like it would under Adam8bit.
    q3 = _param(33, 130, seed=3, dtype=dtype)
    twin = O.Adam8bit([q3])
    for i in range(5):
        q3.grad = _grad_for(q3, 100 * i + 2)
        twin.step()
    assert_bitwise_equal(p3.detach(), q3.detach(), "p3 vs Adam8bit")


def test_override_after_register_then_move(manager):
    """bitsandbytes' test_override_config_after_register: register -> move -> override the moved parameter."""
    p1, p2 = _param(64, 64, seed=1), _param(64, 64, seed=2)
    manager.register_parameters([p1, p2])
    p1, p2 = _moved(p1), _moved(p2)
    manager.override_config(p2, "optim_bits", 8)
    opt = O.Adam([p1, p2], optim_bits=32)
    _steps(opt, [p1, p2])
    assert _state_dtype(opt, p1) == torch.float32 and _state_dtype(opt, p2) == torch.uint8


def test_documented_flow_register_convert_override(manager):
    """The docstring's flow: register while the model is as created, convert it (``module.to`` keeps parameter
    objects), then override by parameter."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    manager.register_parameters(model.parameters())
    model.to(torch.float16)
    manager.override_config(model[0].weight, "optim_bits", 32)
    opt = O.Adam8bit(model.parameters())
    _steps(opt, list(model.parameters()))
    assert _state_dtype(opt, model[0].weight) == torch.float32
    assert _state_dtype(opt, model[1].weight) == torch.uint8


def test_register_parameter_groups(manager):
    p1, p2, p3 = _param(64, 65, seed=1), _param(64, 65, seed=2), _param(64, 65, seed=3)
    manager.override_config(p3, "optim_bits", 8)
    manager.register_parameters([{"params": [p1]}, {"params": [p2, p3]}])
    p1, p2, p3 = _moved(p1), _moved(p2), _moved(p3)
    opt = O.Adam([{"params": [p1]}, {"params": [p2, p3]}])
    _steps(opt, [p1, p2, p3])
    assert [_state_dtype(opt, p) for p in (p1, p2, p3)] == [torch.float32, torch.float32, torch.uint8]


def test_override_after_optimizer_creation_before_first_step(manager):
    p1, p2 = _param(64, 65, seed=1), _param(64, 65, seed=2)
    opt = O.Adam8bit([p1, p2])
    manager.override_config(p1, "optim_bits", 32)
    _steps(opt, [p1, p2])
    assert _state_dtype(opt, p1) == torch.float32 and _state_dtype(opt, p2) == torch.uint8


def test_bits_override_after_state_exists_keeps_the_state(manager):
    """optim_bits and min_8bit_size decide the state format once, when the state is created."""
    p = _param(64, 65)
    opt = O.Adam([p])
    _steps(opt, [p])
    manager.override_config(p, "optim_bits", 8)
    _steps(opt, [p], seed=7)
    assert _state_dtype(opt, p) == torch.float32 and opt.state[p]["step"] == 2


def _twin_run(make, override, n=3, switch_at=1):
    """Params stepped n times by ``make`` with ``override(manager, p0)`` applied before step ``switch_at``."""
    p0, p1 = _param(64, 65, seed=1), _param(7, seed=2)
    opt = make([p0, p1])
    for i in range(n):
        if i == switch_at:
            override(GlobalOptimManager.get_instance(), p0)
        _steps(opt, [p0, p1], seed=10 * i)
    return (p0, p1), opt


def test_key_value_and_dict_forms_are_equivalent(manager):
    a, _ = _twin_run(O.Adam, lambda m, p: m.override_config(p, "lr", 1e-2), switch_at=0)
    manager.initialize()
    b, _ = _twin_run(O.Adam, lambda m, p: m.override_config(p, key_value_dict={"lr": 1e-2}), switch_at=0)
    manager.initialize()
    c, _ = _twin_run(O.Adam, lambda m, p: m.override_config([p], key_value_dict={"lr": 1e-2, "eps": 1e-8}),
                     switch_at=0)
    for x, y, z in zip(a, b, c):
        assert_bitwise_equal(x.detach(), y.detach(), "key/value vs dict")
        assert_bitwise_equal(x.detach(), z.detach(), "key/value vs list + dict")
    manager.initialize()
    d, _ = _twin_run(O.Adam, lambda m, p: None, switch_at=0)
    assert not torch.equal(a[0], d[0]) and torch.equal(a[1], d[1]), "the override applies to p0 only"


@pytest.mark.parametrize("call", [
    lambda m, p: m.override_config(p, "lr", 0.1, key_value_dict={"lr": 0.1}),
    lambda m, p: m.override_config(p),
    lambda m, p: m.override_config(p, "lr"),
    lambda m, p: m.override_config(p, "learning_rate", 0.1),
    lambda m, p: m.override_config(p, key_value_dict={"lr": 0.1, "bits": 8}),
    lambda m, p: m.override_config(p, "optim_bits", 4),
    lambda m, p: m.register_module_override(torch.nn.Linear(2, 2), "weight", {"optim_bit": 32}),
], ids=["both forms", "neither form", "key without value", "unknown key", "unknown key in dict", "optim_bits 4",
        "unknown module override key"])
def test_bad_overrides_raise(manager, call):
    p = _param(3)
    with pytest.raises(ValueError):
        call(manager, p)
    assert manager.pid2config.get(id(p), {}) == {}


def test_override_of_non_tensor_raises(manager):
    with pytest.raises(TypeError):
        manager.override_config([1.0], "lr", 0.1)


def test_register_nothing_raises(manager):
    with pytest.raises(ValueError):
        manager.register_parameters([])


def test_is_sparse_is_the_documented_alias_of_skip_zeros(manager):
    p = _param(64, 65)
    manager.override_config(p, "is_sparse", True)
    assert manager.pid2config[id(p)] == {"skip_zeros": True}
    opt = O.Adam([p], weight_decay=0.1)
    _steps(opt, [p])
    before = p.detach().clone()
    m_before = opt.state[p]["state1"].clone()
    grad = _grad_for(p, 5)
    grad[::2] = 0.0
    p.grad = grad
    opt.step()
    assert_bitwise_equal(p.detach()[::2], before[::2], "zero-gradient rows")
    assert_bitwise_equal(opt.state[p]["state1"][::2], m_before[::2], "their state")
    assert not torch.equal(p.detach()[1::2], before[1::2])


@pytest.mark.parametrize("key,value", [("lr", 3e-2), ("betas", (0.5, 0.6)), ("eps", 1e-3), ("weight_decay", 0.5)])
def test_override_after_first_step_takes_effect(manager, key, value):
    """Overrides are read at every step: changing one after the first step changes the next steps, exactly as
    if that parameter's group had the value from then on."""
    (p0, p1), _ = _twin_run(O.Adam, lambda m, p: m.override_config(p, key, value))
    q0, q1 = _param(64, 65, seed=1), _param(7, seed=2)
    opt = O.Adam([{"params": [q0]}, {"params": [q1]}])
    for i in range(3):
        if i == 1:
            opt.param_groups[0][key] = value
        _steps(opt, [q0, q1], seed=10 * i)
    assert_bitwise_equal(p0.detach(), q0.detach(), "overridden parameter")
    assert_bitwise_equal(p1.detach(), q1.detach(), "other parameter")


@pytest.mark.parametrize("cls,kwargs,key,value", [
    (O.SGD, dict(lr=0.1, momentum=0.9), "nesterov", True),
    (O.Adagrad, {}, "lr_decay", 0.1),
    (O.LAMB, {}, "bias_correction", False),
    (O.AdEMAMix, {}, "alpha", 2.0),
    (O.AdEMAMix8bit, {}, "t_beta3", 10),
    (O.SGD, dict(lr=0.1, momentum=0.9), "momentum", 0.5),
    (O.SGD8bit, dict(lr=0.1, momentum=0.9), "dampening", 0.5),
    (O.LARS, dict(lr=0.1, momentum=0.9), "momentum", 0.5),
    (O.RMSprop, {}, "alpha", 0.5),
], ids=["SGD nesterov", "Adagrad lr_decay", "LAMB bias_correction", "AdEMAMix alpha", "AdEMAMix8bit t_beta3",
        "SGD momentum", "SGD8bit dampening", "LARS momentum", "RMSprop alpha"])
def test_override_keys_named_like_constructor_arguments_take_effect(manager, cls, kwargs, key, value):
    """manager.py accepts these keys (OVERRIDE_KEYS); an override must act like the constructor argument of the
    same name, not be stored and ignored."""
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    manager.override_config(p, key, value)
    a, b = cls([p], **kwargs), cls([q], **{**kwargs, key: value})
    for i in range(3):
        p.grad = q.grad = _grad_for(p, i)
        a.step()
        b.step()
    assert_bitwise_equal(p.detach(), q.detach(), f"override {key}={value} vs constructor argument")


def test_index_override_does_not_leak_into_another_optimizer(manager):
    """Note [override identity]: an index override belongs to the first optimizer that claims it (bitsandbytes
    applies it to position (0, 1) of every later optimizer, fact sheet 12.9)."""
    p1, p2 = _param(64, 65, seed=1), _param(64, 65, seed=2)
    manager.override_config(p2, "optim_bits", 8)
    manager.register_parameters([p1, p2])
    p1, p2 = _moved(p1), _moved(p2)
    first = O.Adam([p1, p2])
    _steps(first, [p1, p2])
    assert _state_dtype(first, p2) == torch.uint8
    q1, q2 = _param(64, 65, seed=3), _param(64, 65, seed=4)
    second = O.Adam([q1, q2])
    _steps(second, [q1, q2])
    assert _state_dtype(second, q1) == torch.float32 and _state_dtype(second, q2) == torch.float32


def test_index_override_needs_the_registered_shape(manager):
    p1, p2 = _param(64, 65, seed=1), _param(64, 65, seed=2)
    manager.override_config(p2, "optim_bits", 8)
    manager.register_parameters([p1, p2])
    q1, q2 = _param(64, 65, seed=3), _param(70, 70, seed=4)  # not p2 moved: a different tensor at that position
    opt = O.Adam([q1, q2])
    _steps(opt, [q1, q2])
    assert _state_dtype(opt, q2) == torch.float32


def test_parameter_override_follows_the_parameter_into_every_optimizer(manager):
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=2)
    manager.override_config(p, "optim_bits", 8)
    a = O.Adam([p])
    b = O.Adam([q, p])
    _steps(a, [p])
    _steps(b, [q, p])
    assert _state_dtype(a, p) == torch.uint8 and _state_dtype(b, p) == torch.uint8
    assert _state_dtype(b, q) == torch.float32


def test_stable_embedding_override_does_not_leak(manager):
    """bitsandbytes' index2config quirk (fact sheet 10): a StableEmbedding at (0, 0) of one model made position
    (0, 0) of every later optimizer 32-bit. kbit resolves module overrides to the module's own parameter."""
    emb = kbit.nn.StableEmbedding(100, 64)
    opt_a = O.Adam8bit(emb.parameters())
    _steps(opt_a, list(emb.parameters()))
    w = _param(100, 64, seed=5)
    opt_b = O.Adam8bit([w])
    _steps(opt_b, [w])
    assert _state_dtype(opt_a, emb.weight) == torch.float32 and _state_dtype(opt_b, w) == torch.uint8


def test_freed_parameter_forgets_its_override(manager):
    """Overrides are keyed by id(); a new tensor that reuses a freed parameter's id must not inherit them."""
    p = _param(10)
    manager.override_config(p, "lr", 0.5)
    manager.register_parameters([p])
    pid = id(p)
    del p
    gc.collect()
    assert pid not in manager.pid2config


def test_module_override(manager):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    manager.register_module_override(model[1], "weight", {"optim_bits": 32, "lr": 0.0})
    opt = O.Adam8bit(model.parameters())
    before = model[1].weight.detach().clone()
    _steps(opt, list(model.parameters()))
    assert _state_dtype(opt, model[1].weight) == torch.float32 and _state_dtype(opt, model[0].weight) == torch.uint8
    assert_bitwise_equal(model[1].weight.detach(), before, "lr 0 through a module override")


def test_min_8bit_size_override(manager):
    p, q = _param(100, seed=1), _param(100, seed=2)
    manager.override_config(p, "min_8bit_size", 0)
    opt = O.Adam8bit([p, q])
    _steps(opt, [p, q])
    assert _state_dtype(opt, p) == torch.uint8 and _state_dtype(opt, q) == torch.float32


# ---- embeddings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [kbit.nn.StableEmbedding, kbit.nn.Embedding])
@pytest.mark.parametrize("opt_cls", [O.Adam8bit, O.Lion8bit, O.AdEMAMix8bit])
def test_embeddings_get_32bit_state_under_8bit_optimizers(cls, opt_cls):
    emb = cls(100, 64)  # 6400 elements: 8-bit state but for the override
    head = torch.nn.Linear(64, 128)
    params = list(emb.parameters()) + list(head.parameters())
    opt = opt_cls(params)
    out = head(emb(torch.tensor([[1, 2, 3], [4, 5, 99]]))).square().sum()
    out.backward()
    opt.step()
    assert _state_dtype(opt, emb.weight) == torch.float32
    assert _state_dtype(opt, head.weight) == torch.uint8
    # ... in every optimizer: a second one, created later, also keeps the embedding in 32-bit.
    opt2 = opt_cls([emb.weight])
    opt2.step()
    assert _state_dtype(opt2, emb.weight) == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_stable_embedding_device_and_dtype(dtype):
    """bitsandbytes passes device/dtype positionally into the wrong parameters; kbit's must honour them."""
    emb = kbit.nn.StableEmbedding(10, 8, padding_idx=0, device="cpu", dtype=dtype)
    assert emb.weight.dtype == dtype and emb.weight.device.type == "cpu"
    assert emb.norm.weight.device.type == "cpu"
    assert emb.padding_idx == 0 and bool((emb.weight[0] == 0).all())
    idx = torch.tensor([[0, 3, 9]])
    out = emb(idx)
    assert out.dtype == dtype and out.shape == (1, 3, 8)
    expected = torch.nn.functional.layer_norm(emb.weight[idx].float(), (8,), emb.norm.weight, emb.norm.bias)
    torch.testing.assert_close(out, expected.to(dtype))
    plain = kbit.nn.Embedding(10, 8, device="cpu", dtype=dtype)
    assert plain.weight.dtype == dtype and not hasattr(plain, "norm")


def test_stable_embedding_initialization():
    emb = kbit.nn.StableEmbedding(1000, 50)
    bound = math.sqrt(6.0 / (1000 + 50))  # Xavier uniform
    largest = float(emb.weight.detach().abs().max())
    assert 0.9 * bound < largest <= bound
    w = torch.randn(5, 4)
    given = kbit.nn.StableEmbedding(5, 4, _weight=w)
    assert torch.equal(given.weight.detach(), w)


def test_embedding_modules_can_be_freed():
    """The manager keeps module overrides for every optimizer created later, but must not keep the modules (and
    their weights) alive forever: a model deleted by the user should be freed."""
    emb = kbit.nn.StableEmbedding(1000, 64)
    ref = weakref.ref(emb)
    del emb
    gc.collect()
    assert ref() is None, "GlobalOptimManager holds a strong reference to every StableEmbedding ever created"


# ---- min_8bit_size ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel,min_size,eight_bit", [(4095, 4096, False), (4096, 4096, True), (99, 100, False),
                                                      (100, 100, True), (1, 0, True), (3, 0, True)])
def test_min_8bit_size(numel, min_size, eight_bit):
    p = _param(numel)
    opt = O.Adam8bit([p], min_8bit_size=min_size)
    _steps(opt, [p], n=2)
    assert (_state_dtype(opt, p) == torch.uint8) == eight_bit
    assert bool(torch.isfinite(p).all())


def test_min_8bit_size_32bit_state_matches_the_32bit_optimizer():
    p, q = _param(300, seed=1), _param(300, seed=1)
    a, b = O.Lion8bit([p]), O.Lion32bit([q])
    for i in range(3):
        p.grad = q.grad = _grad_for(p, i)
        a.step()
        b.step()
    assert_bitwise_equal(p.detach(), q.detach(), "param")


# ---- argument validation ------------------------------------------------------------------------------------
def _required(cls):
    return dict(lr=0.01, momentum=0.9) if issubclass(cls, (O.SGD, O.LARS)) else {}


def _betas_arg(cls):
    if issubclass(cls, (O.SGD, O.LARS)):
        return dict(momentum=1.0)
    if issubclass(cls, O.RMSprop):
        return dict(alpha=1.5)
    if issubclass(cls, O.AdEMAMix):
        return dict(betas=(0.9, 0.999, 1.0))
    if issubclass(cls, O.Adagrad):
        return None
    return dict(betas=(1.0, 0.999))


@pytest.mark.parametrize("cls", OPTIMIZER_CLASSES, ids=lambda c: c.__name__)
def test_out_of_range_hyperparameters_raise(cls):
    p = [_param(3)]
    kw = _required(cls)
    with pytest.raises(ValueError, match="learning rate"):
        cls(p, **{**kw, "lr": -1e-3})
    if "weight_decay" in cls.__init__.__code__.co_varnames:
        with pytest.raises(ValueError, match="weight_decay"):
            cls(p, **kw, weight_decay=-0.1)
    if "eps" in cls.__init__.__code__.co_varnames:
        with pytest.raises(ValueError, match="epsilon"):
            cls(p, **kw, eps=-1e-8)
    betas = _betas_arg(cls)
    if betas is not None:
        with pytest.raises(ValueError, match="beta"):
            cls(p, **{**kw, **betas})
    cls(p, **kw)  # the defaults are valid


@pytest.mark.parametrize("make", [
    lambda p: O.SGD(p, lr=0.1), lambda p: O.SGD8bit(p, lr=0.1, momentum=0), lambda p: O.LARS(p, lr=0.1),
    lambda p: O.LARS32bit(p, lr=0.1), lambda p: O.RMSprop(p, alpha=0)], ids=["SGD", "SGD8bit", "LARS", "LARS32bit",
                                                                             "RMSprop alpha 0"])
def test_unsupported_configurations_raise_not_implemented(make):
    with pytest.raises(NotImplementedError):
        make([_param(3)])


@pytest.mark.parametrize("make", [
    lambda p: O.RMSprop(p, momentum=0.9), lambda p: O.RMSprop8bit(p, centered=True),
    lambda p: O.SGD(p, lr=0.1, momentum=0.9, nesterov=True, dampening=0.1),
    lambda p: O.LARS(p, lr=0.1, momentum=0.9, dampening=-0.1),
    lambda p: O.LAMB(p, adam_w_mode=False),
    lambda p: O.Adagrad(p, lr_decay=-0.1), lambda p: O.Adagrad8bit(p, initial_accumulator_value=-1.0),
    lambda p: O.AdEMAMix(p, betas=(0.9, 0.999)), lambda p: O.AdEMAMix8bit(p, alpha=-1.0),
    lambda p: O.Adam(p, percentile_clipping=0), lambda p: O.Adam(p, percentile_clipping=101),
    lambda p: O.Lion(p, percentile_clipping=5.5), lambda p: O.LAMB(p, max_unorm=-1.0),
    lambda p: O.Adam(p, min_8bit_size=-1),
    lambda p: O.Optimizer2State("adamax", p), lambda p: O.Optimizer1State("adam", p),
], ids=["RMSprop momentum", "RMSprop centered", "nesterov with dampening", "negative dampening", "LAMB adam_w_mode",
        "negative lr_decay", "negative initial accumulator", "AdEMAMix two betas", "AdEMAMix negative alpha",
        "percentile 0", "percentile 101", "percentile 5.5", "negative max_unorm", "negative min_8bit_size",
        "unknown 2-state rule", "1-state base with a 2-state rule"])
def test_invalid_configurations_raise_value_error(make):
    with pytest.raises(ValueError):
        make([_param(3)])


AMSGRAD_CLASSES = [c for c in OPTIMIZER_CLASSES if "amsgrad" in c.__init__.__code__.co_varnames]


def test_amsgrad_classes():
    assert {c.__name__ for c in AMSGRAD_CLASSES} >= {"Adam", "Adam8bit", "AdamW", "PagedAdamW8bit", "LAMB",
                                                     "LAMB8bit"}


@pytest.mark.parametrize("cls", AMSGRAD_CLASSES, ids=lambda c: c.__name__)
def test_amsgrad_raises(cls):
    """bitsandbytes silently ignores amsgrad in most classes; kbit rejects it everywhere."""
    with pytest.raises(ValueError, match="amsgrad"):
        cls([_param(3)], amsgrad=True)


@pytest.mark.parametrize("make,ok", [
    (lambda p: O.Adam8bit(p, optim_bits=4), False), (lambda p: O.Adam(p, optim_bits=4), 4),
    (lambda p: O.Adam(p, optim_bits=16), False), (lambda p: O.Adam32bit(p, optim_bits=8), False),
    (lambda p: O.Lion8bit(p, optim_bits=4), False), (lambda p: O.AdEMAMix(p, optim_bits=4), False),
    (lambda p: O.Adam8bit(p, optim_bits=32), True),  # bitsandbytes: "only supports optim_bits=32 (default value ...)"
    (lambda p: O.Adam8bit(p, optim_bits=8), True),
], ids=["Adam8bit 4", "Adam 4", "Adam 16", "Adam32bit 8", "Lion8bit 4", "AdEMAMix 4", "Adam8bit 32", "Adam8bit 8"])
def test_optim_bits(make, ok):
    if ok:  # 4: kbit's 4-bit states (tests/test_optim_4bit.py); AdEMAMix has none
        assert make([_param(3)]).args.optim_bits == (4 if ok == 4 else 8)
    else:
        with pytest.raises(ValueError, match="optim_bits|bit"):
            make([_param(3)])


def test_optim_bits_from_args_is_checked_at_step():
    p = _param(3)
    opt = O.Adam([p], args=MockArgs(dict(optim_bits=5, min_8bit_size=0, max_unorm=0.0, skip_zeros=False)))
    p.grad = torch.ones(3)
    with pytest.raises(NotImplementedError, match="bits"):
        opt.step()


def test_betas_may_be_a_string():
    """bitsandbytes accepts betas="(0.9, 0.999)" (from command lines)."""
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    a, b = O.Adam8bit([p], betas="(0.8, 0.95)"), O.Adam8bit([q], betas=(0.8, 0.95))
    assert tuple(a.param_groups[0]["betas"]) == (0.8, 0.95)
    _steps(a, [p], n=2)
    _steps(b, [q], n=2)
    assert_bitwise_equal(p.detach(), q.detach(), "param")


def test_args_object_replaces_constructor_settings():
    p = _param(64, 65)
    opt = O.Adam([p], optim_bits=32, args=MockArgs(dict(optim_bits=8, min_8bit_size=4096, max_unorm=0.0,
                                                         skip_zeros=False)))
    _steps(opt, [p])
    assert _state_dtype(opt, p) == torch.uint8


def test_invalid_group_hyperparameter_raises_at_step():
    p = _param(10)
    opt = O.Adam([p])
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.ones(10)
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()


def test_lamb_max_unorm_threaded_to_config():
    for m in (0.0, 0.5, 2.0):
        assert O.LAMB([_param(3)], max_unorm=m).args.max_unorm == m
        assert O.LAMB8bit([_param(3)], max_unorm=m).args.max_unorm == m  # kbit's 8-bit LAMB honours it


# ---- gradient errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [BY_ID["Adam8bit"], BY_ID["Lion"], BY_ID["SGD"]], ids=repr)
def test_sparse_gradient_raises_a_clear_error(case):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = case.make(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_gradient_dtype_mismatch_raises():
    p = _param(10)
    p.grad_dtype = None  # torch refuses a gradient of another dtype unless told otherwise
    p.grad = torch.ones(10, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        O.Adam([p]).step()


def test_complex_parameter_raises():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    p.grad = torch.randn(4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        O.Adam([p]).step()


def test_float64_parameter_is_rejected_before_anything_changes():
    """A float64 parameter is rejected with TypeError; the rejected step must not leave a half-made state behind
    (a state created with step=1 but never updated would skew bias correction once the user fixes the dtype)."""
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.float64))
    p.grad = torch.randn(10, dtype=torch.float64)
    opt = O.Adam([p])
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        opt.step()
    assert len(opt.state[p]) == 0, f"state left behind: {dict(opt.state[p])}"


# ---- non-finite gradients -----------------------------------------------------------------------------------
#: What one non-finite gradient element does to its parameter element, per rule (documented behaviour; no rule
#: raises). NaN propagates everywhere. +inf: Adam-like rules and RMSprop/Adagrad compute inf/inf = NaN; SGD's
#: buffer and step become inf (the parameter -inf); Lion takes sign(inf) = 1, a finite step (its state is inf);
#: LARS's trust ratio threshold/inf = 0 scales the whole step to 0, and 0 * inf = NaN for that element.
NONFINITE_EFFECT = {  # case id: (effect of NaN, effect of +inf) on the parameter element
    "Adam": ("nan", "nan"), "AdEMAMix": ("nan", "nan"), "LAMB": ("nan", "nan"), "Lion": ("nan", "finite"),
    "SGD": ("nan", "-inf"), "LARS": ("nan", "nan"), "RMSprop": ("nan", "nan"), "Adagrad": ("nan", "nan"),
}


def _effect(x: float) -> str:
    return "nan" if math.isnan(x) else ("finite" if math.isfinite(x) else ("-inf" if x < 0 else "inf"))


@pytest.mark.parametrize("which", [0, 1], ids=["nan", "inf"])
@pytest.mark.parametrize("case_id", NONFINITE_EFFECT)
def test_non_finite_gradient_32bit(case_id, which):
    """32-bit: the bad element's parameter follows NONFINITE_EFFECT; rules without a trust ratio leave every other
    element exactly as a zero gradient there would."""
    case = BY_ID[case_id]
    bad_value = [float("nan"), float("inf")][which]
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    a, b = case.make([p]), case.make([q])
    g = _grad_for(p, 3)
    g[3, 7] = bad_value
    p.grad = g
    a.step()
    g2 = g.clone()
    g2[3, 7] = 0.0
    q.grad = g2
    b.step()
    assert _effect(float(p.detach()[3, 7])) == NONFINITE_EFFECT[case_id][which]
    if not case.trust_ratio:
        mask = torch.ones_like(p, dtype=torch.bool)
        mask[3, 7] = False
        assert_bitwise_equal(p.detach()[mask], q.detach()[mask], "other elements")


@pytest.mark.parametrize("case_id", ["Adam8bit", "Lion8bit", "SGD8bit", "AdEMAMix8bit", "Adagrad8bit"])
def test_non_finite_gradient_8bit_poisons_its_block_from_the_next_step(case_id):
    """8-bit: a NaN state value makes its block's absmax NaN, so from the next step on the whole 256-element block
    (and only that block) dequantizes to NaN. Nothing raises."""
    p = _param(64, 65)
    opt = BY_ID[case_id].make([p])
    g = _grad_for(p, 1)
    g.view(-1)[300] = float("nan")  # block 1
    p.grad = g
    opt.step()
    assert int((~torch.isfinite(p)).sum()) == 1
    absmax = opt.state[p]["absmax1"].reshape(-1, opt.state[p]["absmax1"].shape[-1])
    assert bool(absmax[:, 1].isnan().all()) and not bool(absmax[:, [0, 2]].isnan().any())
    p.grad = _grad_for(p, 2)
    opt.step()
    bad = ~torch.isfinite(p.detach().reshape(-1))
    assert bool(bad[256:512].all()) and not bool(bad[:256].any()) and not bool(bad[512:].any())


def test_percentile_clipping_ignores_a_non_finite_gradient_norm():
    p = _param(64, 65)
    opt = O.Adam([p], percentile_clipping=5)
    _steps(opt, [p], n=3)
    history = opt.state[p]["gnorm_vec"].clone()
    g = _grad_for(p, 9)
    g[0, 0] = float("inf")
    p.grad = g
    opt.step()
    assert_bitwise_equal(opt.state[p]["gnorm_vec"], history, "gnorm_vec after an inf gradient")
    assert int((~torch.isfinite(p)).sum()) == 1, "the rest of the tensor is updated (unclipped), not poisoned"
    _steps(opt, [p], n=1, seed=50)  # and training continues with the intact history
    assert int((~torch.isfinite(p)).sum()) == 1


# ---- skip_zeros ---------------------------------------------------------------------------------------------
SKIP_ZEROS_CASES = ["Adam-wd-betas", "Lion32bit-wd", "SGD32bit-nesterov-wd", "RMSprop32bit-wd",
                    "Adagrad32bit-decay-init-wd", "LAMB", "LARS32bit-nesterov-wd"]


def _skip_zeros_run(case, eight_bit=False):
    p = _param(64, 65, seed=1)
    opt = case.make([p])
    manager = GlobalOptimManager.get_instance()
    manager.override_config(p, "skip_zeros", True)
    if eight_bit:
        manager.override_config(p, key_value_dict={"optim_bits": 8, "min_8bit_size": 0})
    _steps(opt, [p], n=2)
    before = p.detach().clone()
    states_before = {key: kbit_state(opt, p, key, row).clone() for key, row, _ in case.states}
    g = _grad_for(p, 9)
    zero = torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    g[zero] = 0.0
    p.grad = g
    opt.step()
    return p, opt, before, states_before, zero


@pytest.mark.parametrize("case_id", SKIP_ZEROS_CASES)
def test_skip_zeros_32bit_leaves_zero_gradient_elements_untouched(case_id):
    """Elements whose gradient is exactly 0 keep parameter and state bit for bit (weight decay included);
    the others are updated."""
    case = BY_ID[case_id]
    p, opt, before, states_before, zero = _skip_zeros_run(case)
    assert_bitwise_equal(p.detach()[zero], before[zero], "params with zero gradient")
    for key, row, _ in case.states:
        assert_bitwise_equal(kbit_state(opt, p, key, row)[zero], states_before[key][zero], f"{key} with zero grad")
    # (a trust-ratio-scaled step can be below one float32 ulp of a few elements)
    assert float((p.detach()[~zero] != before[~zero]).float().mean()) > 0.9


@pytest.mark.parametrize("case_id", ["Adam-wd-betas", "Lion32bit-wd", "SGD32bit-nesterov-wd", "RMSprop32bit-wd"])
def test_skip_zeros_8bit(case_id):
    """8-bit: the parameter is untouched; the state keeps its float32 value, re-quantized with the block's new
    absmax (within half a code step of it)."""
    case = BY_ID[case_id]
    p, opt, before, states_before, zero = _skip_zeros_run(case, eight_bit=True)
    assert opt.state[p]["state1"].dtype == torch.uint8
    assert_bitwise_equal(p.detach()[zero], before[zero], "params with zero gradient")
    for key, row, _ in case.states:
        now = kbit_state(opt, p, key, row)[zero]
        absmax = opt.state[p][f"absmax{key[-1]}"].repeat_interleave(256)[: p.numel()].reshape(p.shape)[zero]
        half_step = 0.5 * float(opt.state[p][f"qmap{key[-1]}"].diff().max())  # the map's coarsest half-gap
        assert bool(((now - states_before[key][zero]).abs() <= half_step * absmax * (1 + 1e-6) + 1e-12).all())


def test_skip_zeros_without_it_zero_gradients_still_decay():
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    opt = O.AdamW([p], weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(p.detach(), q.detach() * (1 - 1e-3 * 0.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case_id,key", [("AdEMAMix", "skip_zeros"), ("Lion", "max_unorm"), ("Adagrad", "max_unorm"),
                                         ("AdEMAMix", "max_unorm")])
def test_settings_are_honoured_or_rejected(case_id, key):
    """A setting an optimizer cannot apply must be rejected, not silently ignored (style guide): skip_zeros and
    max_unorm reach every optimizer through ``args`` and overrides."""
    case = BY_ID[case_id]
    value = True if key == "skip_zeros" else 1e-6
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    GlobalOptimManager.get_instance().override_config(p, key, value)
    a, b = case.make([p]), case.make([q])
    g = _grad_for(p, 1)
    g[::2] = 0.0
    try:
        p.grad, q.grad = g, g.clone()
        a.step()
    except (ValueError, NotImplementedError):
        return  # rejected: fine
    b.step()
    assert not torch.equal(p, q), f"{case_id}: the {key} override was silently ignored"


# ---- percentile clipping ------------------------------------------------------------------------------------
def _expected_scales(norms, percentile):
    """bitsandbytes' documented algorithm (fact sheet 7.1), written independently: the first step fills all 100
    slots with ||g||^2, step t writes slot t % 100; the clip value is the square root of the `percentile`-th
    smallest entry; a gradient whose norm exceeds it is scaled down to it."""
    history = [0.0] * 100
    scales = []
    for t, norm in enumerate(norms, start=1):
        if t == 1:
            history = [norm**2] * 100
        else:
            history[t % 100] = norm**2
        clip = math.sqrt(sorted(history)[percentile])
        scales.append(clip / norm if norm > clip else 1.0)
    return scales, history


#: Our scale is computed from float64 norms, kbit's from float32 ones (squared in float32): they agree to a few
#: float32 ulps, and a scaled gradient differs by as much.
CLIP_SCALE_RTOL, CLIP_PARAM_ATOL = 1e-6, 1e-9


@pytest.mark.parametrize("case_id", ["Adam", "Adam8bit", "Lion8bit", "SGD"])
def test_percentile_clipping_scales_a_spike(case_id):
    case = BY_ID[case_id]
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    clipped, twin = case.make([p], percentile_clipping=5), case.make([q])
    g = torch.Generator().manual_seed(11)
    grads = [torch.randn(64, 65, generator=g) * 0.01 * (1 + 0.1 * i) for i in range(12)]
    grads.append(torch.randn(64, 65, generator=g) * 0.5)  # a spike: 50x the usual norm
    norms = [float(torch.linalg.vector_norm(x)) for x in grads]
    scales, history = _expected_scales(norms, 5)
    assert scales[-1] < 0.05 and scales[0] == 1.0
    for grad, scale in zip(grads, scales):
        p.grad = grad.clone()
        clipped.step()
        q.grad = grad * torch.tensor(scale, dtype=torch.float32)  # what the kernel multiplies by
        twin.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=CLIP_SCALE_RTOL, atol=CLIP_PARAM_ATOL,
                                   msg=lambda m: f"clipped step with scale {scale}: {m}")
    torch.testing.assert_close(clipped.state[p]["gnorm_vec"], torch.tensor(history, dtype=torch.float32), rtol=1e-5,
                               atol=0)


def test_percentile_clipping_off_by_default_and_state_key():
    p = _param(64, 65)
    opt = O.Adam([p])
    _steps(opt, [p])
    assert "gnorm_vec" not in opt.state[p]
    opt5 = O.Adam([q := _param(64, 65)], percentile_clipping=5)
    _steps(opt5, [q])
    st = opt5.state[q]["gnorm_vec"]
    assert st.shape == (100,) and st.dtype == torch.float32 and bool((st == st[0]).all())


def test_percentile_clipping_override_after_state_exists():
    """Overrides are read at every step; turning percentile clipping on for a parameter that already has state
    must work (the history starts then), not fail with KeyError."""
    p = _param(64, 65)
    opt = O.Adam([p])
    _steps(opt, [p])
    GlobalOptimManager.get_instance().override_config(p, "percentile_clipping", 5)
    _steps(opt, [p], seed=3)  # kbit 0.1.0: KeyError: 'gnorm_vec'
    assert opt.state[p]["step"] == 2


# ---- trust ratios (LAMB, LARS) -------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["LAMB", "LAMB32bit-wd-nobc", "LAMB8bit", "LAMB8bit-blockwise-wd-nobc", "LARS",
                                     "LARS8bit", "LARS32bit-nesterov-wd"])
def test_trust_ratio_records_unorm_and_clips(case_id):
    """unorm_vec holds the update norm (> 0) after every step, also in 8-bit; with the tests' scales the ratio
    binds, so the step differs from the same rule without it (max_unorm=0)."""
    case = BY_ID[case_id]
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    a, b = case.make([p]), case.make([q], max_unorm=0.0)
    for i in range(3):
        p.grad = q.grad = _grad_for(p, i)
        a.step()
        b.step()
        unorm = float(a.state[p]["unorm_vec"])
        assert unorm > 0 and math.isfinite(unorm)
    assert "unorm_vec" not in b.state[q]
    assert not torch.equal(p, q)
    # The step was scaled down: LAMB/LARS move the parameter less than the unclipped rule.
    start = _param(64, 65, seed=1).detach()
    assert float((p.detach() - start).norm()) < float((q.detach() - start).norm())


@pytest.mark.parametrize("clipped,plain", [(O.LAMB, O.Adam), (O.LAMB8bit, O.Adam8bit), (O.LARS, O.SGD),
                                           (O.LARS8bit, O.SGD8bit)])
def test_trust_ratio_off_is_the_plain_rule(clipped, plain):
    kw = dict(lr=0.01, momentum=0.9) if plain in (O.SGD, O.SGD8bit) else {}
    extra = {} if clipped in (O.LARS, O.LARS8bit) else dict(block_wise=True)
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    a, b = clipped([p], max_unorm=0.0, **kw, **extra), plain([q], **kw)
    if clipped is O.LARS8bit:  # LARS is always tensor-wise in 8-bit
        b = plain([q], block_wise=False, **kw)
    for i in range(3):
        p.grad = q.grad = _grad_for(p, i)
        a.step()
        b.step()
    assert_bitwise_equal(p.detach(), q.detach(), "param")


def test_lamb_max_unorm_changes_update():
    """bitsandbytes' test_lamb_max_unorm_changes_update: a tiny and a large max_unorm give different steps."""
    out = []
    for m in (1e-4, 10.0):
        p = _param(128, 128, seed=1)
        opt = O.LAMB([p], lr=0.1, max_unorm=m)
        p.grad = torch.randn(128, 128, generator=torch.Generator().manual_seed(0)) * 5
        opt.step()
        out.append(p.detach())
    assert not torch.equal(out[0], out[1])


# ---- batching, per-parameter steps, closures, odd tensors ---------------------------------------------------
MODEL_SHAPES = [(64, 65), (7,), (300,), (33, 130), (1,), (17, 257)]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_multi_tensor_batching_equals_one_optimizer_per_parameter(case):
    """One fused call over all parameters gives exactly what separate optimizers give, trust ratios included."""
    params = [_param(*s, seed=i) for i, s in enumerate(MODEL_SHAPES)]
    single = [_param(*s, seed=i) for i, s in enumerate(MODEL_SHAPES)]
    opt = case.make([{"params": params[:3]}, {"params": params[3:]}])
    opts = [case.make([p]) for p in single]
    for i in range(3):
        for j, (p, q) in enumerate(zip(params, single)):
            p.grad = q.grad = _grad_for(p, 10 * i + j)
        opt.step()
        for o in opts:
            o.step()
    for j, (p, q) in enumerate(zip(params, single)):
        assert_bitwise_equal(p.detach(), q.detach(), f"param {j}")
        for key in opt.state[p]:
            if isinstance(opt.state[p][key], torch.Tensor):
                assert_bitwise_equal(opt.state[p][key], opts[j].state[q][key], f"param {j} {key}")


@pytest.mark.parametrize("case_id", ["Adam8bit", "AdEMAMix-optim_bits8-scheduled", "LARS", "Lion"])
def test_update_step_equals_step(case_id):
    case = BY_ID[case_id]
    params = [_param(*s, seed=i) for i, s in enumerate(MODEL_SHAPES)]
    single = [_param(*s, seed=i) for i, s in enumerate(MODEL_SHAPES)]
    a, b = case.make(params), case.make(single)
    for i in range(2):
        for j, (p, q) in enumerate(zip(params, single)):
            p.grad = q.grad = _grad_for(p, 10 * i + j)
        a.step()
        for pindex, q in enumerate(single):
            if len(b.state[q]) == 0:
                b.init_state(b.param_groups[0], q, 0, pindex)
            b.update_step(b.param_groups[0], q, 0, pindex)
    for p, q in zip(params, single):
        assert_bitwise_equal(p.detach(), q.detach(), "param")


def test_step_with_closure_returns_the_loss():
    model = torch.nn.Linear(8, 4)
    opt = O.Adam8bit(model.parameters())
    x = torch.randn(16, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    assert not torch.equal(before, model.weight)


def test_parameters_without_gradient_are_skipped():
    p, q = _param(10, seed=1), _param(10, seed=2)
    opt = O.Adam([p, q])
    p.grad = torch.ones(10)
    before = q.detach().clone()
    opt.step()
    assert len(opt.state[q]) == 0 and torch.equal(q.detach(), before) and opt.state[p]["step"] == 1


@pytest.mark.parametrize("case_id", ["Adam8bit", "Lion", "LAMB", "AdEMAMix8bit"])
def test_non_contiguous_parameter_and_gradient(case_id):
    """A transposed parameter and gradient are updated in place (the caller's view sees it), exactly like
    contiguous copies (STYLE: nanobind must not silently update a temporary copy)."""
    case = BY_ID[case_id]
    base = torch.randn(65, 64, generator=torch.Generator().manual_seed(1)) * 0.1
    p = torch.nn.Parameter(base.t())  # non-contiguous
    q = torch.nn.Parameter(base.t().contiguous())
    a, b = case.make([p]), case.make([q])
    for i in range(3):
        g = torch.randn(64, 65, generator=torch.Generator().manual_seed(i)) * 0.01
        p.grad = g.t().contiguous().t()  # a non-contiguous gradient too
        q.grad = g.clone()
        assert not p.is_contiguous() and not p.grad.is_contiguous()
        a.step()
        b.step()
    assert_bitwise_equal(p.detach().contiguous(), q.detach(), "param")


@pytest.mark.parametrize("case_id", ["Adam", "Adam8bit", "Lion8bit", "AdEMAMix8bit", "LAMB8bit", "LARS"])
def test_empty_parameter(case_id):
    p = torch.nn.Parameter(torch.zeros(0))
    q = _param(64, 65)
    opt = BY_ID[case_id].make([p, q], min_8bit_size=0)
    _steps(opt, [p, q], n=2)
    assert opt.state[p]["step"] == 2 and bool(torch.isfinite(q).all())


def test_lr_scheduler_changes_the_lr():
    p, q = _param(64, 65, seed=1), _param(64, 65, seed=1)
    a, b = O.Adam8bit([p], lr=1e-2), O.Adam8bit([q], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    for i in range(3):
        p.grad = q.grad = _grad_for(p, i)
        a.step()
        b.step()
        sched.step()
        b.param_groups[0]["lr"] *= 0.5
    assert_bitwise_equal(p.detach(), q.detach(), "param")
