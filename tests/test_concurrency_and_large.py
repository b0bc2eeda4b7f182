"""Threads sharing kbit objects give the results of a single thread; kernels index past 2^31 elements."""

from __future__ import annotations

import threading

import pytest
import torch

import kbit
import kbit.functional as F


def _run_in_threads(fn, n_threads=4, repeats=5):
    results, errors = [None] * n_threads, []

    def worker(i):
        try:
            results[i] = [fn() for _ in range(repeats)]
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return [r for rs in results for r in rs]


@pytest.mark.parametrize("batch", [1, 64])  # the fused gemv and the tiled GEMM (per-thread workspace)
def test_threads_share_one_linear4bit(batch):
    torch.manual_seed(0)
    q = kbit.nn.LinearNF4(512, 384, compute_dtype=torch.bfloat16).to("cpu").eval()
    x = torch.randn(batch, 512, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = q(x)
    with torch.inference_mode():
        outs = _run_in_threads(lambda: q(x))
    assert all(torch.equal(o, want) for o in outs)


def test_threads_quantize_and_step_different_tensors():
    torch.manual_seed(0)
    xs = [torch.randn(10_000) for _ in range(4)]
    want = [F.quantize_4bit(x, quant_type="nf4")[0] for x in xs]
    lock = threading.Lock()
    counter = iter(range(4))

    def job():
        with lock:
            i = next(counter)
        p = torch.nn.Parameter(torch.ones(5000))
        opt = kbit.optim.AdamW8bit([p], min_8bit_size=0)
        for _ in range(3):
            p.grad = torch.full_like(p, 0.1)
            opt.step()
        return i, F.quantize_4bit(xs[i], quant_type="nf4")[0], p.detach().clone()

    results = _run_in_threads(job, n_threads=4, repeats=1)
    params = [r[2] for r in results]
    assert all(torch.equal(r[1], want[r[0]]) for r in results)
    assert all(torch.equal(p, params[0]) for p in params)


@pytest.mark.slow
def test_more_than_2_31_elements():
    """int64 indexing end to end: the last block of a 2^31 + 67 element tensor quantizes exactly as the same
    values alone (about 5 GB of memory; slow-marked, run by CI)."""
    n = 2**31 + 67
    x = torch.zeros(n, dtype=torch.bfloat16)
    tail = torch.randn(131, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x[-131:] = tail
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    # n % 64 == 3: the tail spans the last two full blocks and a 3-element block.
    ref_packed, ref_state = F.quantize_4bit(x[-(64 * 2 + 3):].clone(), blocksize=64, quant_type="nf4")
    assert torch.equal(state.absmax[-3:], ref_state.absmax)
    assert torch.equal(packed.view(-1)[-(ref_packed.numel()):], ref_packed.view(-1))
    codes, s8 = F.quantize_blockwise(x, blocksize=4096)
    assert s8.absmax.numel() == -(-n // 4096)
    last = n % 4096  # the final, partial block
    ref_codes, ref_s8 = F.quantize_blockwise(x[-last:].clone(), blocksize=4096)
    assert torch.equal(codes[-last:], ref_codes) and torch.equal(s8.absmax[-1:], ref_s8.absmax)
    assert torch.equal(F.dequantize_blockwise(codes, s8)[-last:], F.dequantize_blockwise(ref_codes, ref_s8))
