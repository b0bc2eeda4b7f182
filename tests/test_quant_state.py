"""QuantState serialization: bitsandbytes' packed layout (fact sheet 4, 5) and validation of untrusted input."""

from __future__ import annotations

import json

import pytest
import torch

import kbit.functional as F
from conftest import assert_bitwise_equal, randn
from kbit.functional import QuantState

NESTED_KEYS = ["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"]
PLAIN_KEYS = ["absmax", "quant_map", "quant_state.bitsandbytes__nf4"]
BLOB_KEYS = ["quant_type", "blocksize", "dtype", "shape"]
NESTED_BLOB_KEYS = BLOB_KEYS + ["nested_blocksize", "nested_dtype", "nested_offset"]
BLOB = "quant_state.bitsandbytes__nf4"


def quantized(nested: bool, qt: str = "nf4", shape=(128, 300), dtype=torch.float32, blocksize=64):
    A = randn(shape, dtype, torch.Generator().manual_seed(7))
    return F.quantize_4bit(A, blocksize=blocksize, quant_type=qt, compress_statistics=nested)


def blob_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode("utf-8"))


def to_blob(obj) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


@pytest.mark.parametrize("nested", [True, False])
def test_packed_keys_and_blob(nested):
    _, state = quantized(nested)
    d = state.as_dict(packed=True)
    assert list(d) == (NESTED_KEYS if nested else PLAIN_KEYS)
    blob = d[BLOB]
    assert blob.dtype == torch.uint8 and blob.dim() == 1
    text = bytes(blob.tolist()).decode("utf-8")
    # json.dumps with default separators, insertion order: exactly what bitsandbytes writes.
    fields = blob_json(blob)
    assert list(fields) == (NESTED_BLOB_KEYS if nested else BLOB_KEYS)
    assert text == json.dumps(fields)
    assert fields["quant_type"] == "nf4" and fields["blocksize"] == 64 and fields["dtype"] == "float32"
    assert fields["shape"] == [128, 300]
    if nested:
        assert fields["nested_blocksize"] == 256 and fields["nested_dtype"] == "float32"
        assert fields["nested_offset"] == state.offset.item()
        assert d["absmax"].dtype == torch.uint8 and d["nested_absmax"].dtype == torch.float32
        assert_bitwise_equal(d["nested_quant_map"], F.create_dynamic_map(), "nested_quant_map")
    else:
        assert d["absmax"].dtype == torch.float32
    assert_bitwise_equal(d["quant_map"], F.get_4bit_type("nf4"), "quant_map")


def test_unpacked_dict_and_fp4_key():
    _, state = quantized(True, qt="fp4", dtype=torch.bfloat16)
    d = state.as_dict()
    assert list(d) == ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape", "nested_absmax",
                       "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"]
    assert d["dtype"] == "bfloat16" and d["shape"] == (128, 300)
    assert list(state.as_dict(packed=True))[-1] == "quant_state.bitsandbytes__fp4"


# Prefixed keys ("weight.absmax") come from state dicts, which hold the packed form; like bitsandbytes, the
# unpacked form is only recognised without a prefix (its "quant_type" key marks it).
@pytest.mark.parametrize("packed,prefix", [(True, ""), (True, "weight."), (True, "model.layers.0.mlp.weight."),
                                           (False, "")])
@pytest.mark.parametrize("nested", [True, False])
def test_from_dict_roundtrip(packed, nested, prefix):
    data, state = quantized(nested, dtype=torch.float16)
    d = {prefix + k: v for k, v in state.as_dict(packed=packed).items()}
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    loaded = QuantState.from_dict(d, device="cpu")
    assert list(d) == list(snapshot), "from_dict must not add or remove keys of its input"
    for k, v in snapshot.items():
        if isinstance(v, torch.Tensor):
            assert_bitwise_equal(d[k], v, k)
        else:
            assert d[k] == v, k
    assert loaded == state
    assert loaded.shape == torch.Size([128, 300]) and loaded.dtype == torch.float16 and loaded.nested == nested
    assert_bitwise_equal(F.dequantize_4bit(data, loaded), F.dequantize_4bit(data, state), "dequantized")


def test_fsdp_attribute_access():
    _, state = quantized(False)
    assert_bitwise_equal(state.bitsandbytes__nf4, state.as_dict(packed=True)[BLOB], "blob via attribute")
    with pytest.raises(AttributeError):
        state.bitsandbytes__fp4  # noqa: B018


def _with_blob(nested: bool, **changes):
    """A valid packed dict whose JSON fields are changed (value None deletes the field)."""
    _, state = quantized(nested)
    d = state.as_dict(packed=True)
    fields = blob_json(d[BLOB])
    for k, v in changes.items():
        fields.pop(k) if v is None else fields.__setitem__(k, v)
    d[BLOB] = to_blob(fields)
    return d


def _with(nested: bool, **tensors):
    _, state = quantized(nested)
    d = state.as_dict(packed=True)
    d.update(tensors)
    return d


MALFORMED = {
    "garbage_bytes": lambda: _with(False, **{BLOB: torch.tensor([0xFF, 0xFE, 0x00, 0x80], dtype=torch.uint8)}),
    "not_json": lambda: _with(False, **{BLOB: torch.tensor(list(b"quant_type=nf4"), dtype=torch.uint8)}),
    "json_list": lambda: _with(False, **{BLOB: to_blob(["nf4", 64])}),
    "json_string": lambda: _with(False, **{BLOB: to_blob("nf4")}),
    "deeply_nested_json": lambda: _with(False, **{BLOB: torch.tensor(list(b"[" * 3000), dtype=torch.uint8)}),
    "oversized_blob": lambda: _with(False, **{BLOB: to_blob({"quant_type": "nf4", "pad": "x" * 5000})}),
    "blob_not_uint8": lambda: _with(False, **{BLOB: to_blob({"quant_type": "nf4"}).to(torch.int8)}),
    "blob_2d": lambda: _with(False, **{BLOB: to_blob({"quant_type": "nf4"}).view(1, -1)}),
    "wrong_quant_type": lambda: _with_blob(False, quant_type="int4"),
    "quant_type_not_str": lambda: _with_blob(False, quant_type=["nf4"]),
    "blocksize_48": lambda: _with_blob(False, blocksize=48),
    "blocksize_str": lambda: _with_blob(False, blocksize="64"),
    "blocksize_float": lambda: _with_blob(False, blocksize=64.0),
    "blocksize_bool": lambda: _with_blob(False, blocksize=True),
    "blocksize_inconsistent": lambda: _with_blob(False, blocksize=128),
    "shape_inconsistent": lambda: _with_blob(False, shape=[128, 301]),
    "shape_negative": lambda: _with_blob(False, shape=[-128, -300]),
    "shape_float": lambda: _with_blob(False, shape=[128.0, 300]),
    "shape_str": lambda: _with_blob(False, shape="128x300"),
    "shape_int": lambda: _with_blob(False, shape=38400),
    "shape_huge": lambda: _with_blob(False, shape=[2**40, 2**40]),
    "shape_rank_17": lambda: _with_blob(False, shape=[1] * 15 + [128, 300]),
    "missing_quant_type": lambda: _with_blob(False, quant_type=None),
    "missing_blocksize": lambda: _with_blob(False, blocksize=None),
    "missing_dtype": lambda: _with_blob(False, dtype=None),
    "missing_shape": lambda: _with_blob(False, shape=None),
    "missing_absmax": lambda: {k: v for k, v in _with(False).items() if k != "absmax"},
    "missing_quant_map": lambda: {k: v for k, v in _with(False).items() if k != "quant_map"},
    "no_blob": lambda: {k: v for k, v in _with(False).items() if k != BLOB},
    "two_blobs": lambda: _with(False, **{"quant_state.bitsandbytes__fp4": _with(False)[BLOB]}),
    "blob_suffix_int4": lambda: {k.replace("nf4", "int4"): v for k, v in _with(False).items()},
    "unknown_field": lambda: _with_blob(False, weight_decay=0.1),
    "dtype_float64": lambda: _with_blob(False, dtype="float64"),
    "dtype_torch_prefix": lambda: _with_blob(False, dtype="torch.float32"),
    "dtype_not_str": lambda: _with_blob(False, dtype=32),
    "absmax_not_tensor": lambda: _with(False, absmax=[1.0] * 600),
    "absmax_float16": lambda: _with(False, absmax=torch.ones(600, dtype=torch.float16)),
    "absmax_2d": lambda: _with(False, absmax=torch.ones(1, 600)),
    "absmax_too_short": lambda: _with(False, absmax=torch.ones(599)),
    "quant_map_256": lambda: _with(False, quant_map=F.create_dynamic_map()),
    "nested_absmax_wrong_length": lambda: _with(True, nested_absmax=torch.ones(4)),
    "nested_absmax_float_codes": lambda: _with(True, absmax=torch.ones(600)),
    "nested_quant_map_short": lambda: _with(True, nested_quant_map=torch.ones(16)),
    "missing_nested_quant_map": lambda: {k: v for k, v in _with(True).items() if k != "nested_quant_map"},
    "missing_nested_offset": lambda: _with_blob(True, nested_offset=None),
    "nested_offset_str": lambda: _with_blob(True, nested_offset="2.5"),
    "nested_blocksize_0": lambda: _with_blob(True, nested_blocksize=0),
    "missing_nested_blocksize": lambda: _with_blob(True, nested_blocksize=None),
    "nested_dtype_int8": lambda: _with_blob(True, nested_dtype="int8"),
    "missing_nested_dtype": lambda: _with_blob(True, nested_dtype=None),
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises_value_error(make):
    d = make()
    with pytest.raises(ValueError):
        QuantState.from_dict(d, device="cpu")


def test_malformed_fixtures_are_otherwise_valid():
    # The helpers above must produce loadable dicts when nothing is changed, or the table proves nothing.
    for nested in (True, False):
        QuantState.from_dict(_with_blob(nested), device="cpu")
        QuantState.from_dict(_with(nested), device="cpu")


def test_legacy_list_access_and_to():
    _, state = quantized(True)
    absmax, shape, dtype, blocksize, nested, qt = (state[i] for i in range(6))
    assert absmax is state.absmax and shape == (128, 300) and dtype == torch.float32 and blocksize == 64
    assert nested[0] is state.offset and nested[1] is state.state2 and qt == "nf4"
    assert state.to("cpu") is None and state.absmax.device.type == "cpu"
