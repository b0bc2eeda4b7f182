"""Optimizer step time on N fp32 tensors, as a ratio to torch.optim.AdamW(fused=True) in the same run
(speedup: higher is better), plus the state bytes per parameter and the transient memory of a step.
Each case's steps alternate with the baseline's, so both see the same machine (it is shared and noisy).

    python benchmarks/bench_optim.py                     # 12 tensors of 2048x2048 (~50M params)
    python benchmarks/bench_optim.py --params 1e6 4e8    # the same table at other sizes
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics

import torch

import kbit

from .timing import format_table, paired_median_seconds


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS counter of this process to the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def make_params(total: float, count: int) -> list[torch.nn.Parameter]:
    side = max(1, int(math.sqrt(total / count)))
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        p = torch.nn.Parameter(torch.randn(side, side, generator=gen) * 0.02)
        p.grad = torch.randn(side, side, generator=gen) * 1e-3
        params.append(p)
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        seen = set()
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


CASES = [
    ("torch AdamW (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), None),
    ("kbit AdamW 32-bit", lambda ps: kbit.optim.AdamW(ps, lr=1e-3), 1.0),
    ("kbit AdamW8bit", lambda ps: kbit.optim.AdamW8bit(ps, lr=1e-3), 1.0),
    ("kbit AdamW4bit", lambda ps: kbit.optim.AdamW4bit(ps, lr=1e-3), 1.0),
    ("kbit Lion8bit", lambda ps: kbit.optim.Lion8bit(ps, lr=1e-4), 1.3),
    ("kbit Lion4bit", lambda ps: kbit.optim.Lion4bit(ps, lr=1e-4), None),
    ("kbit Lion 32-bit", lambda ps: kbit.optim.Lion(ps, lr=1e-4), None),
    ("kbit SGD8bit (momentum)", lambda ps: kbit.optim.SGD8bit(ps, lr=1e-3, momentum=0.9), None),
]

# bitsandbytes' own CPU optimizers, measured beside kbit's where it is installed. They are one to two
# orders of magnitude slower, so they get at most BNB_REPEATS timed steps.
BNB_REPEATS = 3


def bitsandbytes_cases() -> list:
    """The bitsandbytes rows, or [] when bitsandbytes is not installed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [
        ("bitsandbytes AdamW 32-bit", lambda ps: bnb.optim.AdamW(ps, lr=1e-3), None),
        ("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3), None),
        ("bitsandbytes Lion8bit", lambda ps: bnb.optim.Lion8bit(ps, lr=1e-4), None),
    ]


def bench(total: float, count: int, repeats: int, with_bitsandbytes: bool = True) -> list[list[str]]:
    """One row per case. Each case is timed alternately with the torch baseline (paired_median_seconds),
    and its speedup is the ratio of that pair's medians; the baseline's row gives the median over all pairs."""
    params = make_params(total, count)
    n = sum(p.numel() for p in params)
    label = f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    (base_name, make_base, _), cases = CASES[0], CASES[1:]
    baseline = make_base(params)
    baseline.step()
    base_row = [label, base_name, "", "1.00x", "-", f"{state_bytes(baseline) / n:.2f}", ""]
    base_times = []
    rows = [base_row]
    timed = [(name, make, target, repeats) for name, make, target in cases]
    if with_bitsandbytes:
        timed += [(name, make, target, min(repeats, BNB_REPEATS)) for name, make, target in bitsandbytes_cases()]
    for name, make, target, case_repeats in timed:
        opt = make(params)
        opt.step()  # creates the state
        peak_rss_reset()
        before = rss_kib("VmRSS")
        opt.step()
        transient = (rss_kib("VmHWM") - before) * 1024 / n
        base_seconds, seconds = paired_median_seconds(baseline.step, opt.step, repeats=case_repeats)
        base_times.append(base_seconds)
        rows.append([
            label, name, f"{seconds * 1e3:.1f}", f"{base_seconds / seconds:.2f}x",
            f">= {target}x" if target else "-", f"{state_bytes(opt) / n:.2f}", f"{max(transient, 0.0):.3f}",
        ])
        del opt
        gc.collect()
    # The baseline's own transient memory, measured like the others' once they are gone.
    peak_rss_reset()
    before = rss_kib("VmRSS")
    baseline.step()
    base_row[2] = f"{statistics.median(base_times) * 1e3:.1f}"
    base_row[6] = f"{max((rss_kib('VmHWM') - before) * 1024 / n, 0.0):.3f}"
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_optim.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, nargs="*", default=[12 * 2048 * 2048],
                        help="total parameter counts to measure (default: 12 x 2048 x 2048)")
    parser.add_argument("--tensors", type=int, default=12, help="number of equal square tensors (default 12)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed steps per case, each beside a step of the baseline; medians are reported")
    parser.add_argument("--no-bitsandbytes", action="store_true",
                        help="leave out bitsandbytes' optimizers (measured by default when it is installed)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    rows = []
    for total in args.params:
        rows += bench(total, args.tensors, args.repeats, with_bitsandbytes=not args.no_bitsandbytes)
    print(f"kbit {kbit.__version__}, torch {torch.__version__}, CPU level {kbit.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; speedup = torch fused AdamW step time / this step time")
    print(format_table(["params", "optimizer", "step ms", "speedup vs torch AdamW", "target", "state B/param",
                        "transient B/param"], rows))


if __name__ == "__main__":
    main()
