"""``python benchmarks/bench_optim.py --help``: a wrapper around :mod:`kbit.benchmarks.optim`, which holds the
benchmark so that ``python -m kbit bench`` runs it from an installed package too."""

from kbit.benchmarks.optim import main

if __name__ == "__main__":
    main()
