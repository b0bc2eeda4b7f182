"""PEFT integration: LoRA on kbit 4-bit layers (QLoRA), adapter checkpoints, merging into a float model.

Usage::

    from peft import LoraConfig
    from kbit.integrations import peft as kpeft

    model = kpeft.prepare_model_for_kbit_training(model)        # freeze, fp32 small params, input grads
    model = kpeft.get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    ...train...
    model.save_pretrained(adapter_dir)                          # adapter weights only (PEFT's format)
    model = kpeft.load_adapter(base_4bit_model, adapter_dir)    # PeftModel.from_pretrained + kbit layers
    float_model = kpeft.merge_to_float(model)                   # nn.Linear with W + BA, no kbit inside

Why the wrappers: PEFT picks a LoRA layer by ``isinstance`` on bitsandbytes' classes. A kbit
``Linear4bit`` is an ``nn.Linear`` subclass, so plain ``peft.get_peft_model`` gives it PEFT's float
``lora.Linear``: forward and training are right, but merging would add the delta to the packed 4-bit
bytes (PEFT then raises a dtype error). :func:`get_peft_model` and :func:`load_adapter` register
:class:`LoraLinear4bit` for kbit layers through PEFT's custom-module API
(``LoraConfig._register_custom_module``); :func:`register_lora_modules` does it on any LoraConfig.
:func:`merge_to_float` handles LoRA layers of either kind.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch

try:
    import peft as _peft
    from peft import LoraConfig, PeftConfig, PeftModel
    from peft.tuners.lora import Linear as _LoraLinear
    from peft.tuners.lora import LoraLayer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('kbit.integrations.peft needs peft and transformers: pip install "kbit[hf]"') from exc

from ..nn import Linear4bit, Params4bit
from ._dequantize import dequantized_weight, linear_from_4bit, replace_4bit_with_linear

__all__ = ["LoraLinear4bit", "register_lora_modules", "get_peft_model", "load_adapter", "merge_to_float",
           "prepare_model_for_kbit_training"]


class LoraLinear4bit(_LoraLinear):
    """PEFT LoRA layer over a kbit :class:`~kbit.nn.Linear4bit`: ``y = base(x) + scale * B(A(dropout(x)))``.

    Forward and training are PEFT's ``lora.Linear`` (only the adapter weights get gradients; the 4-bit
    weight has none). Merging dequantizes the base weight, adds ``scale * B @ A`` and re-quantizes
    with the same settings, so a merged layer carries 4-bit rounding of the sum (use
    :func:`merge_to_float` for an exact float merge). Unmerging restores the original 4-bit weight
    bit for bit: it is kept while adapters are merged. Plain LoRA only: DoRA and the other PEFT
    variants need float base weights and are rejected.
    """

    @property
    def lora_variants(self):
        return {(): None}

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as exc:
            raise ValueError(f"kbit Linear4bit supports plain LoRA only; this LoraConfig asks for a variant "
                             f"(DoRA, aLoRA, ...) that needs a float base weight: {exc}") from None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if not self.merged_adapters:  # first merge: keep the exact 4-bit weight for unmerge()
            self._kbit_unmerged = (base._ensure_quantized(), None if base.bias is None else base.bias.detach().clone())
        warnings.warn("merging LoRA into a 4-bit layer re-quantizes the weight: outputs change by 4-bit rounding",
                      stacklevel=2)
        w = dequantized_weight(base, torch.float32)
        bias = None if base.bias is None else base.bias.detach().float()
        for adapter in adapter_names:
            w = w + self.get_delta_weight(adapter).float()
            if self.lora_bias[adapter]:
                if bias is None:
                    raise RuntimeError("cannot merge a LoRA bias (lora_bias=True) into a layer without bias")
                bias = bias + self.lora_B[adapter].bias.float() * self.scaling[adapter]
        if safe_merge and not (torch.isfinite(w).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights of adapters {adapter_names}")
        self._set_base_weight(w)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        weight, bias = self._kbit_unmerged
        base.weight = weight
        base.quant_state = weight.quant_state
        weight.module = base
        if bias is not None:
            base.bias.data = bias
        self._kbit_unmerged = None
        self.merged_adapters.clear()

    def _set_base_weight(self, w: torch.Tensor) -> None:
        base = self.get_base_layer()
        old = base.weight
        new = Params4bit(w.to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
                         compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                         quant_storage=old.quant_storage, module=base)
        base.weight = new._quantize(old.device)

    def __repr__(self) -> str:
        return "kbit_lora." + super().__repr__().removeprefix("lora.")


def register_lora_modules(config: LoraConfig) -> LoraConfig:
    """Make ``config`` give kbit ``Linear4bit`` layers :class:`LoraLinear4bit`; returns ``config``."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"kbit's LoRA layers need a peft.LoraConfig (got {type(config).__name__})")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config


def get_peft_model(model: torch.nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   **kwargs: Any) -> PeftModel:
    """``peft.get_peft_model`` with kbit's LoRA layer for ``Linear4bit`` (see module docstring)."""
    return _peft.get_peft_model(model, register_lora_modules(peft_config), adapter_name=adapter_name, **kwargs)


def load_adapter(model: torch.nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                 **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` with kbit's LoRA layer for ``Linear4bit``: attach a saved adapter to a
    (4-bit) base model. Extra keyword arguments go to ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained``."""
    config = PeftConfig.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if k in ("subfolder", "revision")})
    if isinstance(config, LoraConfig):
        register_lora_modules(config)
    return PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


def merge_to_float(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """A float copy of a LoRA model on a 4-bit base: every LoRA layer becomes an ``nn.Linear`` holding
    ``dequantize(W) + sum over active adapters of scale * B @ A`` (computed in float32), every other
    ``Linear4bit`` a dequantized ``nn.Linear``. The input is left as it was.

    Args:
        model: a ``PeftModel`` (or a model with PEFT LoRA layers injected).
        dtype: cast every parameter of the copy to this dtype (default: each new linear layer takes the dtype its
            weight was quantized from, and the other parameters keep theirs).

    Returns:
        The base model type (e.g. ``LlamaForCausalLM``) with no PEFT or kbit layers and no quantization
        config, ready for ``save_pretrained`` as a float checkpoint.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    merged = copy.deepcopy(base)
    targets = [(name, m) for name, m in merged.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in targets:
        inner = layer.get_base_layer()
        adapters = [] if layer.disable_adapters else [
            a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
        if not isinstance(inner, torch.nn.Linear):
            raise TypeError(f"merge_to_float handles LoRA on linear layers; {name} wraps {type(inner).__name__}")
        if getattr(layer, "fan_in_fan_out", False):
            raise TypeError(f"merge_to_float: {name} has fan_in_fan_out=True (Conv1D); not supported")
        delta = None
        for adapter in adapters:
            if adapter in getattr(layer, "lora_variant", {}):
                raise TypeError(f"merge_to_float handles plain LoRA; adapter {adapter!r} of {name} is a variant")
            d = layer.get_delta_weight(adapter).float()
            delta = d if delta is None else delta + d
        if isinstance(inner, Linear4bit):
            new = linear_from_4bit(inner, dtype, delta)
        else:
            w = inner.weight.detach().float() + (0 if delta is None else delta)
            new = torch.nn.Linear(inner.in_features, inner.out_features, bias=inner.bias is not None,
                                  device=w.device, dtype=dtype or inner.weight.dtype)
            with torch.no_grad():
                new.weight.copy_(w)
                if inner.bias is not None:
                    new.bias.copy_(inner.bias)
        for adapter in adapters:
            if layer.lora_bias[adapter]:
                with torch.no_grad():
                    new.bias += layer.lora_B[adapter].bias * layer.scaling[adapter]
        merged.set_submodule(name, new)
    replace_4bit_with_linear(merged, dtype)
    _drop_quantization_marks(merged)
    if dtype is not None:
        # Parameters only: Module.to(dtype) would also round float buffers such as rotary-embedding
        # frequencies, which transformers keeps in float32 when it loads a model in a lower precision.
        for param in merged.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return merged


def _drop_quantization_marks(model: torch.nn.Module) -> None:
    """Make a dequantized transformers model look (and save) like a float one."""
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if config is not None and "_is_quantized" in getattr(config, "__dict__", {}):
        config._is_quantized = False


def prepare_model_for_kbit_training(model: torch.nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """Get a 4-bit model ready for adapter training (the same steps as PEFT's function of this name).

    1. Freeze every parameter (the adapters added afterwards are the only trainable ones).
    2. Cast every float16/bfloat16 parameter that is not a 4-bit weight (norms, embeddings, biases,
       the output head) to float32, for stable training.
    3. With ``use_gradient_checkpointing``: make the input embeddings' output require grad (so
       checkpointed blocks whose own weights are all frozen still backpropagate) and turn on gradient
       checkpointing with ``gradient_checkpointing_kwargs`` (default ``{"use_reentrant": False}``).

    Returns ``model`` (modified in place).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, Params4bit):
                continue
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        # torch asks for an explicit use_reentrant; the non-reentrant form is the one it recommends.
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise TypeError("use_gradient_checkpointing=True needs a transformers model; "
                            "pass use_gradient_checkpointing=False for other modules")
    return model
