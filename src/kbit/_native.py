"""Loading the native module and controlling its CPU kernel level.

torch must be imported before ``kbit._C``: both use GCC's OpenMP runtime, and importing torch first
makes the native module bind to the copy torch already loaded instead of a second one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch  # noqa: F401  (import order matters, see module docstring)

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "kbit's native module (kbit._C) could not be loaded. Reinstall kbit from a clean clone with "
        "`pip install .` so that its C++ kernels are built for this machine."
    ) from exc

# Validate KBIT_CPU_CAPABILITY now, so a wrong value fails at import with the valid choices, not at the
# first kernel call.
_C.capability()

__all__ = ["get_cpu_capability", "supported_cpu_capabilities", "set_cpu_capability", "cpu_capability", "num_threads"]


def get_cpu_capability() -> str:
    """The CPU kernel level in use: ``"scalar"``, ``"avx2"``, ``"avx512"`` or ``"avx512vbmi"``.

    It is the best level this CPU and OS support (``"avx512vbmi"`` only on AMD CPUs), unless the environment variable
    ``KBIT_CPU_CAPABILITY`` (read once, at first use) or :func:`set_cpu_capability` chose a lower one.
    """
    return _C.capability()


def supported_cpu_capabilities() -> list[str]:
    """Kernel levels this CPU and OS can run, lowest first (``"scalar"`` is always there)."""
    return list(_C.supported_capabilities())


def set_cpu_capability(level: str) -> None:
    """Use kernel level ``level`` for every later call (process-wide).

    Raises ValueError if the level is unknown or not supported here. All levels compute bit-identical
    results; this exists for testing and for comparing speed.
    """
    if not isinstance(level, str):
        raise TypeError(f"level must be a string such as 'avx2', got {type(level).__name__}")
    _C.set_capability(level)


@contextlib.contextmanager
def cpu_capability(level: str) -> Iterator[None]:
    """Context manager form of :func:`set_cpu_capability`; restores the previous level on exit."""
    previous = get_cpu_capability()
    set_cpu_capability(level)
    try:
        yield
    finally:
        set_cpu_capability(previous)


def num_threads() -> int:
    """Threads the native kernels may use: torch's intra-op thread count (``torch.set_num_threads``)."""
    return torch.get_num_threads()
