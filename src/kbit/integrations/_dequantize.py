"""Turning 4-bit layers back into float ``nn.Linear`` (shared by ``model.dequantize()`` and LoRA merging)."""

from __future__ import annotations

from typing import Optional

import torch

from ..functional import dequantize_4bit
from ..nn import Linear4bit


def dequantized_weight(layer: Linear4bit, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float weight ``[out_features, in_features]`` of ``layer`` (quantizing it first if it is not yet),
    in ``dtype`` (default: the dtype it was quantized from)."""
    weight = layer._ensure_quantized()
    w = dequantize_4bit(weight.data, weight.quant_state)
    return w if dtype is None else w.to(dtype)


def linear_from_4bit(layer: Linear4bit, dtype: Optional[torch.dtype] = None,
                     delta: Optional[torch.Tensor] = None) -> torch.nn.Linear:
    """A new ``nn.Linear`` holding ``layer``'s dequantized weight (plus ``delta``, computed in float32),
    in ``dtype`` (default: the dtype the weight was quantized from). The bias is copied."""
    w = dequantized_weight(layer, torch.float32)
    if delta is not None:
        w = w + delta.to(device=w.device, dtype=torch.float32)
    dtype = layer.weight.quant_state.dtype if dtype is None else dtype
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                             device=w.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(w)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    linear.train(layer.training)
    return linear


def replace_4bit_with_linear(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Swap every :class:`~kbit.nn.Linear4bit` of ``model`` for a float ``nn.Linear``, in place; returns ``model``."""
    targets = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name in targets:
        model.set_submodule(name, linear_from_4bit(model.get_submodule(name), dtype))
    return model
