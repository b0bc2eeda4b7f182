"""``python benchmarks/bench_training.py --help``: a wrapper around :mod:`kbit.benchmarks.training`."""

from kbit.benchmarks.training import main

if __name__ == "__main__":
    main()
