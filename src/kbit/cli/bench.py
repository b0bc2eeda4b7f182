"""Run kbit's benchmarks (kbit.benchmarks; the same code as `python benchmarks/bench_*.py`) and print
their tables. Every figure is a ratio to a baseline measured in the same run: torch's copy_/clone for
the quantization kernels, torch.optim.AdamW(fused=True) for the optimizers, a dense nn.Linear for
Linear4bit. bitsandbytes is measured beside kbit when it is installed.

The full run uses each benchmark's defaults (4096x4096 tensors, ~50M optimizer parameters) and takes
several minutes; --quick measures smaller sizes with fewer repeats in well under a minute (its ratios
are noisier and its targets do not apply). BENCHMARKS.md lists the commands behind the published figures.
"""

from __future__ import annotations

import argparse
import time
from typing import Optional

HELP = "run the benchmarks (quantize, optim, linear4bit, training) and print their ratio tables"

NAMES = ("quantize", "optim", "linear4bit", "training")
QUICK_SIZE = 1024
QUICK_REPEATS = 5
QUICK_OPTIM_TENSORS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", choices=NAMES, default=None,
                        help="run only this benchmark (repeatable; default: all three)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes ({QUICK_SIZE}) and {QUICK_REPEATS} repeats: a short, noisier run")
    parser.add_argument("--size", type=int, default=None,
                        help="matrix side: quantize a SIZE x SIZE tensor, optimize 12 (4 with --quick) SIZE x SIZE "
                             "tensors, scale the Linear4bit layers so 4096 becomes SIZE")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: each benchmark's)")


def validate(args: argparse.Namespace) -> Optional[str]:
    for name in ("size", "repeats"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            return f"--{name} must be a positive integer (got {value})"
    return None


def benchmark_argv(name: str, *, quick: bool, size: Optional[int], repeats: Optional[int]) -> list[str]:
    """The command-line arguments of benchmark ``name`` for these options."""
    size = size or (QUICK_SIZE if quick else None)
    repeats = repeats or (QUICK_REPEATS if quick else None)
    argv = []
    if name == "training":  # losses of a training run: no size or repeats; --quick trains the tiny model briefly
        return ["--model", "tiny", "--steps", "20"] if quick else []
    if name == "optim":
        if size is not None:
            tensors = QUICK_OPTIM_TENSORS if quick else 12
            argv += ["--params", str(tensors * size * size), "--tensors", str(tensors)]
    elif size is not None:
        argv += ["--size", str(size)]
    if repeats is not None:
        argv += ["--repeats", str(repeats)]
    return argv


def run(args: argparse.Namespace) -> int:
    import importlib

    names = [n for n in NAMES if n in (args.only or NAMES)]
    for i, name in enumerate(names):
        argv = benchmark_argv(name, quick=args.quick, size=args.size, repeats=args.repeats)
        print(("\n" if i else "") + f"## {name}  (python benchmarks/bench_{name}.py {' '.join(argv)})".rstrip() + "\n",
              flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"kbit.benchmarks.{name}").main(argv)
        print(f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0
