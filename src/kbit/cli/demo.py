"""Train a small byte-level transformer language model on Python's own standard library (nothing to
download) with torch.optim.AdamW, kbit.optim.AdamW8bit and kbit.optim.Lion8bit — same initial
weights, same batches — then fine-tune the AdamW-trained model QLoRA-style: its linear layers
quantized to NF4 (kbit.nn.replace_linear_4bit), frozen, with small LoRA adapters trained by AdamW8bit.

Prints a table (train loss, held-out loss, optimizer-state bytes, step times) and writes to --out:
  results.json   every number, the loss curves and the settings
  results.csv    the table
  loss_curves.png  (needs matplotlib: pip install 'kbit[plot]')

The default takes about 1.5 minutes on 2 cores (longer on a busy machine); `--quick` (tiny model, 20 steps) takes seconds.
Losses are next-byte cross-entropy in nats (ln 2 = 0.69 nats is one bit per byte).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ._progress import MISSING_TQDM_HINT, have_tqdm, progress

HELP = "train a byte-level transformer with AdamW vs AdamW8bit vs Lion8bit, then QLoRA; table + loss plot"

DEFAULT_STEPS = 300
QUICK_STEPS = 20
EVAL_POINTS = 6  # held-out evaluations per run (plus one before the first step)
EVAL_BATCHES = 4
LORA_RANK = 8
LORA_ALPHA = 16.0
# LoRA matrices of this small model have 512-4096 entries, under kbit's default min_8bit_size (4096)
# below which optimizers keep 32-bit state; a real model's adapters (e.g. 4096 x 16) are far above it.
# Lowered so the demo's adapters get 8-bit state as they would at scale.
QLORA_MIN_8BIT_SIZE = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per optimizer (default {DEFAULT_STEPS}; {QUICK_STEPS} with --quick)")
    parser.add_argument("--qlora-steps", type=int, default=None, help="QLoRA fine-tuning steps (default: steps / 2)")
    parser.add_argument("--model", choices=("tiny", "small"), default=None,
                        help="model size: small (4 layers, d=128, 0.9M params; default) or tiny (2 layers, d=64)")
    parser.add_argument("--quick", action="store_true",
                        help=f"the tiny model for {QUICK_STEPS} steps: a few seconds, for CI and tests")
    parser.add_argument("--out", default="kbit-demo", help="folder for results.json/.csv and loss_curves.png "
                                                           "(default ./kbit-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches (default 0)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def validate(args: argparse.Namespace) -> Optional[str]:
    for name in ("steps", "qlora_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            return f"--{name.replace('_', '-')} must be a positive integer (got {value})"
    return None


# ---- training -------------------------------------------------------------------------------------
@dataclass
class RunResult:
    name: str
    steps: int
    trainable_params: int
    train_losses: list = field(default_factory=list)
    eval_points: list = field(default_factory=list)  # (step, held-out loss)
    state_bytes: int = 0
    step_ms: float = 0.0  # median of whole steps: forward, backward, optimizer
    opt_ms: float = 0.0  # median of optimizer.step() alone
    extra: dict = field(default_factory=dict)

    @property
    def final_train_loss(self) -> float:
        """Mean of the last 10% of steps: single-batch losses are noisy."""
        tail = self.train_losses[-max(1, len(self.train_losses) // 10):]
        return sum(tail) / len(tail)

    @property
    def eval_loss(self) -> float:
        return self.eval_points[-1][1]


def state_bytes(opt) -> int:
    """Bytes held by an optimizer's state tensors, each storage counted once."""
    import torch

    seen, total = set(), 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def evaluate(model, eval_batches) -> float:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(model.loss(x, y).item() for x, y in eval_batches) / len(eval_batches)
    model.train(was_training)
    return loss


def train(name: str, model, params: list, make_opt: Callable, data, eval_batches, *, steps: int, seed: int,
          batch_size: int, context: int, show_progress: bool, step_offset: int = 0) -> RunResult:
    """Warmup (10%) then cosine decay to 10% of the peak rate; gradients clipped to norm 1."""
    import torch

    from .tiny_lm import batches

    opt = make_opt(params)
    peak = [g["lr"] for g in opt.param_groups]
    warmup = max(1, steps // 10)
    result = RunResult(name, steps, sum(p.numel() for p in params))
    result.eval_points.append((step_offset, evaluate(model, eval_batches)))
    eval_at = {round(steps * (i + 1) / EVAL_POINTS) for i in range(EVAL_POINTS)}
    step_times, opt_times = [], []
    bar = progress(total=steps, desc=f"{name:18}", unit="step", enabled=show_progress)
    try:
        for step, (x, y) in enumerate(batches(data, steps, batch_size, context, seed), start=1):
            scale = step / warmup if step <= warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) /
                                                                                     max(1, steps - warmup)))
            for g, lr in zip(opt.param_groups, peak):
                g["lr"] = lr * scale
            t0 = time.perf_counter()
            loss = model.loss(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            step_times.append(t2 - t0)
            opt_times.append(t2 - t1)
            result.train_losses.append(loss.item())
            if step in eval_at:
                result.eval_points.append((step_offset + step, evaluate(model, eval_batches)))
            bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    result.state_bytes = state_bytes(opt)
    result.step_ms = statistics.median(step_times) * 1e3
    result.opt_ms = statistics.median(opt_times) * 1e3
    return result


def optimizer_table(lr: float) -> list:
    """(name, factory) of the compared optimizers. Lion takes a smaller rate and a larger weight decay
    (Chen et al. 2023: its update has unit size per coordinate); half of AdamW's rate did best of
    lr/1, /1.5, /2, /3, /4, /6 on these short runs."""
    import torch

    import kbit

    return [
        ("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)),
        ("kbit AdamW8bit", lambda ps: kbit.optim.AdamW8bit(ps, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)),
        ("kbit Lion8bit", lambda ps: kbit.optim.Lion8bit(ps, lr=lr / 2, betas=(0.9, 0.99), weight_decay=0.04)),
    ]


def run_demo(*, model_size: str = "small", steps: int = DEFAULT_STEPS, qlora_steps: Optional[int] = None,
             seed: int = 0, show_progress: bool = True, lr: float = 2e-3, optimizers: Optional[list] = None,
             qlora: bool = True) -> dict:
    """Run the comparison and return its results (what results.json holds, with RunResult objects)."""
    import torch

    import kbit

    from .tiny_lm import PRESETS, ByteLM, add_lora, batches, stdlib_corpus

    cfg = PRESETS[model_size]
    corpus = stdlib_corpus()
    eval_batches = list(batches(corpus.eval, EVAL_BATCHES, cfg.batch_size, cfg.context, seed=seed + 1))
    torch.manual_seed(seed)
    initial = ByteLM(cfg)
    runs, trained = [], {}
    for name, make in optimizers or optimizer_table(lr):
        model = copy.deepcopy(initial).train()
        runs.append(train(name, model, list(model.parameters()), make, corpus.train, eval_batches, steps=steps,
                          seed=seed, batch_size=cfg.batch_size, context=cfg.context, show_progress=show_progress))
        trained[name] = model

    if qlora:
        qlora_steps = qlora_steps or max(1, steps // 2)
        base_name = runs[0].name
        model = copy.deepcopy(trained[base_name])
        float_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                          if type(m) is torch.nn.Linear and m is not model.lm_head)
        kbit.nn.replace_linear_4bit(model, quant_type="nf4", skip=("lm_head",))
        nf4_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
                        if isinstance(m, kbit.nn.Linear4bit))
        nf4_eval = evaluate(model, eval_batches)
        torch.manual_seed(seed)
        adapters = add_lora(model, kbit.nn.Linear4bit, rank=LORA_RANK, alpha=LORA_ALPHA)
        make = lambda ps: kbit.optim.AdamW8bit(ps, lr=lr, betas=(0.9, 0.95),  # noqa: E731
                                               min_8bit_size=QLORA_MIN_8BIT_SIZE)
        # New batches (another seed): fine-tuning continues on data the base model has not seen.
        result = train("QLoRA NF4+AdamW8bit", model, adapters, make, corpus.train, eval_batches, steps=qlora_steps,
                       seed=seed + 2, batch_size=cfg.batch_size, context=cfg.context, show_progress=show_progress,
                       step_offset=steps)
        result.extra = {"base": base_name, "base_eval_loss_float": runs[0].eval_loss, "base_eval_loss_nf4": nf4_eval,
                        "linear_weight_bytes_float": float_bytes, "linear_weight_bytes_nf4": nf4_bytes,
                        "lora_rank": LORA_RANK}
        runs.append(result)

    return {
        "settings": {"model": model_size, **asdict(cfg), "steps": steps, "qlora_steps": qlora_steps if qlora else 0,
                     "seed": seed, "lr": lr, "params": sum(p.numel() for p in initial.parameters()),
                     "threads": torch.get_num_threads(), "cpu_level": kbit.get_cpu_capability(),
                     "kbit": kbit.__version__, "torch": torch.__version__},
        "corpus": {"root": corpus.root, "train_bytes": corpus.train.numel(), "eval_bytes": corpus.eval.numel(),
                   "train_files": corpus.train_files, "eval_files": corpus.eval_files},
        "runs": runs,
    }


# ---- reporting --------------------------------------------------------------------------------------
COLUMNS = ["run", "trainable params", "train loss", "eval loss", "opt. state bytes", "state B/param", "step ms",
           "opt.step ms"]


def table_rows(runs: list) -> list:
    return [[r.name, f"{r.trainable_params:,}", f"{r.final_train_loss:.3f}", f"{r.eval_loss:.3f}",
             f"{r.state_bytes:,}", f"{r.state_bytes / r.trainable_params:.2f}", f"{r.step_ms:.1f}", f"{r.opt_ms:.2f}"]
            for r in runs]


def format_table(headers: list, rows: list) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def write_results(results: dict, out: Path) -> list:
    """results.json and results.csv, and loss_curves.png when matplotlib is installed; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    runs = results["runs"]
    doc = dict(results, runs=[dict(asdict(r), final_train_loss=r.final_train_loss, eval_loss=r.eval_loss)
                              for r in runs])
    paths = [out / "results.json", out / "results.csv"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "trainable_params", "final_train_loss", "eval_loss", "state_bytes", "step_ms",
                         "opt_step_ms"])
        for r in runs:
            writer.writerow([r.name, r.trainable_params, f"{r.final_train_loss:.5f}", f"{r.eval_loss:.5f}",
                             r.state_bytes, f"{r.step_ms:.3f}", f"{r.opt_ms:.4f}"])
    png = plot(results, out / "loss_curves.png")
    if png is not None:
        paths.append(png)
    return paths


def plot(results: dict, path: Path) -> Optional[Path]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("no plot: matplotlib is not installed (pip install 'kbit[plot]')", file=sys.stderr)
        return None
    # The object API (Figure + Agg canvas) touches no global pyplot state or backend setting.
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_train, ax_eval = fig.subplots(1, 2)
    for r in results["runs"]:
        offset = r.eval_points[0][0]
        losses = r.train_losses
        span = max(1, len(losses) // 25)  # running mean: single-batch losses are noisy
        smooth = [sum(losses[max(0, i - span + 1):i + 1]) / (i + 1 - max(0, i - span + 1)) for i in range(len(losses))]
        line, = ax_train.plot(range(offset + 1, offset + len(losses) + 1), smooth, label=r.name)
        ax_eval.plot(*zip(*r.eval_points), marker="o", color=line.get_color(), label=r.name)
    s = results["settings"]
    # The first evaluation (ln 256 = 5.5 nats) would squash the differences: zoom onto the rest.
    later = [loss for r in results["runs"] for step, loss in r.eval_points[1:]]
    if later:
        ax_eval.set_ylim(min(later) - 0.05, min(later) + max(0.3, min(1.0, max(later) - min(later)) + 0.05))
    ax_train.set_title(f"train loss (running mean of {max(1, s['steps'] // 25)} steps)")
    ax_eval.set_title("held-out loss (stdlib files never trained on; zoomed)")
    for ax in (ax_train, ax_eval):
        ax.set_xlabel("step")
        ax.set_ylabel("next-byte cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"kbit demo: byte-level transformer ({s['params']:,} params, {s['n_layers']} layers, "
                 f"d={s['d_model']}) on Python's standard library")
    fig.savefig(path, dpi=110)
    return path


def run(args: argparse.Namespace) -> int:
    import torch

    import kbit

    model_size = args.model or ("tiny" if args.quick else "small")
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.progress and not have_tqdm():
        print(f"progress as plain lines {MISSING_TQDM_HINT}", file=sys.stderr)
    print(f"kbit demo: CPU level {kbit.get_cpu_capability()}, {torch.get_num_threads()} threads; model '{model_size}', "
          f"{steps} steps per optimizer")
    t0 = time.perf_counter()
    results = run_demo(model_size=model_size, steps=steps, qlora_steps=args.qlora_steps, seed=args.seed,
                       show_progress=args.progress)
    elapsed = time.perf_counter() - t0
    s, c = results["settings"], results["corpus"]
    print(f"model: {s['params']:,} parameters ({s['n_layers']} layers, d={s['d_model']}, context {s['context']} "
          f"bytes, batch {s['batch_size']}); corpus: {c['train_files']} stdlib files "
          f"({c['train_bytes'] / 2**20:.1f} MiB) to train, {c['eval_files']} held out\n")
    runs = results["runs"]
    print(format_table(COLUMNS, table_rows(runs)))
    base, adam8 = runs[0], runs[1]
    print(f"\nAdamW8bit keeps {adam8.state_bytes / base.state_bytes:.0%} of torch AdamW's optimizer state; its held-out "
          f"loss is {adam8.eval_loss - base.eval_loss:+.3f} nats from AdamW's.")
    qlora = next((r for r in runs if "base_eval_loss_nf4" in r.extra), None)
    if qlora is not None:
        e = qlora.extra
        print(f"QLoRA: the AdamW-trained model's linear weights in NF4 take {e['linear_weight_bytes_nf4'] / 2**10:.0f} "
              f"KiB instead of {e['linear_weight_bytes_float'] / 2**10:.0f} KiB; held-out loss {e['base_eval_loss_float']:.3f}"
              f" (float) -> {e['base_eval_loss_nf4']:.3f} (NF4) -> {qlora.eval_loss:.3f} after {qlora.steps} steps of "
              f"rank-{e['lora_rank']} adapters ({qlora.trainable_params:,} trainable parameters).")
    paths = write_results(results, Path(args.out))
    print(f"\nwrote {', '.join(str(p) for p in paths)}  ({elapsed:.0f} s)")
    return 0
