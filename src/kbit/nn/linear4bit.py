"""Linear4bit, LinearNF4, LinearFP4: nn.Linear with a frozen 4-bit weight (QLoRA, Dettmers et al. 2023).

The weight is quantized on the module's first move to a device (``.to("cpu")`` included) or at its first
forward. The forward computes ``x @ W.T + b`` in ``compute_dtype`` (default: the input's dtype) and
returns the input's dtype; gradients reach the input and the bias, never the 4-bit weight.

Differences from bitsandbytes, all deliberate:
- ``load_state_dict`` accepts a quantized state dict directly (bitsandbytes needs ``from_prequantized``),
  validating it first, as well as a float one.
- The bias is cast for the computation, never rewritten in place; ``compute_dtype=None`` follows each
  call's input dtype instead of freezing the first call's.
- The weight stays in the layout ``state_dict()`` writes (no CPU repacking), for any in/out features.
- An extra keyword ``blocksize`` (default 64) chooses the quantization block size.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..functional import QuantState
from ..matmul import matmul_4bit
from .params4bit import Params4bit
from .weight4bit import Weight4bitMixin


class Linear4bit(Weight4bitMixin, torch.nn.Linear):
    """nn.Linear whose weight is stored in 4 bits.

    Args:
        input_features, output_features, bias: as nn.Linear.
        compute_dtype: dtype of the matrix product (None: the input's dtype).
        compress_statistics: double-quantize the block scales.
        quant_type: ``"fp4"`` (default, as bitsandbytes) or ``"nf4"`` (better for normally distributed weights).
        quant_storage: dtype the packed bytes are stored as.
        device: where the float weight is created (quantization happens on the first move).
        blocksize: quantization block size, 32..4096 (default 64).
    """

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_type="fp4", quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(self.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage, module=self)
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state: Optional[QuantState] = None
        self.quant_storage = quant_storage

    def _weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._ensure_quantized()
        inp_dtype = x.dtype
        compute_dtype = self.compute_dtype if self.compute_dtype is not None else x.dtype
        if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Linear4bit computes in float32, float16 or bfloat16, not {compute_dtype}")
        # Conversions only where needed: a no-op .to() still costs ~1.5 us, a tenth of a small layer's call.
        if inp_dtype != compute_dtype:
            x = x.to(compute_dtype)
        bias = self.bias
        if bias is not None and bias.dtype != compute_dtype:
            bias = bias.to(compute_dtype)
        out = matmul_4bit(x, weight, quant_state=weight.quant_state, bias=bias)
        return out if out.dtype == inp_dtype else out.to(inp_dtype)

    def extra_repr(self) -> str:
        w = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={w.quant_type}, blocksize={w.blocksize}, compress_statistics={w.compress_statistics}, "
                f"quantized={w.bnb_quantized}")

class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="fp4"``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device, blocksize)


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type="nf4"`` (NormalFloat, the QLoRA data type)."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device, blocksize)


def replace_linear_4bit(model: torch.nn.Module, *, quant_type: str = "nf4", compute_dtype=None,
                        compress_statistics: bool = True, blocksize: int = 64, quant_storage=torch.uint8,
                        skip=("lm_head",)) -> torch.nn.Module:
    """Quantize every ``nn.Linear`` of ``model`` in place (modules whose name ends with an entry of
    ``skip`` are kept) and return the model.

    Layers are converted one at a time and each float weight is released as soon as its layer is
    quantized, so peak memory stays near the model plus one layer's float weight.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = linear.weight.device
        layer = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=compute_dtype, compress_statistics=compress_statistics, quant_type=quant_type,
                           quant_storage=quant_storage, device="meta", blocksize=blocksize)
        layer.weight = Params4bit(linear.weight.data, requires_grad=False, blocksize=blocksize,
                                  compress_statistics=compress_statistics, quant_type=quant_type,
                                  quant_storage=quant_storage, module=layer)
        layer.weight._quantize(device)
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        layer.train(linear.training)
        setattr(parent, child, layer)
        del linear
    return model
