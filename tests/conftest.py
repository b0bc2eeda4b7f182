"""Shared fixtures: every supported CPU kernel level, a seeded generator, and bitwise tensor comparison."""

from __future__ import annotations

import pytest
import torch

import kbit

#: Kernel levels this machine runs, lowest first ("scalar" is always there).
CPU_LEVELS = kbit.supported_cpu_capabilities()

#: Seed of the `rng` fixture; every test draws the same numbers on every run.
SEED = 20240917

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(params=CPU_LEVELS)
def cpu_level(request):
    """Run the test at one native kernel level (scalar, avx2, avx512: whichever this CPU has)."""
    with kbit.cpu_capability(request.param):
        assert kbit.get_cpu_capability() == request.param
        yield request.param


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


# Non-contiguous views (made in the target dtype, since .to() would copy): name -> fn(generator, dtype).
NON_CONTIGUOUS = {
    "transposed": lambda g, dt: torch.randn(33, 65, generator=g).to(dt).t(),
    "column_slice": lambda g, dt: torch.randn(40, 50, generator=g).to(dt)[:, ::2],
    "step_slice": lambda g, dt: torch.randn(3000, generator=g).to(dt)[1::3],
    "permuted_3d": lambda g, dt: torch.randn(4, 5, 6, generator=g).to(dt).permute(2, 0, 1),
    "expanded": lambda g, dt: torch.randn(1, 77, generator=g).to(dt).expand(9, 77),
}


def randn(shape, dtype=torch.float32, generator=None, scale=1.0) -> torch.Tensor:
    """N(0, scale^2) samples drawn in float32, then rounded to ``dtype``."""
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` as a same-sized integer tensor (contiguous)."""
    t = t.contiguous()
    return t.view(_INT_VIEW[t.element_size()]) if t.is_floating_point() else t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Same shape, dtype and bits; a NaN equals any NaN (payloads may differ), +0.0 differs from -0.0."""
    assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = bits(actual), bits(expected)
    same = a == e
    if actual.is_floating_point():
        same |= torch.isnan(actual.contiguous()) & torch.isnan(expected.contiguous())
    if not bool(same.all()):
        bad = (~same).nonzero()
        first = tuple(bad[0].tolist())
        raise AssertionError(
            f"{what}: {bad.shape[0]} of {actual.numel()} elements differ; first at {first}: "
            f"{actual[first].item()!r} vs {expected[first].item()!r}"
        )
