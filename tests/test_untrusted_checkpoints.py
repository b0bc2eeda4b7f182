"""Untrusted checkpoints: every kbit state dict saves and loads with ``torch.load(weights_only=True)`` (no pickle),
and a tampered one — garbage or oversized ``quant_state`` blobs, missing, extra, wrong-shaped or wrong-dtype
tensors, optimizer states of the wrong size or step type, wrong parameter groups — raises a clear error and
leaves the module or optimizer exactly as it was (never half-loaded). JSON parsing is bounded in size and depth.

Complements test_quant_state.py (malformed QuantState dicts) and test_optim_state_dict.py (structural optimizer
corruptions) by going through the whole path a user takes: torch.save, torch.load(weights_only=True), load.
"""

from __future__ import annotations

import copy
import io
import json
import time

import pytest
import torch

import kbit.functional as F
import kbit.nn as knn
import kbit.optim as O
from conftest import assert_bitwise_equal
from kbit.nn import Params4bit
from kbit.quant_state import MAX_BLOB_BYTES
from optim_cases import CASES

BLOB = "weight.quant_state.bitsandbytes__nf4"
#: A rejected blob must be rejected quickly (it is bounded before json sees it).
MAX_REJECT_SECONDS = 1.0


def _roundtrip(obj):
    """torch.save then torch.load(weights_only=True): the only way kbit expects checkpoints to be read."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _blob(obj) -> torch.Tensor:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return torch.tensor(list(raw), dtype=torch.uint8)


def _blob_dict(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode())


def _linear(seed=0, nested=True, bias=True):
    torch.manual_seed(seed)
    return knn.Linear4bit(128, 48, bias=bias, quant_type="nf4", compress_statistics=nested).to("cpu")


def _module_snapshot(m: torch.nn.Module):
    """Every tensor the module computes with (packed weight, statistics, bias), cloned, plus its identity."""
    snap = {k: v.detach().clone() for k, v in m.state_dict().items()}
    return snap, m.weight


def _assert_module_unchanged(m, snapshot, x):
    tensors, weight = snapshot
    assert m.weight is weight, "a rejected load replaced the weight"
    now = m.state_dict()
    assert now.keys() == tensors.keys()
    for k in tensors:
        assert_bitwise_equal(now[k], tensors[k], f"{k} changed by a rejected load")
    return m(x)


# ---- everything loads without pickle ---------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_linear4bit_state_dict_is_weights_only(quant_type, nested, storage):
    torch.manual_seed(0)
    m = knn.Linear4bit(96, 40, quant_type=quant_type, compress_statistics=nested, quant_storage=storage).to("cpu")
    sd = _roundtrip(m.state_dict())
    fresh = knn.Linear4bit(96, 40, quant_type=quant_type, compress_statistics=nested, quant_storage=storage)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), m(x))
    p = Params4bit.from_prequantized(sd["weight"], {k[7:]: v for k, v in sd.items() if k.startswith("weight.")})
    assert torch.equal(F.dequantize_4bit(p, p.quant_state), F.dequantize_4bit(m.weight, m.weight.quant_state))


@pytest.mark.parametrize("cls", [knn.EmbeddingNF4, knn.EmbeddingFP4, knn.Embedding8bit])
def test_embedding_state_dict_is_weights_only(cls):
    torch.manual_seed(0)
    m = cls(20, 64).to("cpu")
    sd = _roundtrip(m.state_dict())
    fresh = cls(20, 64)
    fresh.load_state_dict(sd)
    idx = torch.tensor([[0, 5, 19]])
    assert torch.equal(fresh(idx), m(idx))


@pytest.mark.filterwarnings("ignore:kbit. paged optimizer state")
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_optimizer_state_dict_is_weights_only(case):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 65)), torch.nn.Parameter(torch.randn(7))]
    opt = case.make(params)
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    sd = _roundtrip(opt.state_dict())
    twin = case.make([torch.nn.Parameter(p.detach().clone()) for p in params])
    twin.load_state_dict(sd)
    for a, b in zip(opt.state.values(), twin.state.values()):
        assert a.keys() == b.keys()


# ---- tampered quant_state blobs and statistics: Linear4bit.load_state_dict ------------------------------
def _edit_blob(**changes):
    def edit(sd):
        d = _blob_dict(sd[BLOB])
        d.update(changes)
        sd[BLOB] = _blob(d)
    return edit


def _set(key, value):
    def edit(sd):
        sd[key] = value(sd[key]) if callable(value) else value
    return edit


def _drop(key):
    return lambda sd: sd.pop(key)


def _nested(depth):
    return ("[" * depth + "]" * depth).encode()


TAMPERED_LINEAR = {
    # the JSON blob
    "blob not utf-8": (_set(BLOB, _blob(b"\xff\xfe\x00garbage")), "not valid UTF-8 JSON"),
    "blob not json": (_set(BLOB, _blob(b"{quant_type: nf4")), "not valid UTF-8 JSON"),
    "blob a json list": (_set(BLOB, _blob([1, 2, 3])), "must hold a JSON object"),
    "blob a json string": (_set(BLOB, _blob("nf4")), "must hold a JSON object"),
    "blob empty": (_set(BLOB, torch.zeros(0, dtype=torch.uint8)), "not valid UTF-8 JSON"),
    "blob too large": (_set(BLOB, _blob({"pad": "x" * MAX_BLOB_BYTES})), f"at most {MAX_BLOB_BYTES}"),
    "blob nested too deep": (_set(BLOB, _blob(_nested(MAX_BLOB_BYTES // 2))), "nested too deeply|must hold a JSON"),
    "blob float32 tensor": (_set(BLOB, lambda t: t.float()), "1-D uint8 tensor"),
    "blob 2-D": (_set(BLOB, lambda t: t.view(1, -1)), "1-D uint8 tensor"),
    "blob missing": (_drop(BLOB), "quant_type|Expected packed"),
    "blob key says fp4": (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__fp4", sd.pop(BLOB)),
                          "disagrees with its quant_type"),
    "two blobs": (lambda sd: sd.__setitem__("weight.quant_state.bitsandbytes__fp4", sd[BLOB].clone()),
                  "exactly one"),
    "quant_type int4": (_edit_blob(quant_type="int4"), "disagrees|'nf4' or 'fp4'"),
    "blocksize 48": (_edit_blob(blocksize=48), "blocksize must be one of"),
    "blocksize string": (_edit_blob(blocksize="64"), "must be an int"),
    "blocksize huge int": (_edit_blob(blocksize=10 ** 1000), "must be one of"),
    "blocksize bool": (_edit_blob(blocksize=True), "must be an int"),
    "dtype float64": (_edit_blob(dtype="float64"), "'dtype' must be one of"),
    "dtype missing": (lambda sd: sd.__setitem__(BLOB, _blob({k: v for k, v in _blob_dict(sd[BLOB]).items()
                                                              if k != "dtype"})), "'dtype'"),
    "shape transposed": (_edit_blob(shape=[128, 48]), r"shape \(128, 48\), this layer needs \(48, 128\)"),
    "shape negative": (_edit_blob(shape=[-48, -128]), "non-negative ints"),
    "shape huge": (_edit_blob(shape=[2 ** 62, 2 ** 62]), "absmax has"),
    "shape of floats": (_edit_blob(shape=[48.0, 128.0]), "non-negative ints"),
    "shape rank 100": (_edit_blob(shape=[1] * 100), "at most 16"),
    "shape a string": (_edit_blob(shape="48,128"), "list of at most"),
    "nested_offset string": (_edit_blob(nested_offset="0.1"), "finite float32 number"),
    "nested_offset NaN": (_edit_blob(nested_offset=float("nan")), "finite float32 number"),
    "nested_offset 1e39": (_edit_blob(nested_offset=1e39), "finite float32 number"),
    "nested_blocksize 0": (_edit_blob(nested_blocksize=0), "nested_blocksize must be positive"),
    "nested_blocksize 64": (_edit_blob(nested_blocksize=64), "nested_absmax has 1 entries but 96"),
    "unknown blob key": (_edit_blob(evil="rm -rf"), "unexpected quant_state keys"),
    # the statistics tensors
    "absmax missing": (_drop("weight.absmax"), "missing 'absmax'"),
    "absmax short": (_set("weight.absmax", lambda t: t[:-1]), "absmax has 95 entries"),
    "absmax float32 (nested says uint8)": (_set("weight.absmax", lambda t: t.float()), "dtype torch.float32"),
    "absmax 2-D": (_set("weight.absmax", lambda t: t.view(2, -1)), "must be 1-D"),
    "quant_map short": (_set("weight.quant_map", lambda t: t[:8]), "16 entries"),
    "quant_map float64": (_set("weight.quant_map", lambda t: t.double()), "dtype torch.float64"),
    "nested_absmax long": (_set("weight.nested_absmax", lambda t: torch.cat([t, t])), "nested_absmax has 2"),
    "nested_quant_map short": (_set("weight.nested_quant_map", lambda t: t[:16]), "256 entries"),
    "nested_absmax missing": (_drop("weight.nested_absmax"), "missing 'nested_absmax'"),
    "extra statistics key": (_set("weight.evil", torch.zeros(3)), "unexpected quant_state keys"),
    "statistics not a tensor": (_set("weight.absmax", None), "must be a tensor"),
    # the packed data and the other parameters
    "packed short": (_set("weight", lambda t: t[:100]), "needs 3072"),
    "packed int64": (_set("weight", lambda t: t.long()), "quant_storage"),
    "float weight wrong shape": (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("weight.")]
                                 and sd.__setitem__("weight", torch.randn(48, 127)), "float weight of shape"),
    "bias wrong shape": (_set("bias", torch.zeros(47)), "size mismatch for bias"),
    "weight missing": (_drop("weight"), "has its statistics .* but not the packed weight"),
}


@pytest.mark.parametrize("tamper", TAMPERED_LINEAR, ids=str)
def test_tampered_linear4bit_checkpoint_raises_and_changes_nothing(tamper):
    edit, message = TAMPERED_LINEAR[tamper]
    source = _linear(seed=1)
    sd = _roundtrip(source.state_dict())
    edit(sd)
    sd = _roundtrip(sd)  # the tampered file is itself a weights_only checkpoint
    target = _linear(seed=2)
    x = torch.randn(2, 128)
    want = target(x)
    snapshot = _module_snapshot(target)
    start = time.perf_counter()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message) as info:
        target.load_state_dict(sd)
    assert time.perf_counter() - start < MAX_REJECT_SECONDS
    # torch wraps module errors in RuntimeError("Error(s) in loading state_dict ..."): ours name the entry.
    if isinstance(info.value, RuntimeError):
        assert "Error(s) in loading state_dict" in str(info.value)
    assert torch.equal(_assert_module_unchanged(target, snapshot, x), want)


#: Rows of TAMPERED_LINEAR about what the layer checks beyond the weight's own data and statistics.
LAYER_ONLY = {"bias wrong shape", "float weight wrong shape", "weight missing", "shape transposed"}


@pytest.mark.parametrize("tamper", sorted(set(TAMPERED_LINEAR) - LAYER_ONLY))
def test_tampered_statistics_raise_in_from_prequantized(tamper):
    edit, message = TAMPERED_LINEAR[tamper]
    sd = _roundtrip(_linear().state_dict())
    edit(sd)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    with pytest.raises((ValueError, TypeError), match=message):
        Params4bit.from_prequantized(sd["weight"], stats)


def test_failed_load_inside_a_model_leaves_that_layer_unchanged():
    """A bad layer in a bigger model: torch raises after visiting every module; the bad layer keeps its weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_linear(1), torch.nn.ReLU(), knn.Linear4bit(48, 8, quant_type="nf4").to("cpu"))
    sd = _roundtrip(model.state_dict())
    sd["2.weight.quant_state.bitsandbytes__nf4"] = _blob(b"\x00" * 10)
    snapshot = _module_snapshot(model[2])
    with pytest.raises(RuntimeError, match="While loading 2.weight: packed quant_state is not valid"):
        model.load_state_dict(sd)
    _assert_module_unchanged(model[2], snapshot, torch.randn(1, 48))


@pytest.mark.parametrize("edit, message", [(_drop("bias"), "Missing key.*bias"),
                                           (_set("evil", torch.zeros(1)), "Unexpected key.*evil")], ids=["missing", "extra"])
def test_missing_or_unexpected_keys_raise_under_strict(edit, message):
    """torch's contract, which kbit keeps: a strict load with a missing or an extra key raises after loading the
    valid entries (a module cannot tell a strict load from strict=False, which asks for exactly that)."""
    sd = _roundtrip(_linear(1).state_dict())
    edit(sd)
    with pytest.raises(RuntimeError, match=message):
        _linear(2).load_state_dict(sd)


def test_non_strict_load_skips_missing_bias_but_loads_the_weight():
    """strict=False is the caller asking for a partial load: the weight loads, the bias stays."""
    source, target = _linear(1), _linear(2)
    sd = _roundtrip(source.state_dict())
    del sd["bias"]
    bias = target.bias.detach().clone()
    target.load_state_dict(sd, strict=False)
    assert torch.equal(target.weight.data, source.weight.data) and torch.equal(target.bias, bias)


# ---- embeddings -------------------------------------------------------------------------------------------
TAMPERED_EMBEDDING8 = {
    "int8 table wrong shape": (lambda sd: sd.__setitem__("weight", sd["weight"][:5]), "shape"),
    "int8 table without SCB": (lambda sd: sd.pop("SCB"), "needs SCB"),
    "SCB wrong length": (lambda sd: sd.__setitem__("SCB", sd["SCB"][:3]), "needs SCB"),
    "SCB int": (lambda sd: sd.__setitem__("SCB", sd["SCB"].long()), "needs SCB"),
    "table int32": (lambda sd: sd.__setitem__("weight", sd["weight"].int()), "int8 .with SCB. or float"),
    "float table wrong shape": (lambda sd: (sd.pop("SCB"), sd.__setitem__("weight", torch.randn(5, 64))), "shape"),
}


@pytest.mark.parametrize("tamper", TAMPERED_EMBEDDING8, ids=str)
def test_tampered_embedding8bit_checkpoint_raises_and_changes_nothing(tamper):
    edit, message = TAMPERED_EMBEDDING8[tamper]
    torch.manual_seed(0)
    sd = _roundtrip(knn.Embedding8bit(20, 64).to("cpu").state_dict())
    edit(sd)
    target = knn.Embedding8bit(20, 64).to("cpu")
    idx = torch.tensor([0, 7, 19])
    want = target(idx)
    weight, scb = target.weight, target.SCB
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(_roundtrip(sd))
    assert target.weight is weight and target.SCB is scb
    assert torch.equal(target(idx), want)


@pytest.mark.parametrize("tamper", ["blob not json", "absmax short", "shape transposed", "packed short",
                                    "quant_map short", "extra statistics key"])
def test_tampered_embedding4bit_checkpoint_raises_and_changes_nothing(tamper):
    edit, message = TAMPERED_LINEAR[tamper]
    if tamper == "shape transposed":
        edit, message = _edit_blob(shape=[64, 20]), r"shape \(64, 20\), this layer needs \(20, 64\)"
    if tamper == "packed short":
        message = "needs 640"
    if tamper == "absmax short":
        message = "absmax has 19 entries"
    torch.manual_seed(0)
    sd = _roundtrip(knn.EmbeddingNF4(20, 64).to("cpu").state_dict())
    edit(sd)
    target = knn.EmbeddingNF4(20, 64).to("cpu")
    idx = torch.tensor([0, 7, 19])
    want = target(idx)
    snapshot = _module_snapshot(target)
    with pytest.raises(RuntimeError, match=message):
        target.load_state_dict(_roundtrip(sd))
    assert target.weight is snapshot[1]
    assert torch.equal(target(idx), want)


# ---- optimizers -------------------------------------------------------------------------------------------
def _trained_adam8bit(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 65)), torch.nn.Parameter(torch.randn(300))]
    opt = O.AdamW8bit(params, min_8bit_size=0, percentile_clipping=95)
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    return params, opt


def _inner(sd, i=0):
    return sd["state"][i]["__bnb_optimizer_quant_state__"]


TAMPERED_OPTIM = {
    "step a string": (lambda sd: sd["state"][0].__setitem__("step", "10"), "'step' must be a non-negative integer"),
    "step a float tensor 1.5": (lambda sd: sd["state"][0].__setitem__("step", torch.tensor(1.5)), "non-negative integer"),
    "step a vector": (lambda sd: sd["state"][0].__setitem__("step", torch.ones(3)), "'step' must be a number"),
    "step None": (lambda sd: sd["state"][0].__setitem__("step", None), "non-negative integer"),
    "state2 missing": (lambda sd: _inner(sd).pop("state2"), "missing tensor 'state2'"),
    "absmax1 missing": (lambda sd: _inner(sd).pop("absmax1"), "absmax1 .blockwise. or max1"),
    "extra state tensor": (lambda sd: _inner(sd).__setitem__("exp_avg", torch.zeros(3)), "unexpected keys"),
    "state1 one element short": (lambda sd: _inner(sd).__setitem__("state1", _inner(sd)["state1"].view(-1)[:-1]),
                                 "state1 has shape"),
    "state2 float16": (lambda sd: _inner(sd).__setitem__("state2", _inner(sd)["state2"].half()), "state2 must be"),
    "absmax1 of another size": (lambda sd: _inner(sd).__setitem__("absmax1", torch.ones(5)), "absmax values"),
    "absmax2 int": (lambda sd: _inner(sd).__setitem__("absmax2", _inner(sd)["absmax2"].int()), "absmax2 must be"),
    "qmap1 unsorted": (lambda sd: _inner(sd).__setitem__("qmap1", _inner(sd)["qmap1"].flip(0)), "sorted"),
    "qmap2 with NaN": (lambda sd: _inner(sd)["qmap2"].__setitem__(3, float("nan")), "free of NaN"),
    "gnorm_vec 99 values": (lambda sd: _inner(sd).__setitem__("gnorm_vec", torch.zeros(99)), "gnorm_vec"),
    "state for the wrong parameter": (lambda sd: sd["state"].__setitem__(0, sd["state"][1]), "state1 has shape"),
    "one param group too many": (lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])),
                                 "number of parameter groups"),
    "no param groups": (lambda sd: sd.__setitem__("param_groups", []), "number of parameter groups"),
    "param group one param short": (lambda sd: sd["param_groups"][0]["params"].pop(), "size of optimizer's group"),
    "lr a string": (lambda sd: sd["param_groups"][0].__setitem__("lr", "1e-3"), "lr must be a non-negative number"),
    "lr NaN": (lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")), "lr must be"),
    "eps negative": (lambda sd: sd["param_groups"][0].__setitem__("eps", -1.0), "eps must be"),
    "betas one value": (lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9,)), "at least 2 numbers"),
    "betas strings": (lambda sd: sd["param_groups"][0].__setitem__("betas", ("a", "b")), "at least 2 numbers"),
    "not a state dict": (lambda sd: sd.pop("param_groups"), "'state' and 'param_groups'"),
    "sr_seed a string": (lambda sd: sd["param_groups"][0].update(bf16_stochastic_round=True, sr_seed="7"),
                         "sr_seed must be a non-negative int"),
    "sr_seed negative": (lambda sd: sd["param_groups"][0].update(bf16_stochastic_round=True, sr_seed=-1),
                         "sr_seed must be"),
    "bf16_stochastic_round a string": (lambda sd: sd["param_groups"][0].update(bf16_stochastic_round="yes"),
                                       "must be True or False"),
}


@pytest.mark.parametrize("tamper", TAMPERED_OPTIM, ids=str)
def test_tampered_optimizer_checkpoint_raises_and_changes_nothing(tamper):
    edit, message = TAMPERED_OPTIM[tamper]
    _, source = _trained_adam8bit(0)
    sd = _roundtrip(source.state_dict())
    edit(sd)
    sd = _roundtrip(sd)
    params, target = _trained_adam8bit(1)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(sd)
    after = target.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key in before["state"]:
        assert before["state"][key]["step"] == after["state"][key]["step"]
        for name, t in _inner(before, key).items():
            assert_bitwise_equal(_inner(after, key)[name], t, f"{tamper}: {name}")
    for p in params:  # and it still steps
        p.grad = torch.randn_like(p) * 0.01
    target.step()


FOUR_BIT = [O.Adam4bit, O.AdamW4bit, O.Lion4bit]
TAMPERED_4BIT = {
    "state1 sized for 8-bit": (lambda st: st.__setitem__("state1", torch.zeros(64 * 65, dtype=torch.uint8)),
                               "state1 has shape"),
    "qmap1 of 256 values": (lambda st: st.__setitem__("qmap1", torch.linspace(-1, 1, 256)),
                            "state1 has shape|qmap1"),  # read as an 8-bit state, whose shape is then wrong
    "absmax1 for blocks of 256": (lambda st: st.__setitem__("absmax1", torch.ones(-(-64 * 65 // 256))), "absmax"),
}


def _trained_4bit(cls, seed):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(64, 65) * 0.1)]
    opt = cls(params)
    params[0].grad = torch.randn(64, 65) * 0.01
    opt.step()
    return params, opt


@pytest.mark.parametrize("cls", FOUR_BIT, ids=lambda c: c.__name__)
def test_4bit_optimizer_state_dict_is_weights_only_and_tampering_is_rejected(cls):
    _, source = _trained_4bit(cls, 0)
    sd = _roundtrip(source.state_dict())
    _, twin = _trained_4bit(cls, 1)
    twin.load_state_dict(sd)
    for name, (edit, message) in TAMPERED_4BIT.items():
        bad = _roundtrip(source.state_dict())
        edit(_inner(bad))
        _, target = _trained_4bit(cls, 2)
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(_roundtrip(bad))
        for key, t in _inner(before).items():
            assert_bitwise_equal(_inner(target.state_dict())[key], t, f"{name}: {key}")


def test_json_bombs_are_bounded():
    """A blob far larger than any quant_state, or nested to the recursion limit, is rejected in bounded time."""
    from kbit.quant_state import unpack_tensor_to_dict

    bombs = [torch.zeros(50_000_000, dtype=torch.uint8),  # 50 MB: rejected by size, never decoded
             _blob(_nested(MAX_BLOB_BYTES // 2)),  # 2048 levels of [[...]]: json would recurse per level
             _blob(b"{" + b'"a":' * 1000 + b"1" + b"}" * 1000),
             _blob(b"9" * MAX_BLOB_BYTES)]  # a 4096-digit number
    for bomb in bombs:
        start = time.perf_counter()
        with pytest.raises(ValueError):
            unpack_tensor_to_dict(bomb)
        assert time.perf_counter() - start < MAX_REJECT_SECONDS
