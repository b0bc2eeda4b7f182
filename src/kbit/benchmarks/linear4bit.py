"""Linear4bit (NF4, blocksize 64, double quantization) forward vs a dense nn.Linear of the same dtype, in
eval mode under inference_mode, measured in the same run. Speedup = dense time / 4-bit time (higher is
better). Also the output error of the 4-bit layer relative to the float layer.

    python benchmarks/bench_linear4bit.py [--repeats 30] [--size 4096]
"""

from __future__ import annotations

import argparse

import torch

import kbit

from .timing import format_table, median_seconds

# (in_features, out_features, dtype, batch, target speedup)
CASES = [
    (4096, 4096, torch.bfloat16, 1, 2.5),
    (4096, 4096, torch.float32, 1, 4.0),
    (4096, 4096, torch.bfloat16, 128, 0.77),
    (4104, 4000, torch.bfloat16, 1, 2.0),
    (4096, 4096, torch.bfloat16, 4, None),
    (4096, 4096, torch.bfloat16, 16, None),
    (4096, 4096, torch.float32, 128, None),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_linear4bit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case; the median is reported")
    parser.add_argument("--size", type=int, default=4096,
                        help="scale every layer so that 4096 becomes SIZE (default 4096: the cases as listed)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001 - any import failure means "not measured"
        bnb = None
    rows = []
    for k, n, dtype, batch, target in CASES:
        if args.size != 4096:  # other sizes: same shapes scaled (odd ones stay odd); targets hold at 4096 only
            k, n, target = max(1, round(k * args.size / 4096)), max(1, round(n * args.size / 4096)), None
        dense = torch.nn.Linear(k, n, dtype=dtype).eval()
        q = kbit.nn.Linear4bit(k, n, quant_type="nf4", compress_statistics=True, compute_dtype=dtype)
        q.load_state_dict(dense.state_dict())
        q = q.to("cpu").eval()
        x = torch.randn(batch, k, dtype=dtype)
        with torch.inference_mode():
            t_dense = median_seconds(lambda: dense(x), repeats=args.repeats)
            t_q = median_seconds(lambda: q(x), repeats=args.repeats)
            ref = dense(x).float()
            err = ((q(x).float() - ref).norm() / ref.norm()).item()
            bnb_cell = "not installed"
            if bnb is not None:
                try:
                    b = bnb.nn.Linear4bit(k, n, quant_type="nf4", compute_dtype=dtype)
                    b.load_state_dict(dense.state_dict())
                    b = b.to("cpu").eval()
                    t_b = median_seconds(lambda: b(x), repeats=max(3, args.repeats // 3))
                    bnb_cell = f"{t_dense / t_b:.2f}x"
                except Exception as exc:  # noqa: BLE001 - report bitsandbytes' failure instead of dying
                    bnb_cell = f"fails ({type(exc).__name__})"
        rows.append([f"{k}->{n}", str(dtype).replace("torch.", ""), str(batch), f"{t_dense * 1e3:.3f}",
                     f"{t_q * 1e3:.3f}", f"{t_dense / t_q:.2f}x", f">= {target}x" if target else "-", bnb_cell,
                     f"{err:.4f}"])
    print(f"kbit {kbit.__version__}, torch {torch.__version__}, CPU level {kbit.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; NF4, blocksize 64, double quantization")
    print(format_table(["layer", "dtype", "batch", "dense ms", "NF4 ms", "speedup", "target", "bitsandbytes speedup",
                        "rel. output error"], rows))


if __name__ == "__main__":
    main()
