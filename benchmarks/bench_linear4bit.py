"""``python benchmarks/bench_linear4bit.py --help``: a wrapper around :mod:`kbit.benchmarks.linear4bit`, which holds the
benchmark so that ``python -m kbit bench`` runs it from an installed package too."""

from kbit.benchmarks.linear4bit import main

if __name__ == "__main__":
    main()
