"""The update-rule families and how a step of each is handed to its fused op.

A family fixes the state layout (how many state tensors, how many logical states each holds, which
code map each uses) and which ``kbit::*_step_`` op applies it. Parameters with the same family,
device, dtype, state format and hyper-parameters are updated together in one op call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..formats import OPTIMIZER_BLOCKSIZE_4BIT, OPTIMIZER_BLOCKSIZE_8BIT

#: Block size of 8-bit optimizer states written by bitsandbytes before 0.44.
LEGACY_OPTIMIZER_BLOCKSIZE_8BIT = 2048


@dataclass(frozen=True)
class Family:
    op: str                   # name of the kbit op
    rows: tuple[int, ...]     # logical states held by state1, state2, ...
    signed: tuple[bool, ...]  # code map of each state tensor: signed "dynamic" or unsigned "udynamic"
    hyper: Callable[[dict], tuple]  # the op's shared hyper-parameters, from a parameter's config


def _adam(c):
    return (c["betas"][0], c["betas"][1], c["eps"], c["weight_decay"], c["max_unorm"], bool(c["skip_zeros"]),
            bool(c.get("bias_correction", True)))


def _ademamix(c):
    return (c["betas"][0], c["betas"][1], c["eps"], c["weight_decay"])


def _lion(c):
    return (c["betas"][0], c["betas"][1], c["weight_decay"], bool(c["skip_zeros"]))


def _momentum(c):
    return (c["betas"][0], c["betas"][1], c["weight_decay"], bool(c.get("nesterov", False)), c["max_unorm"],
            c["eps"], bool(c["skip_zeros"]))


def _rmsprop(c):
    return (c["betas"][0], c["eps"], c["weight_decay"], c["max_unorm"], bool(c["skip_zeros"]))


def _adagrad(c):
    return (c["eps"], c["weight_decay"], c.get("lr_decay", 0.0), bool(c["skip_zeros"]))


ADAM = Family("adam_step_", (1, 1), (True, False), _adam)
ADEMAMIX = Family("ademamix_step_", (2, 1), (True, False), _ademamix)
LION = Family("lion_step_", (1,), (True,), _lion)
MOMENTUM = Family("momentum_step_", (1,), (True,), _momentum)
RMSPROP = Family("rmsprop_step_", (1,), (True,), _rmsprop)
ADAGRAD = Family("adagrad_step_", (1,), (True,), _adagrad)

#: optimizer_name -> family. "lamb" is Adam with a trust ratio (max_unorm), "lars" momentum with one.
FAMILIES = {
    "adam": ADAM, "lamb": ADAM, "ademamix": ADEMAMIX, "lion": LION,
    "momentum": MOMENTUM, "lars": MOMENTUM, "rmsprop": RMSPROP, "adagrad": ADAGRAD,
}
#: Group keys beyond lr/betas/eps/weight_decay that some families read.
EXTRA_GROUP_KEYS = ("nesterov", "lr_decay", "bias_correction", "initial_accumulator_value")


# Rules that have no trust ratio or no skip_zeros support (their kernels do not take the setting).
_NO_TRUST_RATIO = ("lion", "adagrad", "ademamix")
_NO_SKIP_ZEROS = ("ademamix",)


#: Rules with 4-bit states (Note [4-bit optimizer states]): first-moment states (signed map) and Adam's second
#: moment (zero-free map). RMSprop/Adagrad (a lone second moment) and AdEMAMix are not offered in 4 bits.
FOUR_BIT_RULES = ("adam", "lion", "momentum")


def check_bits(name: str, optim_bits: int) -> None:
    """At construction: 4-bit states exist only for FOUR_BIT_RULES (``args`` objects are checked at step)."""
    if optim_bits == 4 and name not in FOUR_BIT_RULES:
        raise ValueError(f"optim_bits=4 is implemented for Adam/AdamW, Lion and SGD with momentum, not {name}; "
                         "use optim_bits=8")


def check_supported(name: str, config: dict) -> None:
    """Reject settings a rule does not implement instead of ignoring them."""
    check_bits(name, config["optim_bits"])  # again here: `args` objects and overrides bypass the constructor
    if config["optim_bits"] == 4:
        if not config["block_wise"]:
            raise ValueError("4-bit optimizer states are always blockwise; set block_wise=True")
        if config["max_unorm"] > 0.0:
            raise ValueError("4-bit optimizer states do not support max_unorm (trust-ratio clipping); set it to 0")
    if config["max_unorm"] > 0.0 and name in _NO_TRUST_RATIO:
        raise ValueError(f"max_unorm (trust-ratio clipping) is not implemented for {name}; set it to 0")
    if config["skip_zeros"] and name in _NO_SKIP_ZEROS:
        raise ValueError(f"skip_zeros is not implemented for {name}; set it to False")


def translate_overrides(name: str, config: dict, overrides: dict) -> dict:
    """Override keys that are stored inside `betas` for this rule (SGD/LARS: momentum, dampening; RMSprop:
    alpha) are folded into betas, so the override takes effect."""
    overrides = dict(overrides)
    positions = {"momentum": {"momentum": 0, "dampening": 1}, "lars": {"momentum": 0, "dampening": 1},
                 "rmsprop": {"alpha": 0}}.get(name, {})
    if any(key in overrides for key in positions):
        betas = list(overrides.get("betas", config["betas"]))
        for key, index in positions.items():
            if key in overrides:
                betas[index] = overrides.pop(key)
        overrides["betas"] = tuple(betas)
    return overrides


def check_name(name: str, states: int) -> None:
    family = FAMILIES.get(name)
    if family is None or len(family.rows) != states:
        valid = sorted(n for n, f in FAMILIES.items() if len(f.rows) == states)
        raise ValueError(f"unknown {states}-state optimizer {name!r}: choose one of {', '.join(valid)}")


#: How many betas each rule reads (SGD/LARS: momentum, dampening; RMSprop: alpha; Adagrad: none).
BETAS_USED = {"adam": 2, "lamb": 2, "ademamix": 3, "lion": 2, "momentum": 2, "lars": 2, "rmsprop": 1, "adagrad": 0}


def check_betas(name: str, betas) -> None:
    """betas must be numbers, at least as many as the rule reads (a short tuple would fail inside step())."""
    need = BETAS_USED[name]
    if (not isinstance(betas, (tuple, list)) or len(betas) < need
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)):
        raise ValueError(f"{name} needs betas: a tuple of at least {need} numbers (got {betas!r})")


def ademamix_schedule(config: dict, step: int) -> tuple[float, float]:
    """AdEMAMix's alpha and beta3 at ``step`` (Pagliardini et al. 2024, Algorithm 1): alpha ramps up
    linearly over t_alpha steps; beta3 moves from beta1 to beta3 over t_beta3 steps along the half-life
    interpolation. 0 or None switches a schedule off."""
    beta1, beta3 = config["betas"][0], config["betas"][2]
    alpha, t_alpha, t_beta3 = config["alpha"], config.get("t_alpha"), config.get("t_beta3")
    alpha_t = min(step * alpha / t_alpha, alpha) if t_alpha else alpha
    if t_beta3:
        ln_b1, ln_b3 = math.log(beta1), math.log(beta3)
        frac = step / t_beta3
        beta3_t = min(math.exp(ln_b1 * ln_b3 / ((1 - frac) * ln_b3 + frac * ln_b1)), beta3)
    else:
        beta3_t = beta3
    return alpha_t, beta3_t


@dataclass
class Item:
    p: torch.Tensor
    grad: torch.Tensor
    state: dict
    lr: float
    step: int
    gnorm_scale: float
    extra: tuple = ()
    sr_seed: int | None = None  # Note [stochastic rounding]; None: round to nearest


def _state_format(p: torch.Tensor, state: dict) -> tuple:
    """(bits, blocksize) of a state: 32-bit; 8-bit blockwise (absmax per block) or tensor-wise (max, 0);
    4-bit (16-value code maps, always blockwise)."""
    if state["state1"].dtype == torch.float32:
        return (32, 0)
    if state["qmap1"].numel() == 16:
        return (4, OPTIMIZER_BLOCKSIZE_4BIT)
    if "absmax1" not in state:
        return (8, 0)
    return (8, state_blocksize(p.numel(), state["absmax1"].shape[-1]))


def state_blocksize(n: int, blocks: int, four_bit: bool = False) -> int:
    """Block size of an 8-bit state with ``blocks`` absmax values: 256 (bitsandbytes >= 0.44) or 2048
    (older checkpoints); of a 4-bit state: 128. ValueError if none fits."""
    if four_bit:
        if blocks != -(-n // OPTIMIZER_BLOCKSIZE_4BIT):
            raise ValueError(f"4-bit state has {blocks} absmax values per row; a parameter of {n} elements "
                             f"needs {-(-n // OPTIMIZER_BLOCKSIZE_4BIT)} (blocks of {OPTIMIZER_BLOCKSIZE_4BIT})")
        return OPTIMIZER_BLOCKSIZE_4BIT
    for blocksize in (OPTIMIZER_BLOCKSIZE_8BIT, LEGACY_OPTIMIZER_BLOCKSIZE_8BIT):
        if blocks == -(-n // blocksize):
            return blocksize
    raise ValueError(
        f"8-bit state has {blocks} absmax values per row, which fits neither blocks of {OPTIMIZER_BLOCKSIZE_8BIT} "
        f"nor of {LEGACY_OPTIMIZER_BLOCKSIZE_8BIT} for a parameter of {n} elements"
    )


def prepare(family: Family, p, grad, state: dict, config: dict, gnorm_scale: float,
            sr_seed: int | None = None) -> tuple[tuple, Item]:
    """The batching key and the work item of one parameter's step."""
    fmt = _state_format(p, state)
    qmaps = tuple(id(state[f"qmap{j + 1}"]) for j in range(len(family.rows))) if fmt[0] in (4, 8) else ()
    extra = ()
    if family is ADEMAMIX:
        alpha_t, beta3_t = ademamix_schedule(config, state["step"])
        extra = (beta3_t, alpha_t)
    key = (family.op, p.device, p.dtype, fmt, qmaps, sr_seed is not None, family.hyper(config))  # hyper last
    return key, Item(p, grad, state, float(config["lr"]), int(state["step"]), float(gnorm_scale), extra, sr_seed)


def _absmax(state: dict, j: int) -> torch.Tensor:
    return state[f"absmax{j}"] if f"absmax{j}" in state else state[f"max{j}"]


def launch(family: Family, key: tuple, items: list[Item]) -> None:
    """Run one fused op over a batch of parameters that share ``key``."""
    _, _, _, (bits, blocksize), _, stochastic, hyper = key
    sr = {"sr_seed": [it.sr_seed for it in items]} if stochastic else {}
    nstates = len(family.rows)
    params = [it.p for it in items]
    grads = [it.grad for it in items]
    storages = [[it.state[f"state{j + 1}"] for it in items] for j in range(nstates)]
    if bits in (4, 8):
        absmaxes = [[_absmax(it.state, j + 1) for it in items] for j in range(nstates)]
        qmaps = [items[0].state[f"qmap{j + 1}"] for j in range(nstates)]
    else:
        absmaxes = [[] for _ in range(nstates)]
        qmaps = []
    lr = [it.lr for it in items]
    step = [it.step for it in items]
    gnorm = [it.gnorm_scale for it in items]
    unorm = [it.state["unorm_vec"] for it in items] if "unorm_vec" in items[0].state else []
    ops = torch.ops.kbit
    if family is ADAM:
        beta1, beta2, eps, wd, max_unorm, skip_zeros, bias_correction = hyper
        ops.adam_step_(params, grads, storages[0], storages[1], absmaxes[0], absmaxes[1], qmaps, blocksize, lr, step,
                       gnorm, unorm if max_unorm > 0 else [], beta1, beta2, eps, wd, max_unorm, skip_zeros,
                       bias_correction, **sr)
    elif family is ADEMAMIX:
        beta1, beta2, eps, wd = hyper
        ops.ademamix_step_(params, grads, storages[0], storages[1], absmaxes[0], absmaxes[1], qmaps, blocksize, lr,
                           step, gnorm, [it.extra[0] for it in items], [it.extra[1] for it in items], beta1, beta2,
                           eps, wd, **sr)
    elif family is LION:
        beta1, beta2, wd, skip_zeros = hyper
        ops.lion_step_(params, grads, storages[0], absmaxes[0], qmaps, blocksize, lr, step, gnorm, beta1, beta2, wd,
                       skip_zeros, **sr)
    elif family is MOMENTUM:
        momentum, dampening, wd, nesterov, max_unorm, eps, skip_zeros = hyper
        ops.momentum_step_(params, grads, storages[0], absmaxes[0], qmaps, blocksize, lr, step, gnorm,
                           unorm if max_unorm > 0 else [], momentum, dampening, wd, nesterov, max_unorm, eps,
                           skip_zeros, **sr)
    elif family is RMSPROP:
        alpha, eps, wd, max_unorm, skip_zeros = hyper
        ops.rmsprop_step_(params, grads, storages[0], absmaxes[0], qmaps, blocksize, lr, step, gnorm,
                          unorm if max_unorm > 0 else [], alpha, eps, wd, max_unorm, skip_zeros, **sr)
    elif family is ADAGRAD:
        eps, wd, lr_decay, skip_zeros = hyper
        ops.adagrad_step_(params, grads, storages[0], absmaxes[0], qmaps, blocksize, lr, step, gnorm, eps, wd,
                          lr_decay, skip_zeros, **sr)
    else:  # pragma: no cover - FAMILIES is closed
        raise AssertionError(family)
    if bits == 8 and blocksize == 0:
        # bitsandbytes <= 0.49 kept the next step's scale in new_max; keep both equal for its checkpoints.
        for it in items:
            for j in range(nstates):
                it.state[f"new_max{j + 1}"].copy_(it.state[f"max{j + 1}"])

