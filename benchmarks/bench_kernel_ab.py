"""A/B timing of kbit builds' fused optimizer kernels: ``python benchmarks/bench_kernel_ab.py DIR [DIR ...]``.

Each DIR holds a ``kbit`` package (for example a copy of ``src/kbit`` with one build's ``_C*.so``). Every
round starts one process per DIR, in turn, that calls the native 8-bit ``adam_step_`` or ``lion_step_`` op
directly (no Python optimizer around it) on one tensor, single-threaded, and reports the step's thread CPU
time per parameter: CPU time, not wall time, because this VM's host steals time in bursts, and the minimum
over repeats for the same reason. The table gives each build's minimum and median over rounds and its
ratio to the first DIR, the baseline measured in the same run.

This is how the kernel changes in BENCHMARKS.md (sessions 7-8) were measured; differences under ~5% are
noise on the shared VM (two copies of one build have differed by 15%: use several rounds). With no DIR it times the kbit that ``import kbit`` finds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

_CHILD = r"""
import sys, time, torch, kbit, kbit.functional as F
op, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
qs, qu = F.create_dynamic_map(signed=True), F.create_dynamic_map(signed=False)
blocks = (n + 255) // 256
p, g = torch.randn(n) * 0.02, torch.randn(n) * 1e-3
s1, s2 = torch.full((n,), 128, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
a1, a2 = torch.full((blocks,), 1e-3), torch.full((blocks,), 1e-6)
if op == "adam":
    step = lambda k: torch.ops.kbit.adam_step_([p], [g], [s1], [s2], [a1], [a2], [qs, qu], 256, [1e-3], [k], [1.0],
                                               [], 0.9, 0.999, 1e-8, 1e-2, 0.0, False, True)
else:
    step = lambda k: torch.ops.kbit.lion_step_([p], [g], [s1], [a1], [qs], 256, [1e-4], [k], [1.0], 0.9, 0.99, 1e-2,
                                               False)
for k in range(1, 6):
    step(k)
steps = max(1, (1 << 23) // n)
best = float("inf")
for r in range(repeats):
    t0 = time.thread_time_ns()
    for k in range(steps):
        step(6 + k)
    best = min(best, (time.thread_time_ns() - t0) / steps / n)
print(best)
"""


def time_build(directory: str | None, op: str, params: int, repeats: int) -> float:
    env = dict(os.environ)
    if directory is not None:
        env["PYTHONPATH"] = os.path.abspath(directory)
    out = subprocess.run([sys.executable, "-c", _CHILD, op, str(params), str(repeats)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{directory or 'installed kbit'}: the timing process failed:\n{out.stderr.strip()}")
    return float(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="*", help="directories that each hold a kbit package (first: baseline)")
    parser.add_argument("--optimizer", choices=["adam", "lion"], default="adam", help="8-bit op to time")
    parser.add_argument("--params", type=float, default=2**20, help="parameters in the tensor (default 2^20)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the builds (default 5)")
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per process; the minimum counts")
    args = parser.parse_args(argv)
    params = int(args.params)
    if params < 256 or args.rounds < 1 or args.repeats < 1:
        parser.error("--params must be at least 256, --rounds and --repeats at least 1")
    builds = args.dirs or [None]
    for d in args.dirs:
        if not os.path.isdir(os.path.join(d, "kbit")):
            parser.error(f"{d} holds no kbit package (expected {os.path.join(d, 'kbit')})")
    samples: dict[str | None, list[float]] = {b: [] for b in builds}
    for _ in range(args.rounds):
        for b in builds:
            samples[b].append(time_build(b, args.optimizer, params, args.repeats))
    base = statistics.median(samples[builds[0]])
    print(f"{args.optimizer}_step_ 8-bit, {params} params, 1 thread, thread CPU time, {args.rounds} rounds")
    print("| build | min ns/param | median ns/param | median vs first |")
    print("|---|---|---|---|")
    for b in builds:
        med = statistics.median(samples[b])
        print(f"| {b or 'installed'} | {min(samples[b]):.3f} | {med:.3f} | {med / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
