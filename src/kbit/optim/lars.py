"""LARS (You et al. 2017) as bitsandbytes defines it: SGD with momentum whose step is clipped by a trust
ratio, min(1, (max_unorm * |p| + eps) / |buf|) with |p| the parameter norm before the step. Unlike
bitsandbytes the trust ratio also applies with 8-bit state. ``PytorchLARS`` is the plain-PyTorch
reference bitsandbytes ships, kept for comparisons.
"""

from __future__ import annotations

import torch

from .optimizer import Optimizer1State
from .sgd import check_momentum
from .variants import Variant


class LARS(Variant, Optimizer1State):
    """LARS with 32-bit or 8-bit momentum (``max_unorm`` default 0.02)."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, max_unorm=0.02, bf16_stochastic_round=False):
        check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__("lars", params, lr, (momentum, dampening), 0.0, weight_decay, self._bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, max_unorm=max_unorm, block_wise=False,
                         bf16_stochastic_round=bf16_stochastic_round)
        for group in self.param_groups:
            group.setdefault("nesterov", bool(nesterov))
        self.defaults["nesterov"] = bool(nesterov)


class LARS8bit(LARS):
    """:class:`LARS` with 8-bit state."""

    _FORCED_BITS = 8


class LARS32bit(LARS):
    """:class:`LARS` with 32-bit state."""

    _FORCED_BITS = 32


class PytorchLARS(torch.optim.Optimizer):
    """Reference LARS in plain PyTorch (float32 parameters): momentum SGD whose update is scaled down to
    ``max_unorm * |p|`` when it is larger."""

    def __init__(self, params, lr=0.01, momentum=0, dampening=0, weight_decay=0, nesterov=False, max_unorm=0.02):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, max_unorm=max_unorm))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if group["momentum"] != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(group["momentum"]).add_(d, alpha=1 - group["dampening"])
                    update = d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                else:
                    update = d
                scale = 1.0
                if group["max_unorm"] > 0.0:
                    pnorm = torch.norm(p.detach())
                    unorm = torch.norm(update)
                    if unorm > group["max_unorm"] * pnorm:
                        scale = float(group["max_unorm"] * pnorm / unorm)
                p.add_(update, alpha=-group["lr"] * scale)
        return loss
