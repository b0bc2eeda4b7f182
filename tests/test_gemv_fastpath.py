"""The CPU small-batch fast path of matmul_4bit / Linear4bit (kbit/backends/cpu_gemv.py): the op's bits, taken
only where it applies, and a prepared weight that follows every change to the weight it was built from."""

from __future__ import annotations

import gc

import pytest
import torch

import kbit
import kbit.functional as F
from kbit.backends import cpu_gemv
from kbit.matmul import _scale_args, matmul_4bit
from kbit.nn import Linear4bit

from conftest import assert_bitwise_equal


def op_output(x, weight, qs, bias):
    """The same product through the dispatcher (the path the fast path must equal)."""
    return torch.ops.kbit.gemm_4bit(x, weight, list(qs.shape), blocksize=qs.blocksize, quant_type=qs.quant_type,
                                    bias=bias, **_scale_args(qs))


@pytest.fixture
def count_fast_calls(monkeypatch):
    calls = []
    real = cpu_gemv._prepared_for  # only the fast path looks up a prepared weight

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_gemv, "_prepared_for", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("k,n", [(512, 37), (200, 33)])  # the 128-element group walk and the chunk walk
@pytest.mark.parametrize("lead", [(1,), (3,), (4,), (2, 2)])
def test_fast_path_gives_the_op_bits(dtype, compress_statistics, k, n, lead, count_fast_calls):
    W = torch.randn(n, k)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=compress_statistics)
    x = torch.randn(*lead, k).to(dtype)
    for bias in (None, torch.randn(n)):
        got = matmul_4bit(x, packed, qs, bias=bias)
        want = op_output(x, packed, qs, bias)
        assert got.shape == (*lead, n) and got.dtype == dtype
        assert_bitwise_equal(got, want, "fast path vs op")
    assert len(count_fast_calls) == 2


def test_fast_path_only_where_it_applies(count_fast_calls):
    torch.manual_seed(0)
    q = Linear4bit(256, 40, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 256)
    with torch.no_grad():
        q(x)
        assert len(count_fast_calls) == 1
        q(torch.randn(5, 256))  # more rows than the fused kernel takes: the op's tiled GEMM
    q(x)  # the bias is a parameter that wants a gradient: autograd through the op
    assert len(count_fast_calls) == 1
    with torch.inference_mode():
        q(x)
    assert len(count_fast_calls) == 2
    no_bias = Linear4bit(256, 40, bias=False, quant_type="nf4").to("cpu")
    no_bias(x)  # nothing to differentiate
    assert len(count_fast_calls) == 3
    with pytest.raises(ValueError, match="features"):
        no_bias(torch.randn(1, 255))  # bad input falls through to the op's checks
    assert len(count_fast_calls) == 3


def test_prepared_weight_follows_changes():
    torch.manual_seed(0)
    q = Linear4bit(256, 40, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                   compress_statistics=False).to("cpu")
    x = torch.randn(1, 256)
    y0 = q(x)
    # In place: the kernel reads the scales' memory at every call.
    q.weight.quant_state.absmax.mul_(2)
    assert_bitwise_equal(q(x), op_output(x, q.weight, q.weight.quant_state, None), "after in-place absmax update")
    torch.testing.assert_close(q(x), 2 * y0, rtol=1e-6, atol=1e-6)
    # Replaced: a new weight (new tensors and a new QuantState) is prepared again.
    q.load_state_dict(torch.nn.Linear(256, 40, bias=False).state_dict())
    q = q.to("cpu")
    assert_bitwise_equal(q(x), op_output(x, q.weight, q.weight.quant_state, None), "after load_state_dict")


def test_prepared_weight_reads_the_nested_offset_at_every_call():
    W = torch.randn(24, 256)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type="fp4", compress_statistics=True)
    x = torch.randn(1, 256)
    matmul_4bit(x, packed, qs)
    qs.offset.add_(0.5)
    assert_bitwise_equal(matmul_4bit(x, packed, qs), op_output(x, packed, qs, None), "after in-place offset update")


def test_non_contiguous_scales_take_the_op():
    W = torch.randn(16, 128)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    qs.absmax = torch.stack([qs.absmax, qs.absmax], 1)[:, 0]  # same values, stride 2
    x = torch.randn(1, 128)
    before = len(cpu_gemv._prepared)
    assert_bitwise_equal(matmul_4bit(x, packed, qs), op_output(x, packed, qs, None), "non-contiguous absmax")
    assert len(cpu_gemv._prepared) == before


def test_prepared_weight_dies_with_its_state():
    W = torch.randn(8, 128)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    matmul_4bit(torch.randn(1, 128), packed, qs)
    ident = id(qs)
    assert ident in cpu_gemv._prepared
    del qs
    gc.collect()
    assert ident not in cpu_gemv._prepared


def test_prepared_weight_is_checked_when_prepared():
    W = torch.randn(8, 128)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=False)
    qs.absmax = qs.absmax[:-1]  # one scale short of the weight's 16 blocks
    with pytest.raises(ValueError, match="absmax"):
        matmul_4bit(torch.randn(1, 128), packed, qs)


def test_native_prepared_weight_rejects_bad_arrays():
    packed = torch.zeros(64, dtype=torch.uint8)
    absmax = torch.ones(2)
    empty = torch.empty(0)
    with pytest.raises(ValueError, match="blocksize"):
        cpu_gemv._C.Gemv4bitWeight(packed, absmax, empty, empty, empty, 256, empty, 1, 128, 48, "nf4")
    with pytest.raises(ValueError, match="too short"):
        cpu_gemv._C.Gemv4bitWeight(packed, absmax, empty, empty, empty, 256, empty, 2, 128, 64, "nf4")
    with pytest.raises(ValueError, match="absmax"):
        cpu_gemv._C.Gemv4bitWeight(packed, torch.ones(3), empty, empty, empty, 256, empty, 1, 128, 64, "nf4")
    w = cpu_gemv._C.Gemv4bitWeight(packed, absmax, empty, empty, empty, 256, empty, 1, 128, 64, "nf4")
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        w.run(torch.zeros(1, 127), torch.zeros(1, 1), 1)
    with pytest.raises(ValueError, match="rows"):
        w.run(torch.zeros(9, 128), torch.zeros(9, 1), 1)
    with pytest.raises(TypeError, match="dtype"):
        w.run(torch.zeros(1, 128), torch.zeros(1, 1, dtype=torch.bfloat16), 1)
    assert kbit  # imported for its op registrations
