"""QuantState: the statistics that turn quantized codes back into numbers, and their serialized form.

The serialized form is bitsandbytes' exactly (key names, the JSON blob and its key order), so a
checkpoint written by either library loads in the other. Loading treats the blob as untrusted: its
size is bounded and every field is type- and consistency-checked (Note [untrusted quant_state]).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch

from . import _checks
from .formats import BLOCKSIZES_4BIT, QUANT_TYPES_4BIT

__all__ = ["QuantState", "check_4bit_state", "pack_dict_to_tensor", "unpack_tensor_to_dict"]

# Note [untrusted quant_state]
# A blob is a few hundred bytes (7 small fields); anything far larger is not one of ours and is rejected
# before json.loads sees it. Shapes are bounded in rank and entries are checked to be ints.
MAX_BLOB_BYTES = 4096
MAX_SHAPE_RANK = 16

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPE_NAMES.items():
        if dt == dtype:
            return name
    raise ValueError(f"QuantState dtype must be float32, float16 or bfloat16 (got {dtype})")


def _dtype_from_name(name: Any, field: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPE_NAMES:
        raise ValueError(f"quant_state field {field!r} must be one of {sorted(_DTYPE_NAMES)} (got {name!r})")
    return _DTYPE_NAMES[name]


def pack_dict_to_tensor(d: Mapping[str, Any]) -> torch.Tensor:
    """JSON-encode ``d`` (insertion order, default separators) into a 1-D uint8 tensor."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t: torch.Tensor) -> dict:
    """Inverse of :func:`pack_dict_to_tensor`, for untrusted input: bounded size, must be a JSON object."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("a packed quant_state must be a 1-D uint8 tensor holding a JSON object")
    if t.numel() > MAX_BLOB_BYTES:
        raise ValueError(f"packed quant_state is {t.numel()} bytes; at most {MAX_BLOB_BYTES} are accepted")
    try:
        d = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"packed quant_state is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:  # deeply nested arrays: not a quant_state, and json would recurse per level
        raise ValueError("packed quant_state is nested too deeply to be a quant_state") from None
    if not isinstance(d, dict):
        raise ValueError(f"packed quant_state must hold a JSON object (got {type(d).__name__})")
    return d


def check_4bit_state(state: Any) -> None:
    """A QuantState handed to a 4-bit op must be self-consistent (the ops then check it against the data):
    a 4-bit quant_type and block size, a shape, a 16-entry code if any, and for double quantization uint8
    absmax codes, a scalar float32 offset and a nested QuantState."""
    if not isinstance(state, QuantState):
        raise TypeError(f"quant_state must be a kbit.functional.QuantState, got {type(state).__name__}")
    if state.shape is None:
        raise ValueError("quant_state.shape is None: this is not a 4-bit QuantState (use dequantize_blockwise)")
    _checks.quant_type(state.quant_type)
    _checks.blocksize_4bit(state.blocksize)
    if state.code is not None and (not isinstance(state.code, torch.Tensor) or state.code.numel() != 16):
        raise ValueError(f"a 4-bit quant_state's code must hold 16 values (got {getattr(state.code, 'shape', state.code)!r})")
    if state.nested:
        if not isinstance(state.state2, QuantState):
            raise TypeError(f"quant_state.state2 must be a QuantState, got {type(state.state2).__name__}")
        off = state.offset
        if not isinstance(off, torch.Tensor) or off.numel() != 1 or off.dtype != torch.float32:
            raise ValueError(f"a double-quantized quant_state needs offset: a float32 scalar tensor (got {off!r})")


class QuantState:
    """Quantization statistics of one tensor (bitsandbytes-compatible).

    Fields: ``absmax`` (float32 per block, or uint8 codes when ``nested``), ``shape``, ``code`` (the code
    map), ``dtype`` (of the original tensor), ``blocksize``, ``quant_type`` (``"nf4"``/``"fp4"`` for 4-bit,
    None for 8-bit), and for double quantization ``offset`` (0-dim float32) and ``state2`` (the
    QuantState of the absmax itself).
    """

    valid_quant_types = QUANT_TYPES_4BIT
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in QUANT_TYPES_4BIT]
    valid_qs_keys = [
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
        "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None, offset=None,
                 state2=None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    # -- bitsandbytes compatibility -------------------------------------------------------------
    def __getattr__(self, name: str):
        # FSDP walks state_dict keys such as "weight.quant_state.bitsandbytes__nf4" as attributes.
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'QuantState' object has no attribute '{name}'")

    def __getitem__(self, idx):
        """Legacy list form: [absmax, shape, dtype, blocksize, [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def to(self, device) -> None:
        """Move the tensors to ``device`` in place (returns None, like bitsandbytes)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)

    def __eq__(self, other) -> bool:
        if not isinstance(other, QuantState):
            return False

        def same_tensor(a, b):
            if a is None or b is None:
                return a is b
            return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-6)

        return (
            same_tensor(self.absmax, other.absmax)
            and self.shape == other.shape
            and same_tensor(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and (self.offset == other.offset if self.offset is not None and other.offset is not None
                 else self.offset is other.offset)
            and (self.state2 == other.state2 if self.state2 is not None and other.state2 is not None
                 else self.state2 is other.state2)
        )

    def __repr__(self) -> str:
        return (f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape is not None else None}, "
                f"dtype={self.dtype}, blocksize={self.blocksize}, nested={self.nested})")

    # -- serialization ---------------------------------------------------------------------------
    def as_dict(self, packed: bool = False) -> dict:
        """The state as a dict of bitsandbytes' keys. With ``packed=True`` (and a 4-bit quant_type) the
        non-tensor fields go into one uint8 JSON tensor under ``"quant_state.bitsandbytes__<type>"``:
        the form a ``Linear4bit`` state_dict stores."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                "nested_quant_map": self.state2.code.clone(),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset.item()),
            })
        if not packed or self.quant_type is None:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        scalars = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors["quant_state.bitsandbytes__" + self.quant_type] = pack_dict_to_tensor(scalars)
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device) -> "QuantState":
        """Rebuild a state from :meth:`as_dict` output (packed or not; keys may carry a prefix such as
        ``"weight."``). Unlike bitsandbytes the input dict is not modified. Every field is validated."""
        d = dict(qs_dict)
        blob_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in d:
            if not blob_keys:
                raise ValueError("Expected packed or unpacked quant_state items, found neither")
            if len(blob_keys) > 1 or blob_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"There should be exactly one `quant_state` item with ending from {cls.valid_qs_type_keys}. "
                    f"Detected {blob_keys}."
                )
        if len(blob_keys) == 1:
            suffix = blob_keys[0].split(".")[-1]
            blob = unpack_tensor_to_dict(d.pop(blob_keys[0]))
            if suffix in cls.valid_qs_type_keys and blob.get("quant_type") != suffix[len("bitsandbytes__"):]:
                raise ValueError(f"quant_state key {blob_keys[0]!r} disagrees with its quant_type {blob.get('quant_type')!r}")
            d.update(blob)
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = sorted(set(d) - set(cls.valid_qs_keys))
        if unknown:
            raise ValueError(f"unexpected quant_state keys {unknown}; expected a subset of {cls.valid_qs_keys}")
        return cls._validated(d, device)

    @classmethod
    def _validated(cls, d: dict, device) -> "QuantState":
        def tensor(key, dtype=None):
            if key not in d:
                raise ValueError(f"quant_state is missing {key!r}")
            t = d[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"quant_state field {key!r} must be a tensor (got {type(t).__name__})")
            if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
                raise ValueError(f"quant_state field {key!r} has dtype {t.dtype}, expected {dtype}")
            return t.to(device)

        def integer(key):
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"quant_state field {key!r} must be an int (got {v!r})")
            return v

        quant_type = d.get("quant_type")
        if quant_type is not None:
            _checks.quant_type(quant_type)
        blocksize = integer("blocksize")
        if quant_type is not None and blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"quant_state blocksize must be one of {BLOCKSIZES_4BIT} (got {blocksize})")
        if blocksize <= 0:
            raise ValueError(f"quant_state blocksize must be positive (got {blocksize})")
        shape = d.get("shape")
        if quant_type is not None and shape is None:
            raise ValueError("a 4-bit quant_state needs 'shape' (the shape of the quantized tensor)")
        if shape is not None:
            if (not isinstance(shape, (list, tuple, torch.Size)) or len(shape) > MAX_SHAPE_RANK
                    or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
                raise ValueError(f"quant_state shape must be a list of at most {MAX_SHAPE_RANK} non-negative ints (got {shape!r})")
            shape = torch.Size(shape)
        dtype = _dtype_from_name(d.get("dtype"), "dtype")
        nested = any(k.startswith("nested_") for k in d)  # a missing nested_absmax is then named as such
        absmax = tensor("absmax", torch.uint8 if nested else torch.float32)
        code = tensor("quant_map", torch.float32)
        if absmax.dim() != 1:
            raise ValueError(f"quant_state absmax must be 1-D (got shape {tuple(absmax.shape)})")
        if shape is not None:
            n = 1
            for s in shape:
                n *= s
            blocks = -(-n // blocksize)
            if absmax.numel() != blocks:
                raise ValueError(
                    f"quant_state absmax has {absmax.numel()} entries but shape {tuple(shape)} with blocksize "
                    f"{blocksize} needs {blocks}"
                )
        expected_code = 16 if quant_type is not None else 256
        if code.dim() != 1 or code.numel() != expected_code:
            raise ValueError(f"quant_state quant_map must have {expected_code} entries (got shape {tuple(code.shape)})")
        offset = state2 = None
        if nested:
            nested_blocksize = integer("nested_blocksize")
            if nested_blocksize <= 0:
                raise ValueError(f"quant_state nested_blocksize must be positive (got {nested_blocksize})")
            nested_absmax = tensor("nested_absmax", torch.float32)
            nested_code = tensor("nested_quant_map", torch.float32)
            if nested_code.dim() != 1 or nested_code.numel() != 256:
                raise ValueError("quant_state nested_quant_map must have 256 entries")
            if nested_absmax.dim() != 1 or nested_absmax.numel() != -(-absmax.numel() // nested_blocksize):
                raise ValueError(
                    f"quant_state nested_absmax has {nested_absmax.numel()} entries but {absmax.numel()} absmax codes "
                    f"in blocks of {nested_blocksize} need {-(-absmax.numel() // nested_blocksize)}"
                )
            raw_offset = d.get("nested_offset")
            if isinstance(raw_offset, torch.Tensor) and raw_offset.numel() == 1:
                raw_offset = raw_offset.item()
            if (isinstance(raw_offset, bool) or not isinstance(raw_offset, (int, float))
                    or not math.isfinite(raw_offset if isinstance(raw_offset, float) else 0.0)
                    or abs(raw_offset) > torch.finfo(torch.float32).max):
                raise ValueError(f"quant_state nested_offset must be a finite float32 number (got {raw_offset!r:.40})")
            offset = torch.tensor(float(raw_offset), dtype=torch.float32, device=device)
            state2 = cls(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize,
                         dtype=_dtype_from_name(d.get("nested_dtype"), "nested_dtype"))
        return cls(quant_type=quant_type, absmax=absmax, blocksize=blocksize, code=code, dtype=dtype, shape=shape,
                   offset=offset, state2=state2)
