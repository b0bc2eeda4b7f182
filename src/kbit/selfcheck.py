"""A quick self-check: every native op against the pure-PyTorch reference, at every CPU level.

Used by ``python -m kbit doctor``; cheap enough (well under a second) to run on every install.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _native
from .backends import cpu, reference
from .formats import create_dynamic_map, create_linear_map


@dataclass
class CheckResult:
    level: str
    op: str
    case: str
    ok: bool
    detail: str = ""


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and bits (NaN equal to NaN of any payload)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        if not torch.equal(nan_a, nan_b):
            return False
        a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
        int_type = {2: torch.int16, 4: torch.int32}[a.element_size()]
        return torch.equal(a.view(int_type), b.view(int_type))
    return torch.equal(a, b)


def _inputs(generator: torch.Generator):
    base = torch.randn(4099, generator=generator) * 3
    base[7] = 0.0
    base[100:164] = 0.0  # an all-zero block at blocksize 64
    base[300] = float("inf")
    base[1000] = float("nan")
    yield "randn 4099 + specials", base
    yield "1000x33 non-contiguous", torch.randn(33, 1000, generator=generator).t()
    yield "odd 7", torch.randn(7, generator=generator)
    yield "empty", torch.empty(0)


def run_selfcheck() -> list[CheckResult]:
    """Compare the CPU kernels with the reference at every supported level; returns one result per case."""
    gen = torch.Generator().manual_seed(1234)
    cases = list(_inputs(gen))
    codes = {"dynamic": create_dynamic_map(), "linear": create_linear_map()}
    results: list[CheckResult] = []
    for level in _native.supported_cpu_capabilities():
        with _native.cpu_capability(level):
            for case, x in cases:
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    xd = x.to(dtype)
                    label = f"{case}, {str(dtype).replace('torch.', '')}"
                    for code_name, code in codes.items():
                        for bs in (64, 4096):
                            got = cpu.quantize_blockwise(xd, code, bs)
                            want = reference.quantize_blockwise(xd, code, bs)
                            ok = all(_same_bits(g, w) for g, w in zip(got, want))
                            deq_ok = _same_bits(cpu.dequantize_blockwise(want[0], want[1], code, bs, dtype),
                                                reference.dequantize_blockwise(want[0], want[1], code, bs, dtype))
                            results.append(CheckResult(level, "quantize_blockwise", f"{label}, {code_name}, bs {bs}", ok))
                            results.append(CheckResult(level, "dequantize_blockwise", f"{label}, {code_name}, bs {bs}", deq_ok))
                    for qt in ("nf4", "fp4"):
                        got = cpu.quantize_4bit(xd, 64, qt, torch.uint8)
                        want = reference.quantize_4bit(xd, 64, qt, torch.uint8)
                        ok = all(_same_bits(g, w) for g, w in zip(got, want))
                        deq = [impl.dequantize_4bit(want[0], want[1], 64, qt, list(x.shape), dtype) for impl in (cpu, reference)]
                        results.append(CheckResult(level, "quantize_4bit", f"{label}, {qt}", ok))
                        results.append(CheckResult(level, "dequantize_4bit", f"{label}, {qt}", _same_bits(*deq)))
    return results
