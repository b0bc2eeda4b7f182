"""AdEMAMix (Pagliardini, Ablin & Grangier 2024): Adam with a second, slow momentum.

    p <- p * (1 - lr * weight_decay)
    m1 <- beta1 * m1 + (1 - beta1) * g             (fast EMA)
    m2 <- beta3_t * m2 + (1 - beta3_t) * g         (slow EMA)
    nu <- beta2 * nu + (1 - beta2) * g^2
    p <- p - lr * (m1 / bc1 + alpha_t * m2) / (sqrt(nu) / bc2 + eps)

``t_alpha`` / ``t_beta3`` warm alpha and beta3 up over that many steps (``ademamix_schedule`` in
families.py). State: state1 holds m1 and m2 stacked (2, *shape), state2 holds nu. Unlike bitsandbytes,
``AdEMAMix32bit`` works (bitsandbytes' crashes on its first step).
"""

from __future__ import annotations

from .optimizer import Optimizer2State
from .variants import Variant


class AdEMAMix(Variant, Optimizer2State):
    """AdEMAMix with 32-bit or 8-bit state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None, t_beta3=None, eps=1e-8,
                 weight_decay=1e-2, optim_bits=32, min_8bit_size=4096, is_paged=False,
                 bf16_stochastic_round=False):
        if len(tuple(betas)) != 3:
            raise ValueError(f"AdEMAMix needs three betas (beta1, beta2, beta3), got {betas!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (got {alpha})")
        super().__init__("ademamix", params, lr, betas, eps, weight_decay, self._bits(optim_bits), None, min_8bit_size,
                         is_paged=self._paged(is_paged), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                         bf16_stochastic_round=bf16_stochastic_round)


class AdEMAMix8bit(AdEMAMix):
    """:class:`AdEMAMix` with 8-bit state (m1 and m2 with their own absmax rows)."""

    _FORCED_BITS = 8


class AdEMAMix32bit(AdEMAMix):
    """:class:`AdEMAMix` with 32-bit state."""

    _FORCED_BITS = 32


class PagedAdEMAMix(AdEMAMix):
    """:class:`AdEMAMix` with paged state."""

    _FORCED_PAGED = True


class PagedAdEMAMix8bit(AdEMAMix8bit):
    """:class:`AdEMAMix` with paged 8-bit state."""

    _FORCED_PAGED = True


class PagedAdEMAMix32bit(AdEMAMix32bit):
    """:class:`AdEMAMix` with paged 32-bit state."""

    _FORCED_PAGED = True
