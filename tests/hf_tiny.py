"""Tiny config-built transformers models for the integration tests (nothing is downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

#: Small enough to load in milliseconds, with every linear layer a multiple of the 64-weight block.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
SEQ_LEN = 16


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype).eval()


def token_batch(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY_LLAMA["vocab_size"], (batch, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def float_with_weights_of(quantized, float_model):
    """``float_model`` with each Linear weight replaced by the dequantized weight of the matching
    kbit Linear4bit in ``quantized``: the exact float function the 4-bit model computes."""
    import copy

    from kbit.integrations._dequantize import dequantized_weight
    from kbit.nn import Linear4bit

    ref = copy.deepcopy(float_model)
    for name, module in quantized.named_modules():
        if isinstance(module, Linear4bit):
            target = ref.get_submodule(name)
            with torch.no_grad():
                target.weight.copy_(dequantized_weight(module, target.weight.dtype))
    return ref
