"""Embedding4bit / Embedding8bit: lookups equal the dequantized table, state dicts round-trip, bad input."""

from __future__ import annotations

import pytest
import torch

import kbit
from kbit.nn import Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4

from conftest import assert_bitwise_equal

# NF4/FP4 keep ~10% relative error per weight; int8 with one scale per row ~0.5%.
MAX_4BIT_REL_ERR = 0.15
MAX_8BIT_REL_ERR = 0.01


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("cls", [EmbeddingNF4, EmbeddingFP4])
@pytest.mark.parametrize("dim", [128, 100, 7])  # whole blocks per row (row gather path) or not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding4bit_lookup(cls, dim, dtype):
    torch.manual_seed(0)
    ref = torch.nn.Embedding(300, dim, dtype=dtype)
    emb = cls(300, dim, dtype=dtype)
    emb.load_state_dict(ref.state_dict())
    emb = emb.to("cpu")
    idx = torch.randint(0, 300, (3, 5))
    out = emb(idx)
    assert out.dtype == dtype and out.shape == (3, 5, dim)
    table = kbit.functional.dequantize_4bit(emb.weight, emb.weight.quant_state).to(dtype)
    assert_bitwise_equal(out, table[idx], "lookup")
    assert rel_err(out, ref(idx)) < MAX_4BIT_REL_ERR
    again = cls(300, dim, dtype=dtype)
    again.load_state_dict(emb.state_dict())
    assert_bitwise_equal(again(idx), out, "reloaded lookup")


def test_embedding8bit_lookup_and_state_dict():
    torch.manual_seed(0)
    ref = torch.nn.Embedding(500, 64)
    emb = Embedding8bit(500, 64)
    emb.load_state_dict(ref.state_dict())
    emb = emb.to("cpu")
    assert emb.weight.dtype == torch.int8 and emb.SCB.shape == (500,)
    idx = torch.randint(0, 500, (9,))
    assert rel_err(emb(idx), ref(idx)) < MAX_8BIT_REL_ERR
    again = Embedding8bit(500, 64)
    again.load_state_dict(emb.state_dict())
    assert torch.equal(again(idx), emb(idx))


def test_bad_checkpoints_raise():
    emb = EmbeddingNF4(300, 128).to("cpu")
    with pytest.raises(RuntimeError, match="shape"):
        EmbeddingNF4(200, 128).load_state_dict(emb.state_dict())
    e8 = Embedding8bit(10, 4).to("cpu")
    sd = e8.state_dict()
    del sd["SCB"]
    with pytest.raises(RuntimeError, match="SCB"):
        Embedding8bit(10, 4).load_state_dict(sd)
    with pytest.raises(ValueError, match="quant_type"):
        Embedding4bit(10, 64, quant_type="int3")
