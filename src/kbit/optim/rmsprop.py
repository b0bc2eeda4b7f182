"""RMSprop (Hinton 2012) — torch.optim.RMSprop's rule without momentum or centering:

    g' = g + weight_decay * p
    s <- alpha * s + (1 - alpha) * g'^2
    p <- p - lr * g' / (sqrt(s) + eps)

``momentum`` and ``centered`` would need a second state; they raise ValueError (bitsandbytes silently
ignores momentum, which gives different training from torch's).
"""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import Variant


class RMSprop(Variant, Optimizer1State):
    """RMSprop with 32-bit or 8-bit state."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, bf16_stochastic_round=False):
        if alpha == 0:
            raise NotImplementedError("RMSprop with alpha==0.0 is not supported!")
        if momentum != 0:
            raise ValueError("RMSprop with momentum != 0 is not implemented (it needs a second state); use momentum=0")
        if centered:
            raise ValueError("Centered RMSprop is not implemented; use centered=False")
        super().__init__("rmsprop", params, lr, (alpha, momentum), eps, weight_decay, self._bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise,
                         bf16_stochastic_round=bf16_stochastic_round)


class RMSprop8bit(RMSprop):
    """:class:`RMSprop` with 8-bit state."""

    _FORCED_BITS = 8


class RMSprop32bit(RMSprop):
    """:class:`RMSprop` with 32-bit state."""

    _FORCED_BITS = 32
