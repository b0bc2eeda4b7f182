"""Quantization kernels on a 4096x4096 fp32 tensor, as a ratio to a plain ``copy_`` of the same tensor
into a preallocated tensor, measured in the same run (lower is better). bitsandbytes is measured
beside kbit when installed.

Dequantizing returns a new 64 MiB tensor. glibc serves allocations that large with a fresh mmap, and
first-touch page faults then cost more than the kernel itself (torch's own ``clone()`` pays the same).
So the dequantize rows are given twice: writing into a preallocated ``out=`` (like ``copy_``), and
allocating (next to ``clone()``, the allocating copy).

    python benchmarks/bench_quantize.py [--size 4096] [--repeats 15]
"""

from __future__ import annotations

import argparse

import torch

import kbit

import kbit.functional as F

from .timing import format_table, median_seconds


def cases(lib):
    """(name, setup -> callable) for one library exposing the bitsandbytes functional API."""

    def q4(x):
        return lambda: lib.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dq4(x):
        packed, state = lib.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        return lambda: lib.dequantize_4bit(packed, state)

    def q8(x):
        return lambda: lib.quantize_blockwise(x, blocksize=4096)

    def dq8(x):
        codes, state = lib.quantize_blockwise(x, blocksize=4096)
        return lambda: lib.dequantize_blockwise(codes, state)

    def dq4_out(x):
        packed, state = lib.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
        out = torch.empty_like(x)
        return lambda: lib.dequantize_4bit(packed, state, out=out)

    def dq8_out(x):
        codes, state = lib.quantize_blockwise(x, blocksize=4096)
        out = torch.empty_like(x)
        return lambda: lib.dequantize_blockwise(codes, state, out=out)

    # (name, case, target ratio or None, baseline: "copy" or "clone")
    return [
        ("quantize_4bit (NF4, bs 64, double quant)", q4, 2.5, "copy"),
        ("dequantize_4bit (NF4, bs 64, double quant), out=", dq4_out, 1.5, "copy"),
        ("quantize_blockwise (bs 4096)", q8, 2.5, "copy"),
        ("dequantize_blockwise (bs 4096), out=", dq8_out, 1.5, "copy"),
        ("dequantize_4bit (NF4, bs 64, double quant), allocating", dq4, None, "clone"),
        ("dequantize_blockwise (bs 4096), allocating", dq8, None, "clone"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_quantize.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the tensor is size x size fp32 (default 4096)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per case; the median is reported")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    dst = torch.empty_like(x)
    baselines = {
        "copy": median_seconds(lambda: dst.copy_(x), repeats=args.repeats),
        "clone": median_seconds(lambda: x.clone(), repeats=args.repeats),
    }

    try:
        import bitsandbytes.functional as bnbF  # noqa: N812
    except Exception:  # noqa: BLE001 - any import failure just means "not measured"
        bnbF = None

    rows = []
    for (name, make, target, base), bnb_case in zip(cases(F), cases(bnbF) if bnbF else [None] * 6):
        ours = median_seconds(make(x), repeats=args.repeats)
        theirs = None
        if bnb_case is not None:
            try:
                theirs = median_seconds(bnb_case[1](x), repeats=max(3, args.repeats // 3))
            except NotImplementedError:  # bitsandbytes 0.50 has no CPU kernel for out=
                theirs = float("nan")
        base_s = baselines[base]
        rows.append([
            name,
            f"{ours * 1e3:.2f}",
            f"{ours / base_s:.2f}x {base}",
            f"<= {target}x" if target else "-",
            "not installed" if theirs is None else ("unsupported" if theirs != theirs else f"{theirs / base_s:.1f}x"),
        ])
    print(f"kbit {kbit.__version__}, torch {torch.__version__}, CPU level {kbit.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; {args.size}x{args.size} fp32; copy_ median "
          f"{baselines['copy'] * 1e3:.2f} ms, clone() median {baselines['clone'] * 1e3:.2f} ms")
    print(format_table(["kernel", "kbit ms", "kbit / baseline", "target", "bitsandbytes / baseline"], rows))


if __name__ == "__main__":
    main()
