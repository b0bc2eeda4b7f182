"""SGD with momentum — exactly torch.optim.SGD's rule, dampening and Nesterov included:

    g' = g + weight_decay * p                       (coupled L2, as torch)
    buf <- g' (first step), else momentum * buf + (1 - dampening) * g'
    p <- p - lr * (g' + momentum * buf if nesterov else buf)

Unlike bitsandbytes, ``dampening`` and ``nesterov`` are applied, not ignored. Plain SGD (momentum 0)
needs no state and is not provided: use torch.optim.SGD.
"""

from __future__ import annotations

from .optimizer import Optimizer1State
from .variants import Variant


def check_momentum(cls_name: str, momentum: float, dampening: float, nesterov: bool) -> None:
    if momentum == 0:
        raise NotImplementedError(f"{cls_name} without momentum is not supported! Use torch.optim.SGD, which needs no state.")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"Invalid dampening value: {dampening}")
    if nesterov and dampening != 0:
        raise ValueError("Nesterov momentum requires zero dampening")


class SGD(Variant, Optimizer1State):
    """SGD with momentum, 32-bit or 8-bit momentum buffer."""

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, optim_bits=32, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, bf16_stochastic_round=False):
        check_momentum(type(self).__name__, momentum, dampening, nesterov)
        super().__init__("momentum", params, lr, (momentum, dampening), 0.0, weight_decay, self._bits(optim_bits),
                         args, min_8bit_size, percentile_clipping, block_wise,
                         bf16_stochastic_round=bf16_stochastic_round)
        for group in self.param_groups:
            group.setdefault("nesterov", bool(nesterov))
        self.defaults["nesterov"] = bool(nesterov)


class SGD8bit(SGD):
    """:class:`SGD` with an 8-bit momentum buffer."""

    _FORCED_BITS = 8


class SGD32bit(SGD):
    """:class:`SGD` with a 32-bit momentum buffer."""

    _FORCED_BITS = 32
