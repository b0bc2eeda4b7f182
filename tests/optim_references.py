"""Pure-PyTorch reference optimizers for the rules torch.optim lacks: Lion, AdEMAMix, LAMB and LARS as kbit
defines them. Written for reading, in float32 (as torch.optim computes), and independently of kbit's own
reference op (kbit/backends/reference_optim.py) so that both are checked against a third implementation.

For Adam/AdamW/SGD/RMSprop/Adagrad the tests use torch.optim directly (kbit's ``Adam(weight_decay=x)`` is
``torch.optim.AdamW(weight_decay=x)``: decay is decoupled, as in bitsandbytes).

Every reference keeps its step count per parameter in ``state["step"]`` (a Python int) so that a test may
overwrite the states of one parameter (the 8-bit tests re-sync the reference to kbit's dequantized states).
"""

from __future__ import annotations

import math

import torch


def _init_state(state: dict, p: torch.Tensor, keys: tuple[str, ...]) -> None:
    if not state:
        state["step"] = 0
        for key in keys:
            state[key] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)


class ReferenceLion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) exactly as ``lion_pytorch.Lion``: decoupled weight decay first, then
    ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, then ``m = beta2 * m + (1 - beta2) * g``."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                _init_state(state, p, ("exp_avg",))
                state["step"] += 1
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def ademamix_schedule(step: int, alpha: float, beta1: float, beta3: float, t_alpha, t_beta3) -> tuple[float, float]:
    """alpha_t and beta3_t of AdEMAMix (Pagliardini et al. 2024, Algorithm 1; fact sheet 5.7), in float64.
    A falsy t_alpha / t_beta3 (None or 0) switches that schedule off."""
    alpha_t = min(step * alpha / t_alpha, alpha) if t_alpha else alpha
    if t_beta3:
        frac = step / t_beta3
        ln_b1, ln_b3 = math.log(beta1), math.log(beta3)
        beta3_t = min(math.exp(ln_b1 * ln_b3 / ((1 - frac) * ln_b3 + frac * ln_b1)), beta3)
    else:
        beta3_t = beta3
    return alpha_t, beta3_t


class ReferenceAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix as bitsandbytes' ``_ReferenceAdEMAMix`` (decoupled decay, no bias correction on m2), with
    the step kept per parameter. States: ``m1`` (fast EMA, beta1), ``m2`` (slow EMA, beta3_t), ``nu``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, eps=1e-8, weight_decay=1e-2,
                 t_alpha=None, t_beta3=None):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      t_alpha=t_alpha, t_beta3=t_beta3))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                _init_state(state, p, ("m1", "m2", "nu"))
                state["step"] += 1
                t = state["step"]
                g = p.grad
                alpha_t, beta3_t = ademamix_schedule(t, group["alpha"], beta1, beta3, group["t_alpha"],
                                                     group["t_beta3"])
                m1, m2, nu = state["m1"], state["m2"], state["nu"]
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                m2.mul_(beta3_t).add_(g, alpha=1 - beta3_t)
                nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (nu.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
                update = (m1 / (1 - beta1**t) + alpha_t * m2) / denom
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr)


class ReferenceLAMB(torch.optim.Optimizer):
    """LAMB as kbit defines it (kbit/optim/lamb.py, Note [trust ratio] in csrc/cpu/optim_call.h): AdamW whose
    bias-corrected step direction u = m_hat / (sqrt(v_hat) + eps) is scaled by
    ``min(1, max_unorm * |p_old| / |u|)`` (|p_old|: the parameter norm before decay and step). Decoupled decay
    is applied unscaled. This only clips (bitsandbytes' LAMB), unlike textbook LAMB's ratio |p| / |u|.
    ``state["unorm"]`` records |u| of the last step."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_unorm=1.0,
                 bias_correction=True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, max_unorm=max_unorm,
                                      bias_correction=bias_correction))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                _init_state(state, p, ("exp_avg", "exp_avg_sq"))
                state["step"] += 1
                t = state["step"]
                g = p.grad
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bc1 = 1 - beta1**t if group["bias_correction"] else 1.0
                bc2 = math.sqrt(1 - beta2**t) if group["bias_correction"] else 1.0
                u = (m / bc1) / (v.sqrt() / bc2 + group["eps"])
                scale = 1.0
                if group["max_unorm"] > 0:
                    pnorm = float(torch.linalg.vector_norm(p, dtype=torch.float64))
                    unorm = float(torch.linalg.vector_norm(u, dtype=torch.float64))
                    state["unorm"] = unorm
                    if unorm > group["max_unorm"] * pnorm:
                        scale = group["max_unorm"] * pnorm / unorm
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(u, alpha=-lr * scale)


class ReferenceLARS(torch.optim.Optimizer):
    """LARS as kbit (and bitsandbytes' PytorchLARS) define it: torch.optim.SGD's momentum rule (coupled decay,
    dampening, Nesterov) whose update is scaled by ``min(1, max_unorm * |p_old| / |update|)``.
    ``state["unorm"]`` records |update| of the last step."""

    def __init__(self, params, lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 max_unorm=0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, max_unorm=max_unorm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                if "momentum_buffer" not in state:
                    state["step"] = 0
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(d, alpha=1 - group["dampening"])
                state["step"] += 1
                buf = state["momentum_buffer"]
                update = d.add(buf, alpha=momentum) if group["nesterov"] else buf
                scale = 1.0
                if group["max_unorm"] > 0:
                    pnorm = float(torch.linalg.vector_norm(p, dtype=torch.float64))
                    unorm = float(torch.linalg.vector_norm(update, dtype=torch.float64))
                    state["unorm"] = unorm
                    if unorm > group["max_unorm"] * pnorm:
                        scale = group["max_unorm"] * pnorm / unorm
                p.add_(update, alpha=-group["lr"] * scale)
