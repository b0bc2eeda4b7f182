"""GlobalOptimManager: per-parameter and per-module overrides of optimizer hyper-parameters.

Note [override identity]
bitsandbytes keys overrides by ``id(param)`` and, for parameters registered with
``register_parameters``, by their (group, position) index — globally, so an index override leaks
into every later optimizer whose parameter at that position happens to line up. kbit keeps the same
three ways to name a parameter but scopes them:
- an override of a parameter object follows that object (``module.to()`` / ``.cuda()`` keep it) into
  every optimizer that contains it — that is what the user asked for;
- an index override (a parameter registered, then replaced by a new tensor, e.g. ``p = p.to(dev)``)
  is claimed by the first optimizer, at its first step, whose parameter at that position has the
  registered shape; it then belongs to that optimizer only and no longer applies to others;
- a module override (``register_module_override``, used by ``StableEmbedding``) is resolved at each
  optimizer's first step to whatever parameter the module holds then.
Overrides may be given before or after the parameters are registered or the optimizer is created;
they are read at every step, so a later override of ``lr`` takes effect at the next step (bits and
block sizes take effect only before a parameter's state exists).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Mapping

import torch

#: Keys an override may set, and their aliases.
OVERRIDE_KEYS = frozenset({
    "lr", "betas", "eps", "weight_decay", "alpha", "t_alpha", "t_beta3", "momentum", "dampening", "nesterov",
    "lr_decay", "bias_correction", "optim_bits", "min_8bit_size", "percentile_clipping", "block_wise", "max_unorm",
    "skip_zeros",
})
#: The optimizer guide's `is_sparse` is bitsandbytes' documented name for skip_zeros.
OVERRIDE_ALIASES = {"is_sparse": "skip_zeros"}


def normalize_override(config: Mapping[str, Any]) -> dict[str, Any]:
    """Validate override keys (resolving aliases); unknown keys are an error, not silently stored."""
    out = {}
    for key, value in config.items():
        key = OVERRIDE_ALIASES.get(key, key)
        if key not in OVERRIDE_KEYS:
            raise ValueError(
                f"unknown optimizer override {key!r}; valid keys are {', '.join(sorted(OVERRIDE_KEYS | set(OVERRIDE_ALIASES)))}"
            )
        if key == "optim_bits" and value not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32 (got {value!r})")
        out[key] = value
    return out


class GlobalOptimManager:
    """Process-wide registry of optimizer overrides (bitsandbytes-compatible API).

    Use :meth:`get_instance`; see Note [override identity] in this module for how overrides find
    their parameters. Example::

        mng = kbit.optim.GlobalOptimManager.get_instance()
        mng.register_parameters(model.parameters())      # while the model is still on the CPU
        model = model.cuda()
        mng.override_config(model.fc1.weight, "optim_bits", 32)
        opt = kbit.optim.Adam8bit(model.parameters())
    """

    _instance: "GlobalOptimManager | None" = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    def initialize(self) -> None:
        """Forget every registration and override."""
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self._index_shapes: dict[tuple[int, int], torch.Size] = {}
        self._registered: dict[int, tuple[int, int]] = {}
        self._registered_shapes: dict[int, torch.Size] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.optimizer = None
        self.uses_config_override = False
        # (weak reference to the module, parameter name, config): a module override must not keep the module alive.
        self.module_weight_config_triple: list[tuple[weakref.ref, str, dict[str, Any]]] = []

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params: Iterable) -> None:
        """Remember each parameter's (group, position), so that an override still finds it after the
        parameter is replaced by a moved copy (``p = p.to(device)``)."""
        params = list(params)
        if not params:
            raise ValueError("register_parameters() got no parameters")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                self._registered[id(p)] = (gi, pi)
                self._registered_shapes[id(p)] = p.shape
                self._track(p)
                if id(p) in self.pid2config:
                    self._index_override(gi, pi, p.shape, self.pid2config[id(p)])

    def _track(self, p: torch.Tensor) -> None:
        """Drop a parameter's id-keyed entries when it is freed, so a new tensor that reuses the id
        does not inherit its overrides."""
        pid = id(p)
        if pid in self._refs and self._refs[pid]() is p:
            return

        def forget(_ref, pid=pid, manager=weakref.ref(self)):
            m = manager()
            if m is not None and m._refs.get(pid) is _ref:
                for table in (m._refs, m.pid2config, m._registered, m._registered_shapes):
                    table.pop(pid, None)

        self._refs[pid] = weakref.ref(p, forget)

    def _index_override(self, gi: int, pi: int, shape: torch.Size, config: dict[str, Any]) -> None:
        self.index2config[(gi, pi)] = config
        self._index_shapes[(gi, pi)] = shape

    def override_config(self, parameters, key: str | None = None, value: Any = None,
                        key_value_dict: Mapping[str, Any] | None = None) -> None:
        """Override hyper-parameters of one parameter or a list of them.

        Either ``key`` and ``value`` or ``key_value_dict`` (e.g. ``{"optim_bits": 32, "lr": 1e-5}``).
        ``is_sparse`` is accepted as the documented alias of ``skip_zeros``. Unknown keys raise ValueError.
        """
        self.uses_config_override = True
        if isinstance(parameters, (torch.nn.Parameter, torch.Tensor)):
            parameters = [parameters]
        parameters = list(parameters)
        if key is not None and key_value_dict is not None:
            raise ValueError("give either key/value or key_value_dict, not both")
        if key is not None:
            if value is None:
                raise ValueError(f"override of {key!r} needs a value")
            config = {key: value}
        elif key_value_dict is not None:
            config = dict(key_value_dict)
        else:
            raise ValueError("override_config needs key and value, or key_value_dict")
        config = normalize_override(config)
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config expects parameters (tensors), got {type(p).__name__}")
            entry = self.pid2config.setdefault(id(p), {})
            entry.update(config)
            self._track(p)
            if id(p) in self._registered:
                gi, pi = self._registered[id(p)]
                self._index_override(gi, pi, self._registered_shapes[id(p)], entry)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: Mapping[str, Any]) -> None:
        """Override the config of ``module.<param_name>`` in every optimizer (resolved at its first step)."""
        self.module_weight_config_triple = [t for t in self.module_weight_config_triple if t[0]() is not None]
        self.module_weight_config_triple.append((weakref.ref(module), param_name, normalize_override(config)))

    # -- used by kbit optimizers ----------------------------------------------------------------
    def claim_index_overrides(self, param_groups) -> dict[int, dict[str, Any]]:
        """Index overrides that match this optimizer's parameters (by position and shape), removed from the
        manager and returned keyed by id(param) (Note [override identity])."""
        claimed = {}
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                key = (gi, pi)
                if key in self.index2config and self._index_shapes.get(key) == p.shape and id(p) not in self.pid2config:
                    claimed[id(p)] = self.index2config.pop(key)
                    self._index_shapes.pop(key, None)
        return claimed

    def module_overrides(self, param_groups) -> dict[int, dict[str, Any]]:
        """Module overrides resolved to this optimizer's current parameters, keyed by id(param)."""
        ids = {id(p) for group in param_groups for p in group["params"]}
        out = {}
        for module_ref, name, config in self.module_weight_config_triple:
            module = module_ref()
            p = getattr(module, name, None) if module is not None else None
            if isinstance(p, torch.Tensor) and id(p) in ids:
                out[id(p)] = config
        return out
