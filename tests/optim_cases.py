"""The table of kbit optimizers the optimizer tests iterate over (PyTorch's ``optim_db`` idea): every
optimizer class kbit.optim exports, with hyper-parameters, its reference optimizer, and how kbit's state
tensors map to the reference's state names. Generic tests (numerics, state_dict round trips, cross-level
identity, ...) take their rows from here; ``test_every_optimizer_class_is_in_the_table`` keeps it complete.

Hyper-parameters are chosen so that every rule's distinctive part is active: weight decay in some rows,
Nesterov and dampening for SGD, lr_decay and an initial accumulator for Adagrad, schedules for AdEMAMix,
and (with the tests' p ~ 0.1 N(0,1), g ~ 0.01 N(0,1)) trust ratios that actually clip for LAMB and LARS.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import kbit.optim as O
import optim_references as R

#: kbit state key, row of that state tensor (AdEMAMix's state1 stacks m1 and m2) or None, reference state key.
StateMap = tuple[tuple[str, "int | None", str], ...]

ADAM_STATES: StateMap = (("state1", None, "exp_avg"), ("state2", None, "exp_avg_sq"))
ADEMAMIX_STATES: StateMap = (("state1", 0, "m1"), ("state1", 1, "m2"), ("state2", None, "nu"))
LION_STATES: StateMap = (("state1", None, "exp_avg"),)
MOMENTUM_STATES: StateMap = (("state1", None, "momentum_buffer"),)
RMSPROP_STATES: StateMap = (("state1", None, "square_avg"),)
ADAGRAD_STATES: StateMap = (("state1", None, "sum"),)


@dataclass(frozen=True)
class OptimCase:
    """One row: ``cls(params, **kwargs)`` should behave like ``reference(params)``."""

    id: str
    cls: type
    kwargs: dict[str, Any]
    reference: Callable[[list], torch.optim.Optimizer]
    states: StateMap
    #: the bitsandbytes class of the same name and its kwargs, where bitsandbytes' semantics agree (interop).
    bnb_kwargs: dict[str, Any] | None = field(default=None)

    def make(self, params, **extra) -> O.Optimizer8bit:
        return self.cls(params, **{**self.kwargs, **extra})

    def _default(self, name: str):
        """The row's value of a constructor argument: its kwargs, else the class's default (None if absent)."""
        if name in self.kwargs:
            return self.kwargs[name]
        parameter = inspect.signature(self.cls.__init__).parameters.get(name)
        return None if parameter is None else parameter.default

    @property
    def eight_bit(self) -> bool:
        forced = getattr(self.cls, "_FORCED_BITS", None)
        return (forced or self._default("optim_bits")) == 8

    @property
    def paged(self) -> bool:
        return bool(getattr(self.cls, "_FORCED_PAGED", False) or self._default("is_paged"))

    @property
    def block_wise(self) -> bool:
        """Whether 8-bit state is blockwise (LARS has no block_wise argument: always tensor-wise)."""
        value = self._default("block_wise")
        return False if value is None and issubclass(self.cls, O.LARS) else value is not False

    @property
    def max_unorm(self) -> float:
        value = self._default("max_unorm")
        return 0.0 if value is None else float(value)

    @property
    def trust_ratio(self) -> bool:
        return self.max_unorm > 0.0

    def __repr__(self) -> str:  # pytest ids
        return self.id


def _adam(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999)):
    if weight_decay:
        return lambda ps: torch.optim.AdamW(ps, lr=lr, betas=betas, weight_decay=weight_decay)
    return lambda ps: torch.optim.Adam(ps, lr=lr, betas=betas)


def _sgd(**kw):
    return lambda ps: torch.optim.SGD(ps, **kw)


def _rmsprop(**kw):
    return lambda ps: torch.optim.RMSprop(ps, **kw)


def _adagrad(**kw):
    return lambda ps: torch.optim.Adagrad(ps, **kw)


def _case(id, cls, kwargs, reference, states, bnb_kwargs=None):
    return OptimCase(id, cls, kwargs, reference, states, bnb_kwargs)


ADAMW_DEFAULT = _adam(weight_decay=1e-2)
LION = lambda ps: R.ReferenceLion(ps)  # noqa: E731
LION_WD = lambda ps: R.ReferenceLion(ps, lr=3e-4, weight_decay=0.1)  # noqa: E731
ADEMAMIX = lambda ps: R.ReferenceAdEMAMix(ps)  # noqa: E731
# Schedules long enough to be mid-way during the tests' 10-20 steps (bitsandbytes tests use 20 and 100).
ADEMAMIX_SCHEDULED = lambda ps: R.ReferenceAdEMAMix(ps, t_alpha=15, t_beta3=15)  # noqa: E731
SCHEDULE = dict(t_alpha=15, t_beta3=15)
LAMB = lambda ps: R.ReferenceLAMB(ps, lr=1e-3)  # noqa: E731
LAMB_VARIANT = lambda ps: R.ReferenceLAMB(  # noqa: E731
    ps, lr=2e-3, weight_decay=0.1, bias_correction=False, max_unorm=0.5)
LARS = lambda ps: R.ReferenceLARS(ps, lr=0.01, momentum=0.9)  # noqa: E731
LARS_VARIANT = lambda ps: R.ReferenceLARS(ps, lr=0.01, momentum=0.9, weight_decay=1e-2, nesterov=True)  # noqa: E731
SGD_KW = dict(lr=0.01, momentum=0.9)
RMS_KW = dict(lr=0.01, alpha=0.9)

# ---- 32-bit state (and the Paged variants, which behave like the plain ones on CPU) --------------------------
CASES_32BIT = [
    _case("Adam", O.Adam, {}, _adam(), ADAM_STATES, {}),
    _case("Adam-wd-betas", O.Adam, dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95)),
          _adam(1e-2, 0.1, (0.8, 0.95)), ADAM_STATES),
    _case("Adam32bit", O.Adam32bit, {}, _adam(), ADAM_STATES, {}),
    _case("PagedAdam", O.PagedAdam, {}, _adam(), ADAM_STATES),
    _case("PagedAdam32bit", O.PagedAdam32bit, {}, _adam(), ADAM_STATES),
    _case("AdamW", O.AdamW, {}, ADAMW_DEFAULT, ADAM_STATES, {}),
    _case("AdamW32bit", O.AdamW32bit, {}, ADAMW_DEFAULT, ADAM_STATES),
    _case("PagedAdamW", O.PagedAdamW, {}, ADAMW_DEFAULT, ADAM_STATES),
    _case("PagedAdamW32bit", O.PagedAdamW32bit, {}, ADAMW_DEFAULT, ADAM_STATES),
    _case("LAMB", O.LAMB, {}, LAMB, ADAM_STATES),
    _case("LAMB32bit-wd-nobc", O.LAMB32bit, dict(lr=2e-3, weight_decay=0.1, bias_correction=False, max_unorm=0.5),
          LAMB_VARIANT, ADAM_STATES),
    _case("AdEMAMix", O.AdEMAMix, {}, ADEMAMIX, ADEMAMIX_STATES, {}),
    _case("AdEMAMix32bit-scheduled", O.AdEMAMix32bit, SCHEDULE, ADEMAMIX_SCHEDULED, ADEMAMIX_STATES),
    _case("PagedAdEMAMix", O.PagedAdEMAMix, {}, ADEMAMIX, ADEMAMIX_STATES),
    _case("PagedAdEMAMix32bit", O.PagedAdEMAMix32bit, {}, ADEMAMIX, ADEMAMIX_STATES),
    _case("Lion", O.Lion, {}, LION, LION_STATES, {}),
    _case("Lion32bit-wd", O.Lion32bit, dict(lr=3e-4, weight_decay=0.1), LION_WD, LION_STATES),
    _case("PagedLion", O.PagedLion, {}, LION, LION_STATES),
    _case("PagedLion32bit", O.PagedLion32bit, {}, LION, LION_STATES),
    _case("SGD", O.SGD, SGD_KW, _sgd(**SGD_KW), MOMENTUM_STATES, SGD_KW),
    _case("SGD32bit-nesterov-wd", O.SGD32bit, dict(SGD_KW, nesterov=True, weight_decay=1e-2),
          _sgd(**SGD_KW, nesterov=True, weight_decay=1e-2), MOMENTUM_STATES),
    _case("SGD-dampening", O.SGD, dict(SGD_KW, dampening=0.3), _sgd(**SGD_KW, dampening=0.3), MOMENTUM_STATES),
    _case("LARS", O.LARS, SGD_KW, LARS, MOMENTUM_STATES),
    _case("LARS32bit-nesterov-wd", O.LARS32bit, dict(SGD_KW, nesterov=True, weight_decay=1e-2), LARS_VARIANT,
          MOMENTUM_STATES),
    _case("RMSprop", O.RMSprop, RMS_KW, _rmsprop(**RMS_KW), RMSPROP_STATES, RMS_KW),
    _case("RMSprop32bit-wd", O.RMSprop32bit, dict(RMS_KW, weight_decay=1e-2), _rmsprop(**RMS_KW, weight_decay=1e-2),
          RMSPROP_STATES),
    _case("Adagrad", O.Adagrad, {}, _adagrad(), ADAGRAD_STATES, {}),
    _case("Adagrad32bit-decay-init-wd", O.Adagrad32bit,
          dict(lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=1e-2),
          _adagrad(lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=1e-2), ADAGRAD_STATES),
]

# ---- 8-bit state --------------------------------------------------------------------------------------------
CASES_8BIT = [
    _case("Adam8bit", O.Adam8bit, {}, _adam(), ADAM_STATES, {}),
    _case("Adam-optim_bits8-wd", O.Adam, dict(optim_bits=8, lr=1e-2, weight_decay=0.1),
          _adam(1e-2, 0.1), ADAM_STATES),
    _case("Adam8bit-tensorwise", O.Adam8bit, dict(block_wise=False), _adam(), ADAM_STATES),
    _case("PagedAdam8bit", O.PagedAdam8bit, {}, _adam(), ADAM_STATES),
    _case("AdamW8bit", O.AdamW8bit, {}, ADAMW_DEFAULT, ADAM_STATES, {}),
    _case("PagedAdamW8bit", O.PagedAdamW8bit, {}, ADAMW_DEFAULT, ADAM_STATES),
    _case("LAMB8bit", O.LAMB8bit, {}, LAMB, ADAM_STATES),
    _case("LAMB8bit-blockwise-wd-nobc", O.LAMB8bit,
          dict(block_wise=True, lr=2e-3, weight_decay=0.1, bias_correction=False, max_unorm=0.5), LAMB_VARIANT,
          ADAM_STATES),
    _case("AdEMAMix8bit", O.AdEMAMix8bit, {}, ADEMAMIX, ADEMAMIX_STATES, {}),
    _case("AdEMAMix-optim_bits8-scheduled", O.AdEMAMix, dict(optim_bits=8, **SCHEDULE), ADEMAMIX_SCHEDULED,
          ADEMAMIX_STATES),
    _case("PagedAdEMAMix8bit", O.PagedAdEMAMix8bit, {}, ADEMAMIX, ADEMAMIX_STATES),
    _case("Lion8bit", O.Lion8bit, {}, LION, LION_STATES, {}),
    _case("Lion8bit-tensorwise-wd", O.Lion8bit, dict(block_wise=False, lr=3e-4, weight_decay=0.1), LION_WD,
          LION_STATES),
    _case("PagedLion8bit", O.PagedLion8bit, {}, LION, LION_STATES),
    _case("SGD8bit", O.SGD8bit, SGD_KW, _sgd(**SGD_KW), MOMENTUM_STATES, SGD_KW),
    _case("SGD8bit-nesterov-wd-tensorwise", O.SGD8bit, dict(SGD_KW, nesterov=True, weight_decay=1e-2,
                                                             block_wise=False),
          _sgd(**SGD_KW, nesterov=True, weight_decay=1e-2), MOMENTUM_STATES),
    _case("LARS8bit", O.LARS8bit, SGD_KW, LARS, MOMENTUM_STATES),
    _case("RMSprop8bit", O.RMSprop8bit, RMS_KW, _rmsprop(**RMS_KW), RMSPROP_STATES, RMS_KW),
    _case("RMSprop8bit-tensorwise-wd", O.RMSprop8bit, dict(RMS_KW, block_wise=False, weight_decay=1e-2),
          _rmsprop(**RMS_KW, weight_decay=1e-2), RMSPROP_STATES),
    _case("Adagrad8bit", O.Adagrad8bit, {}, _adagrad(), ADAGRAD_STATES, {}),
    _case("Adagrad8bit-decay-init-wd", O.Adagrad8bit,
          dict(lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=1e-2),
          _adagrad(lr_decay=0.05, initial_accumulator_value=0.1, weight_decay=1e-2), ADAGRAD_STATES),
]

CASES = CASES_32BIT + CASES_8BIT
BY_ID = {case.id: case for case in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"

#: Every concrete optimizer class kbit.optim exports (PytorchLARS is a plain torch optimizer).
#: Every concrete optimizer class kbit exports (the table must cover them, 4-bit classes excepted).
ALL_OPTIMIZER_CLASSES = sorted(
    (getattr(O, name) for name in O.__all__
     if isinstance(getattr(O, name), type) and issubclass(getattr(O, name), O.Optimizer8bit)
     and getattr(O, name) not in (O.Optimizer8bit, O.Optimizer1State, O.Optimizer2State)),
    key=lambda c: c.__name__,
)
#: 4-bit classes (a kbit extension with no bitsandbytes or torch counterpart, and no 8-bit-style layout) have their
#: own module, tests/test_optim_4bit.py, against the pure-PyTorch reference; the table's generic tests cover the rest.
FOUR_BIT_CLASSES = [c for c in ALL_OPTIMIZER_CLASSES if getattr(c, "_FORCED_BITS", None) == 4]
OPTIMIZER_CLASSES = [c for c in ALL_OPTIMIZER_CLASSES if c not in FOUR_BIT_CLASSES]


# ---- helpers shared by the optimizer tests ---------------------------------------------------------------------
def _rows(st: dict, p: torch.Tensor, key: str) -> int:
    return st[key].shape[0] if st[key].dim() == p.dim() + 1 else 1


def state_scale(optimizer, p: torch.Tensor, key: str, row: int | None) -> torch.Tensor:
    """The per-element absmax of an 8-bit state (what its code values are multiplied by), p's shape."""
    st = optimizer.state[p]
    j, n, rows = int(key[-1]), p.numel(), _rows(st, p, key)
    if f"absmax{j}" in st:
        absmax = st[f"absmax{j}"].reshape(rows, -1)[row or 0]
        blocksize = 256 if absmax.numel() == -(-n // 256) else 2048  # bitsandbytes < 0.44 used 2048
        return absmax.repeat_interleave(blocksize)[:n].reshape(p.shape)
    return st[f"max{j}"].reshape(rows)[row or 0].expand(n).reshape(p.shape)


def kbit_state(optimizer, p: torch.Tensor, key: str, row: int | None) -> torch.Tensor:
    """A kbit state as float32 values of p's shape: dequantized (blockwise or tensor-wise) in 8-bit mode."""
    st = optimizer.state[p]
    s = st[key]
    if s.dtype == torch.float32:
        return (s if row is None else s[row]).reshape(p.shape)
    codes = s.reshape(_rows(st, p, key), -1)[row or 0].long()
    return st[f"qmap{key[-1]}"][codes].reshape(p.shape) * state_scale(optimizer, p, key, row)


def all_tensors(optimizer) -> dict[str, torch.Tensor]:
    """Every state tensor of every parameter, keyed "index/key" (for bitwise comparisons)."""
    out = {}
    for i, p in enumerate(q for g in optimizer.param_groups for q in g["params"]):
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{i}/{key}"] = value
    return out
