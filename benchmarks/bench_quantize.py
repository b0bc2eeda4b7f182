"""``python benchmarks/bench_quantize.py --help``: a wrapper around :mod:`kbit.benchmarks.quantize`, which holds the
benchmark so that ``python -m kbit bench`` runs it from an installed package too."""

from kbit.benchmarks.quantize import main

if __name__ == "__main__":
    main()
