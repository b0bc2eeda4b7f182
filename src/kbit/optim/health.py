"""Finding and clearing non-finite optimizer state (docs/numerics.md, "NaN and Inf gradients").

kbit's optimizers, like torch.optim and bitsandbytes' CPU paths, do not inspect gradients: a NaN or Inf
gradient element makes that element's state and parameter non-finite. With 8-bit *blockwise* state the
damage spreads: the block's absmax becomes NaN/Inf, so on the next step every one of the block's 256
state values dequantizes to NaN and the whole block of parameters follows, for good. Checking every
gradient inside ``step()`` would cost a pass over memory per step; these helpers instead let a training
loop find poisoned state cheaply (8-bit: one value per block of 256 is read) and reset it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import families

__all__ = ["NonFiniteState", "find_nonfinite_state", "reset_nonfinite_state"]


@dataclass
class NonFiniteState:
    """One poisoned state tensor: where it is, and how much of it is lost."""

    group: int              # index into optimizer.param_groups
    index: int              # index of the parameter within its group
    key: str                # "state1" or "state2"
    values: int             # state values that are NaN/Inf (8-bit: every value of a poisoned block)
    parameter_nonfinite: int  # NaN/Inf elements of the parameter itself (restore them from a checkpoint)


def _scales(state: dict, j: int):
    for key in (f"absmax{j}", f"max{j}"):
        if key in state:
            return state[key]
    return None


def _poisoned(state: dict, j: int, n: int) -> tuple[torch.Tensor, int] | None:
    """(mask over the state's values or over its blocks, values lost) of state j of an n-element parameter, or
    None if it is finite."""
    s = state.get(f"state{j}")
    if not isinstance(s, torch.Tensor):
        return None
    if s.dtype != torch.uint8:
        bad = ~torch.isfinite(s)
        count = int(bad.sum())
        return (bad, count) if count else None
    scales = _scales(state, j)
    bad = ~torch.isfinite(scales)
    if not bool(bad.any()):
        return None
    if f"max{j}" in state:  # tensor-wise: one scale per logical state
        rows, blocksize = scales.numel(), max(n, 1)
    else:
        rows = scales.shape[0] if scales.dim() == 2 else 1
        four_bit = state[f"qmap{j}"].numel() == 16
        blocksize = families.state_blocksize(n, scales.numel() // rows, four_bit)
    lost = bad.reshape(rows, -1).repeat_interleave(blocksize, dim=1)[:, :n]
    return bad, int(lost.sum())


def find_nonfinite_state(optimizer: torch.optim.Optimizer) -> list[NonFiniteState]:
    """Every state tensor of ``optimizer`` holding NaN or Inf. Cheap for 8-bit state (reads the per-block
    absmax only); for 32-bit state it reads the state once."""
    found = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = optimizer.state.get(p, {})
            for j in (1, 2):
                hit = _poisoned(state, j, p.numel())
                if hit is not None:
                    found.append(NonFiniteState(gi, pi, f"state{j}", hit[1], int((~torch.isfinite(p.detach())).sum())))
    return found


@torch.no_grad()
def reset_nonfinite_state(optimizer: torch.optim.Optimizer) -> list[NonFiniteState]:
    """Set every non-finite optimizer state value to 0 (8-bit: the poisoned blocks' absmax to 0, which makes
    their every value 0), as if those elements had never been stepped; returns what was reset. Parameters
    are not touched: any that :func:`find_nonfinite_state` reports as non-finite must be restored by the
    caller (from a checkpoint), or they will poison the state again."""
    found = find_nonfinite_state(optimizer)
    for item in found:
        p = optimizer.param_groups[item.group]["params"][item.index]
        state = optimizer.state[p]
        j = int(item.key[-1])
        s = state[item.key]
        if s.dtype != torch.uint8:
            s.masked_fill_(~torch.isfinite(s), 0.0)
            continue
        scales = _scales(state, j)
        scales.masked_fill_(~torch.isfinite(scales), 0.0)
        for key in (f"new_max{j}",):  # tensor-wise states keep a copy of the scale
            if key in state:
                state[key].masked_fill_(~torch.isfinite(state[key]), 0.0)
    return found
