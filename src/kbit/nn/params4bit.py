"""Params4bit: a frozen weight that quantizes itself to NF4/FP4 on its first move to a device.

bitsandbytes-compatible (same constructor, attributes, ``from_prequantized``), with its sharp edges
removed: moving or casting a quantized weight never converts the packed bytes (so ``module.half()`` does
not corrupt a weight stored as bf16), pickling and ``deepcopy`` keep the class and its quantization state,
and ``to()`` keeps the owning module.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from .. import _checks
from ..functional import QuantState, quantize_4bit
from ..formats import BLOCKSIZES_4BIT

_DEFAULT_BLOCKSIZE = 64


def _rebuild_params4bit(data, requires_grad, attributes):
    """Unpickling target of Params4bit (torch.save / pickle keep the class)."""
    return Params4bit(data, requires_grad=requires_grad, **attributes)


class Params4bit(torch.nn.Parameter):
    """A weight that holds a float tensor until it is quantized, then the packed 4-bit data.

    Args:
        data: the float weight (or the packed data with ``bnb_quantized=True`` and a ``quant_state``).
        requires_grad: False for a frozen base weight (the only supported case once quantized).
        quant_state: the QuantState of already-packed data.
        blocksize: 32..4096 (default 64).
        compress_statistics: double-quantize the absmax (saves ~0.37 bits per weight).
        quant_type: ``"fp4"`` (bitsandbytes' default) or ``"nf4"``.
        quant_storage: dtype the packed bytes are viewed as (uint8; bf16/fp16/fp32 for FSDP).
        module: the owning Linear4bit, whose ``quant_state`` is kept in sync.
        bnb_quantized: whether ``data`` is already packed.
    Extra keyword arguments starting with ``_`` (flags that model loaders set, e.g. ``_is_hf_initialized``)
    are accepted and ignored; any other unknown argument is an error.
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[QuantState] = None, blocksize: Optional[int] = None,
                compress_statistics: bool = True, quant_type: str = "fp4", quant_storage: torch.dtype = torch.uint8,
                module: Optional[torch.nn.Module] = None, bnb_quantized: bool = False, **kwargs: Any):
        unknown = [k for k in kwargs if not k.startswith("_")]
        if unknown:
            raise TypeError(f"Params4bit got unexpected keyword arguments {unknown}")
        if data is None:
            data = torch.empty(0)
        blocksize = _DEFAULT_BLOCKSIZE if blocksize is None else blocksize
        if blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT} (got {blocksize})")
        _checks.quant_type(quant_type)
        _checks.quant_storage(quant_storage)
        if bnb_quantized and quant_state is None:
            raise ValueError("a quantized Params4bit (bnb_quantized=True) needs its quant_state")
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    # ---- quantization --------------------------------------------------------------------------------
    def _quantize(self, device) -> "Params4bit":
        w = self.data.contiguous().to(device)
        if not w.is_floating_point():
            raise TypeError(f"cannot quantize a {w.dtype} weight: Params4bit expects a float weight before quantization")
        packed, state = quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                                      quant_type=self.quant_type, quant_storage=self.quant_storage)
        self.data = packed
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state
        return self

    def _attributes(self) -> dict:
        return dict(quant_state=self.quant_state, blocksize=self.blocksize,
                    compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                    quant_storage=self.quant_storage, bnb_quantized=self.bnb_quantized)

    def to(self, *args, **kwargs):
        """Quantize on the first move to a (non-meta) device; afterwards move the packed data and its state.

        A dtype is applied to a float weight before quantization and ignored afterwards: the packed bytes
        are never converted, whatever ``quant_storage`` is.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if dtype is not None and self.is_floating_point():
                self.data = self.data.to(dtype)
            if device is not None and device.type != "meta":
                return self._quantize(device)
            return self if device is None else Params4bit(self.data.to(device), self.requires_grad, module=self.module,
                                                          **self._attributes())
        if device is None or device == self.device:
            return self
        if self.quant_state is not None:
            self.quant_state.to(device)
        return Params4bit(self.data.to(device, non_blocking=non_blocking), self.requires_grad, module=self.module,
                          **self._attributes())

    # nn.Module.half() / .float() / .bfloat16() / .double() call these on every floating-point parameter;
    # a packed weight whose quant_storage is a float dtype must not be converted (it holds bytes, not values).
    def half(self, memory_format=torch.preserve_format):
        return self.to(torch.float16)

    def float(self, memory_format=torch.preserve_format):
        return self.to(torch.float32)

    def bfloat16(self, memory_format=torch.preserve_format):
        return self.to(torch.bfloat16)

    def double(self, memory_format=torch.preserve_format):
        return self.to(torch.float64)

    def cpu(self):
        return self.to("cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(torch.device("cuda") if device is None else device, non_blocking=non_blocking)

    def xpu(self, device=None, non_blocking: bool = False):
        return self.to(torch.device("xpu") if device is None else device, non_blocking=non_blocking)

    # ---- copies and pickling -------------------------------------------------------------------------
    def __reduce_ex__(self, protocol):
        attributes = self._attributes()
        return _rebuild_params4bit, (self.data, self.requires_grad, attributes)

    def __deepcopy__(self, memo):
        new = Params4bit(copy.deepcopy(self.data, memo), self.requires_grad,
                         quant_state=copy.deepcopy(self.quant_state, memo), blocksize=self.blocksize,
                         compress_statistics=self.compress_statistics, quant_type=self.quant_type,
                         quant_storage=self.quant_storage, bnb_quantized=self.bnb_quantized,
                         module=memo.get(id(self.module)))
        memo[id(self)] = new
        return new

    def __copy__(self):
        return Params4bit(self.data, self.requires_grad, module=self.module, **self._attributes())

    # ---- checkpoints ---------------------------------------------------------------------------------
    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict, requires_grad: bool = False,
                          device="cpu", module: Optional[torch.nn.Module] = None, **kwargs) -> "Params4bit":
        """Wrap packed data and its serialized statistics (the ``weight.*`` entries of a Linear4bit
        state_dict without the ``weight.`` prefix). ``device`` defaults to the CPU (bitsandbytes: CUDA)."""
        state = QuantState.from_dict(quantized_stats, device=device)
        check_packed_matches(data, state)
        self = cls(data.to(device), requires_grad=requires_grad, quant_state=state, blocksize=state.blocksize,
                   compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=data.dtype,
                   module=module, bnb_quantized=True, **kwargs)
        if module is not None:
            module.quant_state = state
        return self

    # ---- read-only views of the state (FSDP walks these names) --------------------------------------
    def _state(self) -> QuantState:
        if self.quant_state is None:
            raise AttributeError("this Params4bit is not quantized yet (move it to a device first)")
        return self.quant_state

    @property
    def absmax(self):
        return self._state().absmax

    @property
    def code(self):
        return self._state().code

    @property
    def quant_map(self):
        return self._state().code

    @property
    def offset(self):
        return self._state().offset

    @property
    def state2(self):
        return self._state().state2

    @property
    def nested_absmax(self):
        return self._nested().absmax

    @property
    def nested_blocksize(self):
        return self._nested().blocksize

    @property
    def nested_quant_map(self):
        return self._nested().code

    @property
    def nested_dtype(self):
        return self._nested().dtype

    @property
    def nested_offset(self):
        return self._state().offset

    def _nested(self) -> QuantState:
        state = self._state()
        if state.state2 is None:
            raise AttributeError("this weight's statistics are not double-quantized")
        return state.state2


def check_packed_matches(data: torch.Tensor, state: QuantState) -> None:
    """The packed tensor must hold the bytes the state's shape needs."""
    n = 1
    for s in state.shape:
        n *= s
    _checks.packed_4bit_for(data, n)
