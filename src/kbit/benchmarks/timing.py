"""Timing helpers shared by the benchmarks: medians of repeated runs (the machine is shared and noisy)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_seconds(fn: Callable[[], object], *, repeats: int = 15, warmup: int = 3, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def paired_median_seconds(baseline: Callable[[], object], fn: Callable[[], object], *, repeats: int = 15,
                          warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``baseline()`` and ``fn()``, run alternately ``repeats`` times each after
    ``warmup`` runs of both. On a shared machine whose speed drifts over seconds, the ratio of the two
    medians is then measured under the same conditions, which timing one after the other is not."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        baseline()
        fn()
    base, samples = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        baseline()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        base.append(t1 - t0)
        samples.append(t2 - t1)
    return statistics.median(base), statistics.median(samples)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
