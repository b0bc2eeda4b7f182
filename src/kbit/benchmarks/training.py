"""Training quality of kbit's beyond-bitsandbytes optimizer features on real data: the byte-level transformer
of ``python -m kbit demo`` trained on Python's standard library sources (kbit.cli.tiny_lm).

1. 4-bit states: torch.optim.AdamW vs kbit AdamW8bit vs kbit AdamW4bit, same initial weights and batches;
   held-out loss and optimizer-state bytes per parameter (target: AdamW4bit within 3% of AdamW).
2. bf16 stochastic rounding: the same model with bfloat16 weights, trained by kbit AdamW at a small learning
   rate with round-to-nearest and with ``bf16_stochastic_round=True``, against float32 weights; at such rates
   most updates are below half a bf16 ulp, so round-to-nearest stalls.

    python benchmarks/bench_training.py                 # "small" model, 300 steps (several minutes on 2 cores)
    python benchmarks/bench_training.py --steps 40 --model tiny   # seconds
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import kbit
from kbit.cli.demo import EVAL_BATCHES, evaluate, train
from kbit.cli.tiny_lm import PRESETS, ByteLM, batches, stdlib_corpus

from .timing import format_table

#: Learning rate of the bf16 comparison: a tenth of the demo's, where bf16 round-to-nearest loses most updates.
BF16_LR = 2e-4


def _run(name, model, make, corpus, eval_batches, cfg, steps, seed):
    return train(name, model, list(model.parameters()), make, corpus.train, eval_batches, steps=steps, seed=seed,
                 batch_size=cfg.batch_size, context=cfg.context, show_progress=sys.stderr.isatty())


def four_bit_states(cfg, corpus, eval_batches, steps, seed, lr):
    torch.manual_seed(seed)
    initial = ByteLM(cfg)
    table = [
        ("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)),
        ("kbit AdamW8bit", lambda ps: kbit.optim.AdamW8bit(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)),
        ("kbit AdamW4bit", lambda ps: kbit.optim.AdamW4bit(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)),
    ]
    runs = [_run(name, copy.deepcopy(initial).train(), make, corpus, eval_batches, cfg, steps, seed)
            for name, make in table]
    base = runs[0].eval_loss
    return [[r.name, f"{r.eval_loss:.4f}", f"{(r.eval_loss / base - 1) * 100:+.1f}%",
             f"{r.state_bytes / r.trainable_params:.2f}", f"{r.opt_ms:.1f}"] for r in runs]


def stochastic_rounding(cfg, corpus, eval_batches, steps, seed, lr):
    torch.manual_seed(seed)
    initial = ByteLM(cfg)
    rows = []
    for name, dtype, sr in [("fp32 weights", torch.float32, False), ("bf16 weights, round to nearest",
                                                                      torch.bfloat16, False),
                            ("bf16 weights, stochastic rounding", torch.bfloat16, True)]:
        model = copy.deepcopy(initial).to(dtype).train()
        make = lambda ps, sr=sr: kbit.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01,  # noqa: E731
                                                   bf16_stochastic_round=sr)
        r = _run(name, model, make, corpus, eval_batches, cfg, steps, seed)
        rows.append([name, f"{evaluate(model, eval_batches):.4f}", f"{r.eval_points[0][1]:.4f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_training.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak rate of the 4-bit comparison (default 2e-3)")
    args = parser.parse_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")
    cfg = PRESETS[args.model]
    corpus = stdlib_corpus()
    eval_batches = list(batches(corpus.eval, EVAL_BATCHES, cfg.batch_size, cfg.context, seed=args.seed + 1))
    print(f"kbit {kbit.__version__}, torch {torch.__version__}, CPU level {kbit.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; byte-level LM '{args.model}' on the stdlib, {args.steps} steps, "
          f"seed {args.seed}")
    print("\n4-bit optimizer states (held-out loss in nats/byte; target: AdamW4bit within 3% of torch AdamW)")
    print(format_table(["optimizer", "eval loss", "vs AdamW", "state B/param", "opt.step ms"],
                       four_bit_states(cfg, corpus, eval_batches, args.steps, args.seed, args.lr)))
    print(f"\nbf16 stochastic rounding (kbit AdamW, peak lr {BF16_LR})")
    print(format_table(["weights", "eval loss", "initial eval loss"],
                       stochastic_rounding(cfg, corpus, eval_batches, args.steps, args.seed, BF16_LR)))
