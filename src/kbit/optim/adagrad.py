"""Adagrad (Duchi et al. 2011) — torch.optim.Adagrad's rule:

    g' = g + weight_decay * p
    s <- s + g'^2                      (s starts at initial_accumulator_value)
    p <- p - lr / (1 + (t - 1) * lr_decay) * g' / (sqrt(s) + eps)

Unlike bitsandbytes, ``lr_decay`` and ``initial_accumulator_value`` are implemented.
"""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import Variant


class Adagrad(Variant, Optimizer1State):
    """Adagrad with 32-bit or 8-bit state."""

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, bf16_stochastic_round=False):
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        super().__init__("adagrad", params, lr, (0.0, 0.0), eps, weight_decay, self._bits(optim_bits), args,
                         min_8bit_size, percentile_clipping, block_wise,
                         bf16_stochastic_round=bf16_stochastic_round)
        for group in self.param_groups:
            group.setdefault("lr_decay", lr_decay)
            group.setdefault("initial_accumulator_value", initial_accumulator_value)
        self.defaults.update(lr_decay=lr_decay, initial_accumulator_value=initial_accumulator_value)


class Adagrad8bit(Adagrad):
    """:class:`Adagrad` with 8-bit state."""

    _FORCED_BITS = 8


class Adagrad32bit(Adagrad):
    """:class:`Adagrad` with 32-bit state."""

    _FORCED_BITS = 32
