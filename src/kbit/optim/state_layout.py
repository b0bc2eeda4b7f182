"""The optimizer state layout and state_dict format shared with bitsandbytes, and their validation.

Per parameter (B = ceil(numel / 256); AdEMAMix's state1 and absmax1 have a leading dimension of 2):
- 32-bit: ``step`` (int), ``state1`` (float32, param shape) [, ``state2``].
- 8-bit blockwise: ``state1`` (uint8), ``qmap1`` (256 float32, signed dynamic map), ``absmax1`` (float32, B)
  [, ``state2``, ``qmap2`` (unsigned map), ``absmax2``].
- 8-bit tensor-wise (``block_wise=False``): ``max1`` / ``new_max1`` (float32, 1) instead of ``absmax1``.
- optional ``unorm_vec`` (float32, 1) when max_unorm > 0, ``gnorm_vec`` (float32, 100) with percentile clipping.
``state_dict()`` moves every tensor listed in NON_CASTABLE_KEYS under WRAPPED_KEY (bitsandbytes >= 0.49, so
that FSDP's gathering of parameter-shaped states leaves them alone); loading accepts both layouts.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from itertools import chain

import torch

from . import distributed, families

WRAPPED_KEY = "__bnb_optimizer_quant_state__"
NON_CASTABLE_KEYS = ("qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2", "gnorm_vec",
                     "absmax1", "absmax2", "unorm_vec")


def wrap(state_dict: dict) -> dict:
    """Move each parameter's state tensors under WRAPPED_KEY (a new dict; tensors are not copied)."""
    out = dict(state_dict)
    out["state"] = {}
    for key, param_state in state_dict["state"].items():
        top = {k: v for k, v in param_state.items() if k not in NON_CASTABLE_KEYS and not k.startswith("_")}
        inner = {k: v for k, v in param_state.items() if k in NON_CASTABLE_KEYS}
        if inner:
            top[WRAPPED_KEY] = inner
        out["state"][key] = top
    return out


def unwrap(param_state: dict) -> dict:
    param_state = dict(param_state)
    inner = param_state.pop(WRAPPED_KEY, None)
    if inner is not None:
        if not isinstance(inner, dict):
            raise ValueError(f"{WRAPPED_KEY} must hold a dict of state tensors (got {type(inner).__name__})")
        param_state.update(inner)
    return param_state


def _expect(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ValueError(f"optimizer state of {where}: {message}")


def validate(family: families.Family, p: torch.Tensor, st: dict, where: str) -> None:
    """Check a loaded parameter state against its parameter before anything uses it."""
    if not st:
        return
    _expect("step" in st, where, "missing 'step'")
    step = st["step"]
    if isinstance(step, torch.Tensor):
        _expect(step.numel() == 1, where, "'step' must be a number")
        step = step.item()
    _expect(isinstance(step, (int, float)) and float(step).is_integer() and step >= 0, where,
            f"'step' must be a non-negative integer (got {step!r})")
    n = p.numel()
    unknown = sorted(set(st) - {"step", distributed.LAYOUT_KEY} - set(NON_CASTABLE_KEYS)
                     - {k for k in st if k.startswith("_")})
    _expect(not unknown, where, f"unexpected keys {unknown}: not a kbit/bitsandbytes optimizer state for this optimizer")
    problem = distributed.check_layout(p, st)  # 8-bit scales of sharded parameters (FSDP2)
    _expect(problem is None, where, str(problem))
    for j, rows in enumerate(family.rows, start=1):
        name = f"state{j}"
        _expect(name in st and isinstance(st[name], torch.Tensor), where, f"missing tensor {name!r}")
        s = st[name]
        q = st.get(f"qmap{j}")
        four_bit = s.dtype == torch.uint8 and isinstance(q, torch.Tensor) and q.shape == (16,)
        # 4-bit states (a kbit extension, Note [4-bit optimizer states]) hold two codes per byte, flat per row.
        shape = (((rows,) if rows > 1 else ()) + ((n + 1) // 2,)) if four_bit else \
            ((rows, *p.shape) if rows > 1 else tuple(p.shape))
        _expect(tuple(s.shape) == shape, where, f"{name} has shape {tuple(s.shape)}, expected {shape}")
        _expect(s.dtype in (torch.float32, torch.uint8), where, f"{name} must be float32 or uint8 (got {s.dtype})")
        _expect(s.dtype == st["state1"].dtype, where, "all states must have the same dtype")
        if s.dtype == torch.uint8:
            _expect(isinstance(q, torch.Tensor) and q.dtype == torch.float32 and q.shape in ((256,), (16,)), where,
                    f"qmap{j} must be 256 float32 values (8-bit state) or 16 (4-bit state)")
            _expect(not bool(torch.isnan(q).any()) and not bool((q[1:] < q[:-1]).any()), where,
                    f"qmap{j} must be sorted and free of NaN")
            _expect(q.shape == st["qmap1"].shape, where, "all states must have the same number of bits")
            if four_bit:
                _expect(f"absmax{j}" in st, where, f"4-bit state needs absmax{j}")
            if distributed.is_sharded(p):
                problem = distributed.check_scales(p, st, j, rows)
                _expect(problem is None, where, str(problem))
            elif f"absmax{j}" in st:
                a = st[f"absmax{j}"]
                _expect(isinstance(a, torch.Tensor) and a.dtype == torch.float32, where, f"absmax{j} must be float32")
                _expect(a.dim() == (2 if rows > 1 else 1) and (rows == 1 or a.shape[0] == rows), where,
                        f"absmax{j} has shape {tuple(a.shape)}")
                try:
                    families.state_blocksize(n, a.shape[-1], four_bit=four_bit)
                except ValueError as exc:
                    _expect(False, where, str(exc))
            else:
                for key in (f"max{j}", f"new_max{j}"):
                    m = st.get(key)
                    _expect(isinstance(m, torch.Tensor) and m.dtype == torch.float32 and m.numel() == rows, where,
                            f"8-bit state needs absmax{j} (blockwise) or {key} with {rows} float32 value(s)")
    for key, size in (("unorm_vec", 1), ("gnorm_vec", 100)):
        if key in st:
            v = st[key]
            _expect(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.numel() == size, where,
                    f"{key} must be {size} float32 value(s)")


def validate_group(name: str, group: dict, where: str) -> None:
    """A loaded group's hyper-parameters must be numbers in range: a string or a short betas tuple would
    otherwise fail (or compute nonsense) only at the next step()."""
    for key in ("lr", "eps", "weight_decay"):
        if key in group:
            v = group[key]
            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():  # a tensor lr
                v = float(v)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and v >= 0  # NaN fails v >= 0
            _expect(ok, where, f"{key} must be a non-negative number (got {v!r})")
    if "betas" in group:
        try:
            families.check_betas(name, group["betas"])
        except ValueError as exc:
            _expect(False, where, str(exc))
    if "bf16_stochastic_round" in group:
        _expect(isinstance(group["bf16_stochastic_round"], bool), where, "bf16_stochastic_round must be True or False")
    if "sr_seed" in group:
        seed = group["sr_seed"]
        _expect(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, where,
                f"sr_seed must be a non-negative int (got {seed!r:.40})")


def _cast(p: torch.Tensor, st: dict, move_to_device: bool) -> dict:
    out = {}
    for key, value in st.items():
        if key == "step":
            out[key] = int(value.item()) if isinstance(value, torch.Tensor) else int(value)
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(p.device) if move_to_device else value
        else:
            out[key] = value
    return out


def load_into(optimizer, state_dict: dict, move_to_device: bool) -> None:
    """Validate a (wrapped or flat) state dict against ``optimizer`` and load it; nothing changes on error."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("an optimizer state_dict must be a dict with 'state' and 'param_groups'")
    state_dict = copy.deepcopy(state_dict)
    groups = optimizer.param_groups
    saved_groups = state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
    id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups),
                      chain.from_iterable(g["params"] for g in groups)))
    family = families.FAMILIES[optimizer.optimizer_name]
    state = defaultdict(dict)
    for key, value in state_dict["state"].items():
        if key in id_map:
            p = id_map[key]
            st = unwrap(value)
            validate(family, p, st, f"parameter {key} (shape {tuple(p.shape)})")
            state[p] = _cast(p, st, move_to_device)
        else:
            state[key] = value
    param_groups = [dict(saved, params=group["params"]) for saved, group in zip(saved_groups, groups)]
    for index, group in enumerate(param_groups):
        if "betas" in group:
            _expect(isinstance(group["betas"], (tuple, list)), f"param group {index}", "betas must be a tuple")
            group["betas"] = tuple(group["betas"])
        validate_group(optimizer.optimizer_name, group, f"param group {index}")
    optimizer.__setstate__({"state": state, "param_groups": param_groups})


def share_qmaps(st: dict, optimizer) -> None:
    """Use the optimizer's shared code map where a loaded one equals it, so parameters batch together."""
    for j in (1, 2):
        q = st.get(f"qmap{j}")
        if q is None:
            continue
        for name in ("dynamic", "udynamic", "dynamic4", "udynamic4"):
            shared = optimizer._qmap(name, q.device)
            if q is not shared and torch.equal(q, shared):
                st[f"qmap{j}"] = shared
                break
