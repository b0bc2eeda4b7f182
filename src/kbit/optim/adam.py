"""Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019) with 32-bit, 8-bit and paged state.

Update (per element, float32; t = step, bc1 = 1 - beta1^t, bc2 = sqrt(1 - beta2^t)):

    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - (lr / bc1) * m / (sqrt(v) * (1 / bc2) + eps)     (1/bc2 rounded once to float32)

Note: as in bitsandbytes, weight decay is always *decoupled* (AdamW-style), also for ``Adam``;
``kbit.optim.Adam(weight_decay=x)`` equals ``torch.optim.AdamW(weight_decay=x)``, not torch's ``Adam``
with L2 regularization. ``Adam`` and ``AdamW`` differ only in the default ``weight_decay``.
8-bit variants keep m (signed dynamic map) and v (unsigned dynamic map) in blocks of 256 values.

4-bit variants (``Adam4bit``, ``AdamW4bit``, ``optim_bits=4``; a kbit extension, after Li et al. 2023, "Memory
Efficient Optimizers with 4-bit States") keep m and v in 4 bits, two per byte, with one float32 absmax per
block of 128 values: 1.06 bytes of state per parameter. What matters, from the paper's ablations: small
blocks (128, not 2048) for the first moment's outliers, and a second-moment map *without zero* — a v
quantized to 0 turns m / (sqrt(v) + eps) into a huge step. m uses a 16-value signed dynamic-exponent map,
v an unsigned one whose smallest value is 2e-4 of the block's maximum (``kbit.formats``). The paper's best
second-moment normalization (rank-1: min of row and column maxima) would need the whole new v before
quantizing any of it, i.e. a second pass over the tensor; blockwise (B128, zero-free map) is the
paper's single-pass alternative and is what the fused kernel does. The Python reference is
``kbit.backends.reference_optim``. Parameters below ``min_8bit_size`` elements keep 32-bit state.
"""

from __future__ import annotations

from .optimizer import Optimizer2State
from .variants import Variant, reject_amsgrad


class Adam(Variant, Optimizer2State):
    """Adam. Args: ``params``, ``lr``, ``betas``, ``eps``, ``weight_decay`` (decoupled), ``amsgrad`` (must be
    False), ``optim_bits`` (32, 8 or 4), ``args``, ``min_8bit_size``, ``percentile_clipping``, ``block_wise``,
    ``is_paged``, ``bf16_stochastic_round`` — see :class:`~kbit.optim.optimizer.Optimizer2State`."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False,
                 bf16_stochastic_round=False):
        reject_amsgrad(type(self).__name__, amsgrad)
        super().__init__("adam", params, lr, betas, eps, weight_decay, self._bits(optim_bits), args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=self._paged(is_paged),
                         bf16_stochastic_round=bf16_stochastic_round)


class Adam8bit(Adam):
    """:class:`Adam` with 8-bit blockwise state."""

    _FORCED_BITS = 8


class Adam32bit(Adam):
    """:class:`Adam` with 32-bit state."""

    _FORCED_BITS = 32


class PagedAdam(Adam):
    """:class:`Adam` with paged state."""

    _FORCED_PAGED = True


class PagedAdam8bit(Adam8bit):
    """:class:`Adam` with paged 8-bit state."""

    _FORCED_PAGED = True


class PagedAdam32bit(Adam32bit):
    """:class:`Adam` with paged 32-bit state."""

    _FORCED_PAGED = True


class AdamW(Adam):
    """AdamW: :class:`Adam` with ``weight_decay=1e-2`` by default (decay is decoupled in both)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False, bf16_stochastic_round=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged, bf16_stochastic_round)


class AdamW8bit(AdamW):
    """:class:`AdamW` with 8-bit blockwise state."""

    _FORCED_BITS = 8


class AdamW32bit(AdamW):
    """:class:`AdamW` with 32-bit state."""

    _FORCED_BITS = 32


class PagedAdamW(AdamW):
    """:class:`AdamW` with paged state."""

    _FORCED_PAGED = True


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW` with paged 8-bit state."""

    _FORCED_PAGED = True


class PagedAdamW32bit(AdamW32bit):
    """:class:`AdamW` with paged 32-bit state."""

    _FORCED_PAGED = True


class Adam4bit(Adam):
    """:class:`Adam` with 4-bit blockwise state (kbit extension)."""

    _FORCED_BITS = 4


class PagedAdam4bit(Adam4bit):
    """:class:`Adam` with paged 4-bit state."""

    _FORCED_PAGED = True


class AdamW4bit(AdamW):
    """:class:`AdamW` with 4-bit blockwise state (kbit extension): 1.06 bytes of state per parameter."""

    _FORCED_BITS = 4


class PagedAdamW4bit(AdamW4bit):
    """:class:`AdamW` with paged 4-bit state."""

    _FORCED_PAGED = True
