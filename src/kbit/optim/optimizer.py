"""Optimizer8bit, Optimizer2State, Optimizer1State: the machinery every kbit optimizer shares.

A step visits every parameter with a gradient, creates its state on first use (32-bit, or 8-bit
when ``optim_bits == 8`` and the parameter has at least ``min_8bit_size`` elements), and then updates
all parameters that share a rule, a state format and hyper-parameters in one fused multi-tensor op
(kbit/_optim_ops.py): one pass over memory per parameter, no full-size float32 temporaries.

State layout and ``state_dict()`` format are bitsandbytes' (see ``state_layout.py``), so checkpoints
load in either library; ``load_state_dict`` also reads bitsandbytes' older flat format.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import torch

from .. import functional as F
from ..formats import (OPTIMIZER_4BIT_SIGNED_MAP, OPTIMIZER_4BIT_UNSIGNED_MAP, OPTIMIZER_BLOCKSIZE_4BIT,
                       OPTIMIZER_BLOCKSIZE_8BIT)
from . import distributed, families, paged, state_layout, stochastic_rounding
from .manager import GlobalOptimManager


class MockArgs:
    """The ``args`` object of bitsandbytes optimizers: attribute access to a dict of settings."""

    def __init__(self, initial_data: dict[str, Any]):
        for key, value in initial_data.items():
            setattr(self, key, value)


# Settings read from `args` (defaults used when an `args` object lacks one).
_ARGS_DEFAULTS = {
    "optim_bits": 32,
    "min_8bit_size": 4096,
    "percentile_clipping": 100,
    "block_wise": True,
    "max_unorm": 0.0,
    "skip_zeros": False,
}


def _check_hyperparameters(lr, eps, betas, weight_decay, optimizer_name: str = "") -> None:
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(betas):
        # SGD/LARS carry (momentum, dampening) in betas, and a dampening of 1 is valid.
        inclusive = i == 1 and optimizer_name in ("momentum", "lars")
        if not (0.0 <= beta <= 1.0 if inclusive else 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _parse_betas(betas):
    """bitsandbytes accepts betas given as a string such as "(0.9, 0.999)" (from command lines)."""
    if isinstance(betas, str):
        betas = [float(b) for b in betas.strip().strip("()[]").split(",") if b.strip()]
    return tuple(betas)


class Optimizer8bit(torch.optim.Optimizer):
    """Base class of kbit's optimizers (bitsandbytes' ``Optimizer8bit``).

    Args:
        params: parameters or parameter groups.
        defaults: default hyper-parameters of a group.
        optim_bits: 32 or 8 (bits per optimizer-state value).
        is_paged: keep large states in paged memory (see the classes' docstrings for CPU behaviour).
    """

    _FSDP_WRAPPED_QUANT_STATE_KEY = state_layout.WRAPPED_KEY

    def __init__(self, params, defaults, optim_bits=32, is_paged=False):
        super().__init__(params, defaults)
        self.initialized = False
        self.name2qmap: dict[str, torch.Tensor] = {}
        self.is_paged = is_paged
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = set(state_layout.NON_CASTABLE_KEYS)
        self._overrides: dict[int, dict[str, Any]] = {}
        self._paged_warned = False
        if optim_bits == 8:
            self.fill_qmap()

    # ---- code maps ---------------------------------------------------------------------------------
    def fill_qmap(self) -> None:
        self.name2qmap["dynamic"] = F.create_dynamic_map(signed=True)
        self.name2qmap["udynamic"] = F.create_dynamic_map(signed=False)

    def _qmap(self, name: str, device: torch.device) -> torch.Tensor:
        if name in ("dynamic4", "udynamic4") and name not in self.name2qmap:  # Note [4-bit optimizer states]
            values = OPTIMIZER_4BIT_SIGNED_MAP if name == "dynamic4" else OPTIMIZER_4BIT_UNSIGNED_MAP
            self.name2qmap[name] = torch.tensor(values, dtype=torch.float32)
        if name not in self.name2qmap:
            self.fill_qmap()
        if self.name2qmap[name].device != device:
            self.name2qmap[name] = self.name2qmap[name].to(device)
        return self.name2qmap[name]

    # ---- configuration -----------------------------------------------------------------------------
    def check_overrides(self) -> None:
        """Resolve the manager's index and module overrides for this optimizer (Note [override identity])."""
        self._overrides = self.mng.claim_index_overrides(self.param_groups)
        for pid, config in self.mng.module_overrides(self.param_groups).items():
            self._overrides[pid] = config

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict[str, Any]:
        """The effective settings of one parameter: group values, then `args`, then overrides."""
        p = group["params"][pindex]
        overrides = dict(self._overrides.get(id(p), {}))
        overrides.update(self.mng.pid2config.get(id(p), {}))
        config = self._group_config(group)
        config.update(families.translate_overrides(self.optimizer_name, config, overrides))
        return config

    def _group_config(self, group: dict) -> dict[str, Any]:
        """The settings of a parameter without overrides in ``group``."""
        config = {
            "betas": group["betas"],
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
            "lr": group["lr"],
            "alpha": group.get("alpha", 0.0),
            "t_alpha": group.get("t_alpha"),
            "t_beta3": group.get("t_beta3"),
            "bf16_stochastic_round": bool(group.get("bf16_stochastic_round", False)),
        }
        for key in families.EXTRA_GROUP_KEYS:
            if key in group:
                config[key] = group[key]
        for key, default in _ARGS_DEFAULTS.items():
            config[key] = getattr(self.args, key, default)
        return config

    # ---- state -------------------------------------------------------------------------------------
    def _family(self) -> families.Family:
        return families.FAMILIES[self.optimizer_name]

    @torch.no_grad()
    def init_state(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        """Create the state of ``p`` (bitsandbytes' layout, state_layout.py)."""
        config = self.get_config(gindex, pindex, group)
        bits = config["optim_bits"]
        if bits not in (4, 8, 32):
            raise NotImplementedError(f"Amount of optimizer bits not supported: {bits}")
        eight_bit = bits in (4, 8) and p.numel() >= config["min_8bit_size"]  # quantized (8- or 4-bit)
        four_bit = eight_bit and bits == 4
        if four_bit and distributed.is_sharded(p):
            raise NotImplementedError("4-bit optimizer states are not implemented for sharded (FSDP2/DTensor) "
                                      "parameters yet; use optim_bits=8 there")
        if self.is_paged and p.device.type != "cpu":
            self._warn_paged(p.device)
        state = self.state[p]
        state["step"] = 0
        family = self._family()
        local = distributed.local(p)  # a DTensor's own shard (Note [sharded state] in distributed.py)
        zeros = self._state_allocator(p)
        for j, rows in enumerate(family.rows):
            shape = (rows, *local.shape) if rows > 1 else local.shape
            name = f"state{j + 1}"
            if four_bit:  # two codes per byte, flat per logical state (Note [4-bit optimizer states])
                packed = (local.numel() + 1) // 2
                state[name] = zeros((rows, packed) if rows > 1 else (packed,), torch.uint8)
                state[f"qmap{j + 1}"] = self._qmap("dynamic4" if family.signed[j] else "udynamic4", p.device)
                blocks = -(-local.numel() // OPTIMIZER_BLOCKSIZE_4BIT)
                state[f"absmax{j + 1}"] = zeros((rows, blocks) if rows > 1 else (blocks,), torch.float32)
            elif eight_bit:
                state[name] = zeros(shape, torch.uint8)
                state[f"qmap{j + 1}"] = self._qmap("dynamic" if family.signed[j] else "udynamic", p.device)
                if config["block_wise"]:
                    blocks = -(-local.numel() // OPTIMIZER_BLOCKSIZE_8BIT)
                    state[f"absmax{j + 1}"] = zeros((rows, blocks) if rows > 1 else (blocks,), torch.float32)
                else:
                    state[f"max{j + 1}"] = torch.zeros((rows,), dtype=torch.float32, device=p.device)
                    state[f"new_max{j + 1}"] = torch.zeros((rows,), dtype=torch.float32, device=p.device)
            else:
                state[name] = zeros(shape, torch.float32)
        initial = group.get("initial_accumulator_value", 0.0)
        if initial:
            self._fill_state1(state, local, float(initial), config)
        if local is not p:
            distributed.wrap_state(state, p, OPTIMIZER_BLOCKSIZE_8BIT, zeros)
        if config["max_unorm"] > 0.0:
            state["unorm_vec"] = torch.zeros((1,), dtype=torch.float32, device=p.device)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros((100,), dtype=torch.float32, device=p.device)

    def _state_allocator(self, p: torch.Tensor):
        """``zeros(shape, dtype)`` for the large states of ``p``: file-backed when paged (paged.py), else ordinary."""
        if self.is_paged and paged.pages(p):
            return paged.zeros
        device = p.device
        return lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device)

    def _fill_state1(self, state: dict, p: torch.Tensor, value: float, config: dict) -> None:
        """Adagrad's initial accumulator: every element of state1 starts at ``value``."""
        if state["state1"].dtype == torch.float32:
            state["state1"].fill_(value)
            return
        full = torch.full((p.numel(),), value, dtype=torch.float32, device=p.device)
        blocksize = OPTIMIZER_BLOCKSIZE_8BIT if config["block_wise"] else max(p.numel(), 1)
        codes, qs = F.quantize_blockwise(full, code=state["qmap1"], blocksize=blocksize)
        state["state1"].copy_(codes.view(state["state1"].shape))
        (state["absmax1"] if "absmax1" in state else state["max1"]).copy_(qs.absmax.view(-1)[:1] if "max1" in state
                                                                          else qs.absmax)

    def _warn_paged(self, device: torch.device) -> None:
        if not self._paged_warned:
            warnings.warn(
                f"kbit: paged optimizer state is implemented on CPU only (memory-mapped files, kbit/optim/paged.py); "
                f"on {device.type} the state is kept in ordinary device memory and updated by the reference ops "
                "(training results are identical, memory use is not reduced).",
                stacklevel=_caller_stacklevel(),
            )
            self._paged_warned = True

    def to_gpu(self) -> None:
        """Move every state tensor to its parameter's device (after loading with move_to_device=False)."""
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in self.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.device != p.device:
                        self.state[p][key] = value.to(p.device)

    # ---- step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Take one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        batches: dict[tuple, list] = defaultdict(list)
        for gindex, group in enumerate(self.param_groups):
            # Settings are computed once per group; only parameters with overrides get their own (a step
            # over hundreds of small tensors must not be dominated by Python).
            base = None
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if id(p) in self._overrides or id(p) in self.mng.pid2config:
                    config = self.get_config(gindex, pindex, group)
                    self._check_config(config)
                else:
                    if base is None:
                        base = self._group_config(group)
                        self._check_config(base)
                    config = base
                key, item = self._prepare(group, p, gindex, pindex, config)
                batches[key].append(item)
        for key, items in batches.items():
            self._launch(key, items)
        return loss

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        """Update a single parameter (bitsandbytes' per-parameter entry point)."""
        config = self.get_config(gindex, pindex, group)
        self._check_config(config)
        key, item = self._prepare(group, p, gindex, pindex, config)
        self._launch(key, [item])

    def _check_config(self, config: dict) -> None:
        families.check_supported(self.optimizer_name, config)
        _check_hyperparameters(config["lr"], config["eps"], config["betas"], config["weight_decay"], self.optimizer_name)

    def _prepare(self, group, p, gindex, pindex, config):
        grad = p.grad
        _check_gradient(p, grad)
        state = self.state[p]
        if len(state) == 0:
            self.init_state(group, p, gindex, pindex)
        # Optional states may be missing from a loaded checkpoint or switched on later by an override.
        if config["max_unorm"] > 0.0 and "unorm_vec" not in state:
            state["unorm_vec"] = torch.zeros((1,), dtype=torch.float32, device=p.device)
        if config["percentile_clipping"] < 100 and "gnorm_vec" not in state:
            state["gnorm_vec"] = torch.zeros((100,), dtype=torch.float32, device=p.device)
            state["_gnorm_fresh"] = True
        state["step"] = int(state["step"]) + 1
        gnorm_scale = 1.0
        if config["percentile_clipping"] < 100:
            gnorm_scale = percentile_clipping(grad, state, config["percentile_clipping"])
        sr_seed = stochastic_rounding.tensor_seed(group, gindex, pindex, state["step"], p, config)
        if distributed.is_sharded(p):  # FSDP2: the kernels update this rank's shard (distributed.py)
            return distributed.prepare(self._family(), p, grad, state, config, gnorm_scale, sr_seed)
        return families.prepare(self._family(), p, grad, state, config, gnorm_scale, sr_seed)

    def _launch(self, key: tuple, items: list) -> None:
        if key[0] == distributed.TRUST_RATIO:  # a sharded parameter with a trust ratio
            distributed.launch_trust_ratio(self._family(), key, items)
        else:
            families.launch(self._family(), key, items)

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self):
        """torch's state_dict with every state tensor wrapped under ``"__bnb_optimizer_quant_state__"``
        (bitsandbytes >= 0.49 layout; only ``step`` stays at the top level of a parameter's state)."""
        return state_layout.wrap(super().state_dict())

    def load_state_dict(self, state_dict, move_to_device: bool = True) -> None:
        """Load a state dict written by kbit or bitsandbytes (wrapped or older flat layout).

        Every parameter's state is validated against the parameter (keys, shapes, dtypes) before anything
        is changed; a mismatch raises ValueError naming the parameter and the problem. Tensors keep their
        dtype; with ``move_to_device`` they are moved to the parameter's device.
        """
        state_layout.load_into(self, state_dict, move_to_device)
        for group in self.param_groups:
            for p in group["params"]:
                state_layout.share_qmaps(self.state.get(p, {}), self)
                if self.is_paged and p in self.state and paged.pages(p):
                    paged.page_state(self.state[p])  # loaded states go back into files

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_overrides", {})
        self.__dict__.setdefault("_paged_warned", False)


def _caller_stacklevel() -> int:
    """stacklevel that attributes a warning to the first frame outside kbit and torch (the user's code)."""
    import os
    import sys

    skip = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _check_gradient(p: torch.Tensor, grad: torch.Tensor) -> None:
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kbit optimizers update float32, float16 or bfloat16 parameters, not {p.dtype}")
    if grad.is_sparse:
        raise RuntimeError(
            "kbit optimizers do not support sparse gradients; use dense gradients (skip_zeros=True leaves "
            "zero-gradient entries untouched), or torch.optim.SparseAdam"
        )
    if p.is_complex():
        raise TypeError("kbit optimizers do not support complex parameters; view them as real (torch.view_as_real)")
    if grad.shape != p.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} differs from its parameter's {tuple(p.shape)}")
    if grad.dtype != p.dtype:
        raise TypeError(
            f"gradient dtype {grad.dtype} differs from its parameter's {p.dtype}; kbit updates parameters in their "
            "own dtype (cast the gradient, or keep master weights in float32)"
        )


def percentile_clipping(grad: torch.Tensor, state: dict, percentile: int) -> float:
    """Gradient scale of percentile clipping (bitsandbytes' documented algorithm).

    Keeps the squared gradient norms of the last 100 steps in ``state["gnorm_vec"]`` (the first step, or the
    first after clipping was switched on, fills all 100 slots). The clip value is the square root of the ``percentile``-th smallest of them; a gradient
    whose norm exceeds it is scaled down to it. Returns the scale (1.0 if not clipped). A non-finite
    gradient norm is not recorded and returns 1.0, so one bad step cannot poison the history.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile_clipping must be in 1..100 (got {percentile})")
    step = int(state["step"])
    gnorm_vec = state["gnorm_vec"]
    norm_sq = distributed.sq_norm(grad)  # of the whole gradient, also when sharded
    if not math.isfinite(norm_sq):
        return 1.0
    if step == 1 or state.pop("_gnorm_fresh", False):  # an empty history starts full of the first norm
        gnorm_vec.fill_(norm_sq)
    else:
        gnorm_vec[step % 100] = norm_sq
    current = math.sqrt(norm_sq)
    clip = math.sqrt(float(torch.sort(gnorm_vec).values[min(percentile, 99)]))
    return clip / current if current > clip else 1.0


class Optimizer2State(Optimizer8bit):
    """Base of optimizers with two states per parameter (Adam, AdamW, LAMB, AdEMAMix).

    Args:
        optimizer_name: the update rule ("adam", "lamb", "ademamix").
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: the rule's hyper-parameters (betas may be a string "(0.9, 0.999)").
        optim_bits: 32, 8 or 4 (4: a kbit extension for Adam/AdamW, Lion and SGD with momentum; see
            :mod:`kbit.optim.adam`).
        args: an object with attributes optim_bits, min_8bit_size, percentile_clipping, block_wise,
            max_unorm, skip_zeros; when given it replaces those constructor arguments.
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        percentile_clipping: clip the gradient at this percentile of the last 100 gradient norms (100: off).
        block_wise: quantize 8-bit state in blocks of 256 (True) or with one scale per tensor (False).
        max_unorm: clip the update norm to ``max_unorm * |param|`` (0: off; LAMB's trust ratio).
        skip_zeros: leave entries whose gradient is exactly 0 untouched (sparse-style updates).
        is_paged: paged state.
        alpha, t_alpha, t_beta3: AdEMAMix's mixing coefficient and schedule lengths.
        bf16_stochastic_round: write bfloat16 parameters with stochastic rounding instead of round to
            nearest (kbit only; see :mod:`kbit.optim.stochastic_rounding`). float32 parameters are unaffected;
            float16 parameters raise ValueError.
    """

    def __init__(self, optimizer_name, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 max_unorm=0.0, skip_zeros=False, is_paged=False, alpha=0.0, t_alpha=None, t_beta3=None,
                 bf16_stochastic_round=False):
        betas = _parse_betas(betas)
        _check_hyperparameters(lr, eps, betas, weight_decay)
        families.check_name(optimizer_name, states=2)
        families.check_bits(optimizer_name, optim_bits)
        families.check_betas(optimizer_name, betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=alpha, t_alpha=t_alpha,
                        t_beta3=t_beta3, **stochastic_rounding.group_defaults(bf16_stochastic_round))
        super().__init__(params, defaults, optim_bits, is_paged)
        self.args = _make_args(args, optim_bits, min_8bit_size, percentile_clipping, block_wise, max_unorm, skip_zeros)
        self.optimizer_name = optimizer_name


class Optimizer1State(Optimizer8bit):
    """Base of optimizers with one state per parameter (Lion, SGD, LARS, RMSprop, Adagrad).

    Arguments as :class:`Optimizer2State`; ``betas`` carries the rule's coefficients (Lion: (beta1, beta2);
    SGD/LARS: (momentum, dampening); RMSprop: (alpha, momentum); Adagrad: unused).
    """

    def __init__(self, optimizer_name, params, lr=1e-3, betas=(0.9, 0.0), eps=1e-8, weight_decay=0.0,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 max_unorm=0.0, skip_zeros=False, is_paged=False, bf16_stochastic_round=False):
        betas = _parse_betas(betas)
        _check_hyperparameters(lr, eps, betas, weight_decay, optimizer_name)
        families.check_name(optimizer_name, states=1)
        families.check_bits(optimizer_name, optim_bits)
        families.check_betas(optimizer_name, betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        **stochastic_rounding.group_defaults(bf16_stochastic_round))
        super().__init__(params, defaults, optim_bits, is_paged)
        self.args = _make_args(args, optim_bits, min_8bit_size, percentile_clipping, block_wise, max_unorm, skip_zeros)
        self.optimizer_name = optimizer_name


def _make_args(args, optim_bits, min_8bit_size, percentile_clipping, block_wise, max_unorm, skip_zeros):
    if args is not None:
        return args
    if optim_bits not in (4, 8, 32):
        raise ValueError(f"optim_bits must be 32, 8 or 4 (got {optim_bits})")
    if not isinstance(percentile_clipping, int) or not 0 < percentile_clipping <= 100:
        raise ValueError(f"percentile_clipping must be an int in 1..100 (got {percentile_clipping!r})")
    if max_unorm < 0:
        raise ValueError(f"max_unorm must be >= 0 (got {max_unorm})")
    if min_8bit_size < 0:
        raise ValueError(f"min_8bit_size must be >= 0 (got {min_8bit_size})")
    return MockArgs(dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping,
                         block_wise=block_wise, max_unorm=max_unorm, skip_zeros=skip_zeros))
