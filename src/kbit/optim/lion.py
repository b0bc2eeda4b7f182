"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    p <- p * (1 - lr * weight_decay)
    p <- p - lr * sign(beta1 * m + (1 - beta1) * g)
    m <- beta2 * m + (1 - beta2) * g

One state (m); the 8-bit variants store it with the signed dynamic map.
"""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import Variant


class Lion(Variant, Optimizer1State):
    """Lion with 32-bit or 8-bit state (default lr 1e-4: Lion wants a 3-10x smaller lr than AdamW)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False,
                 bf16_stochastic_round=False):
        super().__init__("lion", params, lr, betas, 0.0, weight_decay, self._bits(optim_bits), args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=self._paged(is_paged),
                         bf16_stochastic_round=bf16_stochastic_round)


class Lion8bit(Lion):
    """:class:`Lion` with 8-bit state."""

    _FORCED_BITS = 8


class Lion32bit(Lion):
    """:class:`Lion` with 32-bit state."""

    _FORCED_BITS = 32


class PagedLion(Lion):
    """:class:`Lion` with paged state."""

    _FORCED_PAGED = True


class PagedLion8bit(Lion8bit):
    """:class:`Lion` with paged 8-bit state."""

    _FORCED_PAGED = True


class PagedLion32bit(Lion32bit):
    """:class:`Lion` with paged 32-bit state."""

    _FORCED_PAGED = True


class Lion4bit(Lion):
    """:class:`Lion` with 4-bit blockwise state (kbit extension; signed 16-value map, blocks of 128)."""

    _FORCED_BITS = 4


class PagedLion4bit(Lion4bit):
    """:class:`Lion` with paged 4-bit state."""

    _FORCED_PAGED = True
