"""bf16 stochastic rounding of optimizer updates (``bf16_stochastic_round=True``), a kbit extension.

A bfloat16 parameter keeps 8 bits of mantissa: an update smaller than half a unit in the last place is
lost entirely under round-to-nearest, so small learning rates stall. With stochastic rounding the fused
kernels compute the new parameter in float32 and round it up or down at random, with probabilities that
make the stored value unbiased (Note [stochastic rounding] in csrc/cpu/scalar_ops.h). The random bits
come from a counter-based hash of (per-tensor step seed, element index), so a run is reproducible: the
same at every thread count and CPU level, and resuming from a checkpoint continues the same sequence.

The per-tensor step seed mixes the parameter group's ``sr_seed`` (drawn from torch's global generator
when the optimizer is created, so ``torch.manual_seed`` fixes it; saved with the param groups in the
state dict), the parameter's position (group index, index in the group) and the step number.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def group_defaults(enabled: bool) -> dict:
    """Param-group entries for an optimizer created with ``bf16_stochastic_round=enabled`` (none when off,
    so state dicts of optimizers that don't use it are unchanged)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"bf16_stochastic_round must be True or False (got {enabled!r})")
    return {"bf16_stochastic_round": True, "sr_seed": _draw_seed()} if enabled else {}


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(base_seed: int, gindex: int, pindex: int, step: int) -> int:
    """The 32-bit seed of one parameter's rounding at one step."""
    x = _splitmix64(int(base_seed) & _MASK64)
    for v in (gindex, pindex, step):
        x = _splitmix64(x ^ int(v))
    return x & 0xFFFFFFFF


def tensor_seed(group: dict, gindex: int, pindex: int, step: int, p: torch.Tensor, config: dict) -> int | None:
    """The seed for this parameter's step, or None when it is rounded to nearest (the setting is off, or
    the parameter is float32 and needs no rounding)."""
    if not config.get("bf16_stochastic_round", False) or p.dtype == torch.float32:
        return None
    if p.dtype != torch.bfloat16:
        raise ValueError(
            f"bf16_stochastic_round applies to bfloat16 parameters; this parameter is {p.dtype}. Keep float16 "
            "parameters in float32 (or bfloat16), or switch the setting off for it with "
            "GlobalOptimManager.override_config(p, 'bf16_stochastic_round', False)"
        )
    if "sr_seed" not in group:  # switched on by an override, or a checkpoint written without it
        group["sr_seed"] = _draw_seed()
    return step_seed(group["sr_seed"], gindex, pindex, step)
