"""The demo's pieces: a byte-level causal transformer, a corpus cut from Python's own standard library,
and LoRA adapters around frozen (4-bit) linear layers. Plain PyTorch; nothing to download.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

VOCAB = 256  # bytes


@dataclass(frozen=True)
class LMConfig:
    context: int
    d_model: int
    n_layers: int
    n_heads: int
    batch_size: int
    mlp_ratio: int = 4


# Sizes chosen on 2 cores (torch 2.13, AVX-512): "small" runs a training step in ~75 ms and a QLoRA
# step (4-bit layers) in ~105 ms, so the default demo (three optimizers x 300 steps + 150 QLoRA steps,
# plus evaluations) took 89 s on a quiet machine; "tiny" (~6 ms a step) is for tests and CI.
PRESETS = {
    "tiny": LMConfig(context=32, d_model=64, n_layers=2, n_heads=2, batch_size=8),
    "small": LMConfig(context=128, d_model=128, n_layers=4, n_heads=4, batch_size=16),
}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP, each with a residual."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, cfg.mlp_ratio * d)
        self.down = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ByteLM(nn.Module):
    """A GPT-style language model over bytes (vocabulary 256), learned position embeddings."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be a multiple of n_heads ({cfg.n_heads})")
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's init: N(0, 0.02), residual projections scaled down by depth.
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-byte cross-entropy in nats (divide by ln 2 for bits per byte)."""
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


# ---- corpus -----------------------------------------------------------------------------------------
@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    eval: torch.Tensor
    train_files: int
    eval_files: int
    root: str


def stdlib_corpus(max_train_bytes: int = 4 << 20, max_eval_bytes: int = 256 << 10,
                  eval_every_nth_file: int = 10) -> Corpus:
    """The ``.py`` files at the top of this Python's standard library, as one byte string each for
    training and evaluation.

    Deterministic: files are ordered by the CRC-32 of their name (a fixed shuffle that does not favour
    names early in the alphabet) and a file is held out for evaluation when that CRC is divisible by
    ``eval_every_nth_file``, so the split is by file and never changes between runs.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"), key=lambda p: (zlib.crc32(p.name.encode()), p.name))
    if not files:
        raise RuntimeError(f"no .py sources found in the standard library folder {root}; the demo trains on them")
    parts = {"train": [], "eval": []}
    sizes = {"train": 0, "eval": 0}
    counts = {"train": 0, "eval": 0}
    limits = {"train": max_train_bytes, "eval": max_eval_bytes}
    for path in files:
        split = "eval" if zlib.crc32(path.name.encode()) % eval_every_nth_file == 0 else "train"
        if sizes[split] >= limits[split]:
            continue
        data = path.read_bytes()[: limits[split] - sizes[split]]
        parts[split].append(data + b"\n\n")
        sizes[split] += len(data) + 2
        counts[split] += 1
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    if sizes["eval"] < 4096 or sizes["train"] < 4096:
        raise RuntimeError(f"the standard library in {root} holds too little source to train on")
    return Corpus(as_tensor(parts["train"]), as_tensor(parts["eval"]), counts["train"], counts["eval"], str(root))


def batches(data: torch.Tensor, steps: int, batch_size: int, context: int, seed: int):
    """``steps`` (input, target) pairs of random windows; the same seed gives the same batches."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context - 1, (steps, batch_size), generator=gen)
    offsets = torch.arange(context + 1)
    for row in starts:
        window = data[row[:, None] + offsets].long()
        yield window[:, :-1], window[:, 1:]


# ---- LoRA -----------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` with ``base`` frozen (a 4-bit layer in QLoRA).

    B starts at zero, so the wrapped layer starts out computing exactly ``base`` (Hu et al. 2021).
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def add_lora(model: nn.Module, layer_type: type, rank: int = 8, alpha: float = 16.0) -> list[nn.Parameter]:
    """Freeze ``model`` and wrap every ``layer_type`` module in a :class:`LoRALinear`; returns the
    adapters' parameters (the only trainable ones)."""
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [name for name, m in model.named_modules() if isinstance(m, layer_type)]
    params = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, wrapped)
        params += [wrapped.lora_a, wrapped.lora_b]
    return params
