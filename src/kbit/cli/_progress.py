"""Progress reporting for the CLI: tqdm when installed, otherwise a plain line printer on stderr.

The fallback prints at most about ten lines per loop, so logs of CI runs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

MISSING_TQDM_HINT = "(progress bars: pip install 'kbit[progress]')"


def have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class _LinePrinter:
    """The subset of tqdm's interface the CLI uses: iteration, set_postfix_str, update, close."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, unit: str):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self.next_report = 0

    def _maybe_report(self, force: bool = False) -> None:
        if self.total:
            due = self.n >= self.next_report or self.n == self.total
            if not (due or force):
                return
            self.next_report = self.n + max(1, self.total // 10)
            where = f"{self.n}/{self.total}"
        else:
            where = str(self.n)
        elapsed = time.perf_counter() - self.start
        tail = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {where} {self.unit} ({elapsed:.1f} s){tail}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_report()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        del refresh
        self.postfix = s

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable[T]] = None, *, total: Optional[int] = None, desc: str = "",
             unit: str = "it", enabled: bool = True):
    """A tqdm bar (on stderr) if tqdm is installed, else a line printer; ``enabled=False`` prints nothing."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and have_tqdm():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False,
                    mininterval=0.5)
    if not enabled:
        printer = _LinePrinter(iterable, total, desc, unit)
        printer._maybe_report = lambda force=False: None  # silent
        return printer
    return _LinePrinter(iterable, total, desc, unit)
