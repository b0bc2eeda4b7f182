"""Optimizers and quantizers called from several Python threads on different tensors give exactly the results
of serial calls (the native kernels release the GIL, so these calls really overlap). Complements
test_concurrency_and_large.py (threads sharing one Linear4bit).
"""

from __future__ import annotations

import threading

import pytest
import torch

import kbit
import kbit.functional as F
import kbit.optim as O
from conftest import CPU_LEVELS, assert_bitwise_equal

THREADS = 4
#: Optimizers run concurrently: 8-bit blockwise and tensor-wise, 32-bit, trust ratio, schedules, percentile clipping.
OPTIMIZERS = [
    (O.AdamW8bit, dict(min_8bit_size=0)),
    (O.Lion8bit, dict(min_8bit_size=0)),
    (O.LAMB8bit, dict(min_8bit_size=0)),
    (O.SGD, dict(lr=0.01, momentum=0.9)),
    (O.AdEMAMix8bit, dict(min_8bit_size=0, t_alpha=5, t_beta3=5)),
    (O.Adam, dict(percentile_clipping=90)),
    (O.RMSprop8bit, dict(lr=0.01, min_8bit_size=0)),
    (O.Adagrad8bit, dict(lr=0.01, min_8bit_size=0)),
]


def _in_threads(jobs):
    """Run every job in its own thread, all started together; return their results in order."""
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        try:
            barrier.wait()
            results[i] = jobs[i]()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def _train(cls, kwargs, seed, steps=4):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(300, 70, generator=g) * 0.1), torch.nn.Parameter(torch.randn(33, generator=g))]
    opt = cls(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * 0.01
        opt.step()
    return [p.detach().clone() for p in params] + [v.clone() for p in params for v in opt.state[p].values()
                                                    if isinstance(v, torch.Tensor)]


def _assert_same(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_bitwise_equal(a, b, f"{what}: tensor {i}")


@pytest.mark.filterwarnings("ignore:kbit. paged optimizer state")
def test_optimizers_in_threads_equal_serial():
    jobs = [lambda cls=cls, kw=kw, i=i: _train(cls, kw, seed=i) for i, (cls, kw) in enumerate(OPTIMIZERS)]
    want = [job() for job in jobs]
    for _ in range(2):
        got = _in_threads(jobs)
        for (cls, _), g, w in zip(OPTIMIZERS, got, want):
            _assert_same(g, w, cls.__name__)


def _quantize_all(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(257, 129, generator=g).to([torch.float32, torch.bfloat16, torch.float16][seed % 3])
    codes, s8 = F.quantize_blockwise(x, blocksize=256, nested=seed % 2 == 0)
    packed, s4 = F.quantize_4bit(x, blocksize=64, quant_type="nf4" if seed % 2 else "fp4", compress_statistics=True)
    A = torch.randn(7, 129, generator=g).to(x.dtype)
    return [codes, s8.absmax, F.dequantize_blockwise(codes, s8), packed, s4.absmax, F.dequantize_4bit(packed, s4),
            kbit.matmul_4bit(A[:2], packed, s4), kbit.matmul_4bit(A, packed, s4)]  # x as a (257, 129) weight


def test_quantizers_in_threads_equal_serial():
    jobs = [lambda i=i: _quantize_all(i) for i in range(THREADS * 2)]
    want = [job() for job in jobs]
    got = _in_threads(jobs)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_same(g, w, f"quantizer job {i}")


@pytest.mark.filterwarnings("ignore:kbit. paged optimizer state")
def test_optimizers_and_quantizers_mixed_in_threads():
    jobs = [lambda: _train(O.AdamW8bit, dict(min_8bit_size=0), seed=7), lambda: _quantize_all(3),
            lambda: _train(O.LAMB, {}, seed=8), lambda: _quantize_all(4)]
    want = [job() for job in jobs]
    got = _in_threads(jobs)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_same(g, w, f"job {i}")


@pytest.mark.skipif(len(CPU_LEVELS) < 2, reason="needs two CPU kernel levels to switch between")
def test_switching_cpu_level_while_other_threads_compute():
    """The kernel level is process-wide (kbit.set_cpu_capability); every level gives the same bits, so a thread
    switching it while others compute changes nothing in their results."""
    stop = threading.Event()

    def switcher():
        while not stop.is_set():
            for level in CPU_LEVELS:
                kbit.set_cpu_capability(level)

    previous = kbit.get_cpu_capability()
    jobs = [lambda i=i: _quantize_all(i) for i in range(3)] + [lambda: _train(O.AdamW8bit, dict(min_8bit_size=0), 9)]
    want = [job() for job in jobs]
    t = threading.Thread(target=switcher)
    t.start()
    try:
        got = _in_threads(jobs)
    finally:
        stop.set()
        t.join()
        kbit.set_cpu_capability(previous)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_same(g, w, f"job {i}")
