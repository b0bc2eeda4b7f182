"""Hugging Face transformers integration: load, quantize and save models with kbit 4-bit layers.

Usage (importing this module registers the ``"kbit"`` quantization method with transformers)::

    from transformers import AutoModelForCausalLM
    from kbit.integrations.transformers import KbitConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=KbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model.save_pretrained(out)                         # bitsandbytes' 4-bit tensor layout
    model = AutoModelForCausalLM.from_pretrained(out)  # config.json says quant_method "kbit"

bitsandbytes checkpoints (``quant_method: "bitsandbytes"``, 4-bit) and ``BitsAndBytesConfig(load_in_4bit=True)``
go through kbit after ``register(bitsandbytes=True)``, whether or not bitsandbytes is installed.

How it plugs in: transformers' public plugin API (``register_quantization_config`` /
``register_quantizer`` in ``transformers.quantizers.auto``). The quantizer swaps every ``nn.Linear``
(and GPT-2 style ``Conv1D``) for :class:`kbit.nn.Linear4bit` on the meta device, then quantizes each
float weight as it is read from the checkpoint, or rebuilds it from the ``weight.*`` statistics of a
pre-quantized checkpoint. State dicts use bitsandbytes' keys (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``), so the tensors of a
kbit checkpoint and of a bitsandbytes one are interchangeable; only ``quant_method`` in config.json
says which library's quantizer transformers picks (:meth:`KbitConfig.to_bitsandbytes_config` switches it).

Differences from ``BitsAndBytesConfig``, all deliberate:
- 4-bit only (no LLM.int8: ``load_in_8bit=True`` is an error, not a silent fallback).
- ``bnb_4bit_compute_dtype=None`` computes in each input's dtype (bitsandbytes: float32).
- ``bnb_4bit_blocksize`` (default 64, as bitsandbytes) picks the quantization block size.
- CPU offload / disk offload through ``device_map`` are not supported (a clear error).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

try:
    import transformers  # noqa: F401
    from transformers.quantizers import auto as _auto
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils.quantization_config import BitsAndBytesConfig, QuantizationConfigMixin
    from transformers.core_model_loading import ConversionOps
    from transformers.pytorch_utils import Conv1D
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'kbit.integrations.transformers needs transformers, accelerate and safetensors: pip install "kbit[hf]"'
    ) from exc

from .._checks import STORAGE_DTYPES_4BIT
from ..formats import BLOCKSIZES_4BIT, QUANT_TYPES_4BIT
from ..nn import Linear4bit, Params4bit
from ._dequantize import replace_4bit_with_linear

__all__ = ["KbitConfig", "KbitHfQuantizer", "QUANT_METHOD", "register", "unregister_bitsandbytes"]

#: The ``quant_method`` kbit checkpoints carry in config.json.
QUANT_METHOD = "kbit"

#: Key under which transformers looks up 4-bit bitsandbytes checkpoints and ``BitsAndBytesConfig(load_in_4bit=True)``.
_BNB_4BIT_KEY = "bitsandbytes_4bit"

#: Checkpoint entries one 4-bit weight is stored as (bitsandbytes' layout; ``weight`` is the packed data).
SERIALIZED_WEIGHT_KEYS = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    *[f"weight.quant_state.bitsandbytes__{qt}" for qt in QUANT_TYPES_4BIT],
]


def _dtype_arg(value, name: str, allowed, allow_none: bool) -> Optional[torch.dtype]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be set")
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), value)
    if not isinstance(value, torch.dtype) or value not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} must be one of {names} (got {value!r})")
    return value


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class KbitConfig(QuantizationConfigMixin):
    """Quantization config for ``from_pretrained``: every ``nn.Linear`` becomes a kbit ``Linear4bit``.

    The argument names are ``BitsAndBytesConfig``'s, so switching is a rename.

    Args:
        load_in_4bit: must be True (kept for ``BitsAndBytesConfig`` compatibility).
        load_in_8bit: must be False (kbit has no LLM.int8 layers).
        bnb_4bit_quant_type: ``"fp4"`` (default, as bitsandbytes) or ``"nf4"``.
        bnb_4bit_compute_dtype: dtype of the matrix products; None (default) follows each input's dtype.
        bnb_4bit_use_double_quant: quantize the block scales too (about 0.37 fewer bits per weight).
        bnb_4bit_quant_storage: dtype the packed bytes are stored as (uint8 default; bf16/fp16/fp32 for FSDP).
        bnb_4bit_blocksize: weights per scale, 32..4096 (default 64, bitsandbytes' only choice).
        llm_int8_skip_modules: module names (or patterns) kept in full precision. None skips what
            transformers skips by default (the output head and tied weights); a list replaces that default.
    """

    def __init__(self, load_in_4bit: bool = True, load_in_8bit: bool = False, bnb_4bit_quant_type: str = "fp4",
                 bnb_4bit_compute_dtype=None, bnb_4bit_use_double_quant: bool = False, bnb_4bit_quant_storage=None,
                 bnb_4bit_blocksize: int = 64, llm_int8_skip_modules: Optional[list[str]] = None,
                 quant_method: str = QUANT_METHOD, **kwargs: Any):
        if kwargs:
            raise TypeError(f"KbitConfig got unexpected arguments {sorted(kwargs)}")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"KbitConfig is quant_method {QUANT_METHOD!r} (got {quant_method!r}); for bitsandbytes "
                             "checkpoints call kbit.integrations.transformers.register(bitsandbytes=True)")
        if load_in_8bit or not load_in_4bit:
            raise ValueError("kbit quantizes weights to 4 bits only: use load_in_4bit=True "
                             "(LLM.int8 needs bitsandbytes)")
        if bnb_4bit_quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4' (got {bnb_4bit_quant_type!r})")
        if not isinstance(bnb_4bit_use_double_quant, bool):
            raise TypeError("bnb_4bit_use_double_quant must be a bool")
        if bnb_4bit_blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"bnb_4bit_blocksize must be one of {BLOCKSIZES_4BIT} (got {bnb_4bit_blocksize!r})")
        skip = llm_int8_skip_modules
        if skip is not None and not (isinstance(skip, (list, tuple)) and all(isinstance(m, str) for m in skip)):
            raise TypeError("llm_int8_skip_modules must be a list of module names")
        self.quant_method = QUANT_METHOD
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_compute_dtype = _dtype_arg(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype",
                                                 (torch.float32, torch.float16, torch.bfloat16), allow_none=True)
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        storage = torch.uint8 if bnb_4bit_quant_storage is None else bnb_4bit_quant_storage
        self.bnb_4bit_quant_storage = _dtype_arg(storage, "bnb_4bit_quant_storage", STORAGE_DTYPES_4BIT,
                                                 allow_none=False)
        self.bnb_4bit_blocksize = bnb_4bit_blocksize
        self.llm_int8_skip_modules = None if skip is None else list(skip)

    # Read-only views that code written for BitsAndBytesConfig looks at.
    @property
    def load_in_4bit(self) -> bool:
        return True

    @property
    def load_in_8bit(self) -> bool:
        return False

    def quantization_method(self) -> str:
        return self.bnb_4bit_quant_type

    def to_dict(self) -> dict[str, Any]:
        # No "load_in_4bit" key: transformers routes any config dict carrying it to bitsandbytes.
        return {
            "quant_method": QUANT_METHOD,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_compute_dtype": _dtype_name(self.bnb_4bit_compute_dtype),
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": _dtype_name(self.bnb_4bit_quant_storage),
            "bnb_4bit_blocksize": self.bnb_4bit_blocksize,
            "llm_int8_skip_modules": copy.deepcopy(self.llm_int8_skip_modules),
        }

    def __iter__(self):
        yield from self.to_dict().items()

    def to_bitsandbytes_config(self) -> BitsAndBytesConfig:
        """The equivalent ``BitsAndBytesConfig``. Assign it to ``model.config.quantization_config`` before
        ``save_pretrained`` to write a checkpoint that bitsandbytes users load without kbit (the tensors
        are already in bitsandbytes' layout; the block size is stored with each weight)."""
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype or torch.float32,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_quant_storage=self.bnb_4bit_quant_storage, llm_int8_skip_modules=self.llm_int8_skip_modules)


# ---- weight conversion ops (run by transformers for every weight it reads) ---------------------------
class KbitQuantize(ConversionOps):
    """Quantize a float checkpoint weight into the Linear4bit that replaced its ``nn.Linear``."""

    def __init__(self, hf_quantizer: "KbitHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, full_layer_name: Optional[str] = None, model=None, **kwargs) -> dict:
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name, _, _ = param_name.rpartition(".")
            module = model.get_submodule(module_name)
            result[param_name] = _quantized_weight(module, value)
            module._is_hf_initialized = True
        return result


class KbitDeserialize(ConversionOps):
    """Rebuild a 4-bit weight from its packed data and ``weight.*`` statistics (a pre-quantized checkpoint)."""

    def __init__(self, hf_quantizer: "KbitHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model=None, full_layer_name: Optional[str] = None, **kwargs) -> dict:
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module_name, _, _ = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name)
        if not isinstance(module, Linear4bit):
            return tensors  # a plain weight (kept in full precision) that the pattern also caught
        data = tensors.pop("weight")
        if not tensors:  # a float weight in a pre-quantized checkpoint (e.g. a layer quantized after saving)
            weight = _quantized_weight(module, data)
        else:
            weight = Params4bit.from_prequantized(data, tensors, requires_grad=False, device=data.device, module=module)
            expected = (module.out_features, module.in_features)
            if tuple(weight.quant_state.shape) != expected:
                raise ValueError(f"{full_layer_name}: checkpoint weight has shape {tuple(weight.quant_state.shape)}, "
                                 f"the model needs {expected}")
        module._is_hf_initialized = True
        return {"weight": weight}


def _quantized_weight(module: Linear4bit, value: torch.Tensor) -> Params4bit:
    if getattr(module, "source_cls", None) is not None and issubclass(module.source_cls, Conv1D):
        value = value.t()  # Conv1D stores [in, out]; Linear4bit quantizes [out, in]
    old = module.weight
    weight = Params4bit(value.contiguous(), requires_grad=False, blocksize=old.blocksize,
                        compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                        quant_storage=old.quant_storage, module=module)
    return weight._quantize(value.device)


# ---- the quantizer --------------------------------------------------------------------------------
class KbitHfQuantizer(HfQuantizer):
    """transformers quantizer building kbit ``Linear4bit`` layers (from a KbitConfig or a 4-bit BitsAndBytesConfig)."""

    requires_calibration = False
    serialized_names = {"weight": SERIALIZED_WEIGHT_KEYS}

    def __init__(self, quantization_config, **kwargs):
        if getattr(quantization_config, "load_in_8bit", False):
            raise ValueError("kbit has no LLM.int8 layers: load 8-bit bitsandbytes checkpoints with bitsandbytes")
        super().__init__(quantization_config, **kwargs)

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in set(device_map.values()):
            raise ValueError("kbit 4-bit models cannot be offloaded to disk: load without 'disk' in device_map")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        return name == "weight" and isinstance(model.get_submodule(module_name), Linear4bit)

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
        blocksize = getattr(config, "bnb_4bit_blocksize", 64)
        storage = config.bnb_4bit_quant_storage
        replaced = 0
        for name, module in list(model.named_modules()):
            if not name or not should_convert_module(name, self.modules_to_not_convert):
                continue
            if type(module) is torch.nn.Linear:
                in_features, out_features = module.in_features, module.out_features
            elif isinstance(module, Conv1D):
                in_features, out_features = module.weight.shape
            else:
                continue
            layer = Linear4bit(in_features, out_features, bias=module.bias is not None,
                               compute_dtype=config.bnb_4bit_compute_dtype,
                               compress_statistics=config.bnb_4bit_use_double_quant,
                               quant_type=config.bnb_4bit_quant_type, quant_storage=storage, device="meta",
                               blocksize=blocksize)
            layer.source_cls = type(module)
            layer.requires_grad_(False)
            model.set_submodule(name, layer)
            replaced += 1
        if replaced == 0:
            raise ValueError("kbit found no nn.Linear to quantize: check llm_int8_skip_modules and the model type")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, Linear4bit) and module.weight.device.type != "meta":
                module._ensure_quantized()  # a weight the checkpoint lacked (initialized in float)
        model.is_loaded_in_4bit = True  # what PEFT and transformers test for "4-bit model"
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA) train on top of the frozen 4-bit weights

    def _dequantize(self, model, dtype=None):
        return replace_4bit_with_linear(model, dtype)

    def get_quantize_ops(self):
        return KbitQuantize(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": KbitDeserialize}


# ---- registration ---------------------------------------------------------------------------------
_bnb_original: dict[str, Any] = {}


def register(*, bitsandbytes: bool = False) -> None:
    """Register the ``"kbit"`` quantization method with transformers (done on import; idempotent).

    Args:
        bitsandbytes: also route 4-bit bitsandbytes checkpoints (``quant_method: "bitsandbytes"``) and
            ``BitsAndBytesConfig(load_in_4bit=True)`` through kbit, in this process, whether or not
            bitsandbytes is installed. 8-bit bitsandbytes models are left to bitsandbytes.
            :func:`unregister_bitsandbytes` undoes it.
    """
    if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not KbitConfig:
        _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a re-imported (reloaded) module
        _auto.register_quantization_config(QUANT_METHOD)(KbitConfig)
    if _auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not KbitHfQuantizer:
        _auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        _auto.register_quantizer(QUANT_METHOD)(KbitHfQuantizer)
    if bitsandbytes:
        current = _auto.AUTO_QUANTIZER_MAPPING.get(_BNB_4BIT_KEY)
        if current is not KbitHfQuantizer:
            # register_quantizer refuses a taken name, so the entry is swapped directly (and restorable).
            _bnb_original.setdefault(_BNB_4BIT_KEY, current)
            _auto.AUTO_QUANTIZER_MAPPING[_BNB_4BIT_KEY] = KbitHfQuantizer


def unregister_bitsandbytes() -> None:
    """Give 4-bit bitsandbytes checkpoints back to bitsandbytes (undoes ``register(bitsandbytes=True)``)."""
    if _BNB_4BIT_KEY in _bnb_original:
        original = _bnb_original.pop(_BNB_4BIT_KEY)
        if original is None:
            _auto.AUTO_QUANTIZER_MAPPING.pop(_BNB_4BIT_KEY, None)
        else:
            _auto.AUTO_QUANTIZER_MAPPING[_BNB_4BIT_KEY] = original


register()
