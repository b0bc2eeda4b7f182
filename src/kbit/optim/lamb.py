"""LAMB (You et al. 2020) as bitsandbytes defines it: Adam whose step is clipped by a trust ratio.

The Adam step u (see adam.py) is scaled by min(1, max_unorm * |p| / |u_hat|), where |p| is the parameter
norm before the step and u_hat = m_hat / (sqrt(v_hat) + eps) the bias-corrected direction (Note [trust
ratio] in csrc/cpu/optim_call.h). Unlike bitsandbytes, the trust ratio also applies with 8-bit state
(bitsandbytes silently drops it there), and ``bias_correction=False`` is honoured. ``adam_w_mode=False``
(L2 instead of decoupled decay) and ``amsgrad=True`` are not implemented and raise ValueError.
"""

from __future__ import annotations

from .optimizer import Optimizer2State
from .variants import Variant, reject_amsgrad


class LAMB(Variant, Optimizer2State):
    """LAMB with 32-bit or 8-bit state (``max_unorm`` default 1.0, ``block_wise`` default False)."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, adam_w_mode=True, optim_bits=32, args=None, min_8bit_size=4096,
                 percentile_clipping=100, block_wise=False, max_unorm=1.0, bf16_stochastic_round=False):
        reject_amsgrad(type(self).__name__, amsgrad)
        if not adam_w_mode:
            raise ValueError("LAMB with adam_w_mode=False (L2 weight decay) is not implemented; decay is decoupled")
        super().__init__("lamb", params, lr, betas, eps, weight_decay, self._bits(optim_bits), args, min_8bit_size,
                         percentile_clipping, block_wise, max_unorm,
                         bf16_stochastic_round=bf16_stochastic_round)
        for group in self.param_groups:
            group.setdefault("bias_correction", bool(bias_correction))
        self.defaults["bias_correction"] = bool(bias_correction)


class LAMB8bit(LAMB):
    """:class:`LAMB` with 8-bit state."""

    _FORCED_BITS = 8


class LAMB32bit(LAMB):
    """:class:`LAMB` with 32-bit state."""

    _FORCED_BITS = 32
