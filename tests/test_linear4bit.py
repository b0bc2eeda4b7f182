"""Params4bit / Linear4bit / matmul_4bit: numerics against the dequantized float layer, checkpoints,
copies, autograd and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as TF

import kbit
import kbit.functional as F
from kbit.backends import reference
from kbit.nn import Linear4bit, LinearFP4, LinearNF4, Params4bit

from conftest import assert_bitwise_equal

# float32 products summed in a different order than torch's GEMM: a few ulps of the output's norm.
FP32_REL_TOL = 2e-6
# A 16-bit output is rounded once from float32 (2^-8 relative for bf16, 2^-11 for fp16), and the reference
# rounds its own float32 result: one rounding of each side apart, measured as a norm ratio.
HALF_REL_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3}

SHAPES = [(64, 64), (96, 40), (33, 17), (4104, 8), (7, 1000), (1, 5), (130, 3)]  # (in, out): odd, not /32 or /64


def make_layer(k, n, dtype=torch.float32, quant_type="nf4", blocksize=64, compress_statistics=True, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, bias=bias, dtype=dtype)
    q = Linear4bit(k, n, bias=bias, quant_type=quant_type, compress_statistics=compress_statistics, blocksize=blocksize)
    q.load_state_dict(dense.state_dict())
    return dense, q.to("cpu")


def reference_output(q: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    W = F.dequantize_4bit(q.weight, q.weight.quant_state).to(x.dtype)
    return TF.linear(x, W, None if q.bias is None else q.bias.to(x.dtype))


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("batch", [1, 2, 4, 5, 9, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_dequantized_linear(k, n, batch, dtype):
    _, q = make_layer(k, n, torch.float32, blocksize=64 if k * n >= 64 else 32)
    x = torch.randn(batch, k).to(dtype)
    out = q(x)
    assert out.dtype == dtype and out.shape == (batch, n)
    tol = FP32_REL_TOL * 10 if dtype == torch.float32 else HALF_REL_TOL[dtype]
    assert rel_err(out, reference_output(q, x)) < tol


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("compress_statistics", [False, True])
# 4104: the chunk walk; 4096 and 128 (whose 256-blocks span two rows): the 128-element group walk
@pytest.mark.parametrize("k", [4104, 4096, 128])
def test_gemv_levels_bit_identical(cpu_level, quant_type, blocksize, compress_statistics, k):
    """The fused kernel gives the same bits at every CPU level (Note [4-bit gemv order])."""
    _, q = make_layer(k, 37, quant_type=quant_type, blocksize=blocksize, compress_statistics=compress_statistics)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    got = q(x)
    with kbit.cpu_capability("scalar"):
        want = q(x)
    assert_bitwise_equal(got, want, "gemv output")
    assert rel_err(got, reference_output(q, x)) < FP32_REL_TOL * 10


def test_three_d_input_and_large_batch():
    _, q = make_layer(96, 40)
    x = torch.randn(4, 130, 96)
    out = q(x)
    assert out.shape == (4, 130, 40)
    assert rel_err(out, reference_output(q, x)) < FP32_REL_TOL * 10
    x = torch.randn(512, 96, dtype=torch.bfloat16)
    assert rel_err(q(x), reference_output(q, x)) < HALF_REL_TOL[torch.bfloat16]


def test_gemm_op_native_matches_reference_op():
    W = torch.randn(300, 77)
    p, st = F.quantize_4bit(W, quant_type="fp4", compress_statistics=True)
    x = torch.randn(6, 77)
    args = (x, p, [300, 77], st.state2.absmax, 64, "fp4")
    kw = dict(absmax_8bit=st.absmax, absmax_code=st.state2.code, absmax_offset=st.offset, bias=torch.randn(300))
    assert rel_err(torch.ops.kbit.gemm_4bit(*args, **kw), reference.gemm_4bit(*args, **kw)) < FP32_REL_TOL * 10


def test_quantized_on_first_move_or_forward():
    q = LinearNF4(64, 32)
    assert not q.weight.bnb_quantized and q.weight.dtype == torch.float32
    q = q.to("cpu")
    assert q.weight.bnb_quantized and q.weight.dtype == torch.uint8 and q.weight.shape == (64 * 32 // 2, 1)
    assert q.quant_state is q.weight.quant_state
    assert q.to("cpu").weight is q.weight  # a second move does not re-quantize
    r = LinearFP4(64, 32)
    r(torch.randn(2, 64))
    assert r.weight.bnb_quantized and r.weight.quant_type == "fp4"


def test_state_dict_keys_and_round_trip(tmp_path):
    _, q = make_layer(64, 48, quant_type="nf4")
    sd = q.state_dict()
    assert list(sd) == ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
    fresh = Linear4bit(64, 48)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 64)
    assert_bitwise_equal(fresh(x), q(x), "reloaded output")
    from safetensors.torch import load_file, save_file
    save_file(sd, str(tmp_path / "w.safetensors"))
    again = Linear4bit(64, 48)
    again.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert_bitwise_equal(again(x), q(x), "safetensors output")


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
def test_copies_pickle_and_dtype_moves_keep_the_weight(storage):
    q2 = LinearNF4(64, 32, quant_storage=storage).to("cpu")
    packed = q2.weight.data.clone()
    x = torch.randn(3, 64)
    y = q2(x)
    deep = copy.deepcopy(q2)
    assert deep.weight.module is deep and torch.equal(deep(x), y)
    buf = io.BytesIO()
    torch.save(q2, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.weight, Params4bit) and torch.equal(loaded(x), y)
    q2.to(torch.float16)
    assert q2.weight.dtype == storage and torch.equal(q2.weight.data.view(torch.uint8), packed.view(torch.uint8))


def test_bias_not_mutated_and_output_dtype():
    _, q = make_layer(64, 32)
    bias = q.bias.detach().clone()
    out = q(torch.randn(2, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias.detach(), bias)


def test_backward_matches_float_layer_and_weight_is_frozen():
    _, q = make_layer(96, 40)
    W = F.dequantize_4bit(q.weight, q.weight.quant_state)
    x1 = torch.randn(7, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    bias2 = q.bias.detach().clone().requires_grad_()
    q(x1).square().sum().backward()
    TF.linear(x2, W, bias2).square().sum().backward()
    assert q.weight.grad is None and not q.weight.requires_grad
    assert rel_err(x1.grad, x2.grad) < FP32_REL_TOL * 10
    assert rel_err(q.bias.grad, bias2.grad) < FP32_REL_TOL * 10


def test_torch_compile_forward_and_backward():
    _, q = make_layer(64, 32)
    x = torch.randn(3, 64, requires_grad=True)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    assert rel_err(out, q(x)) < FP32_REL_TOL
    assert x.grad is not None


def test_lora_over_4bit_base_trains_like_lora_over_float_base():
    """A small regression task: LoRA adapters on a frozen NF4 base reach the loss of LoRA on the float base."""
    torch.manual_seed(0)
    k, n, rank = 64, 64, 8
    base = torch.nn.Linear(k, n)
    target_w = base.weight.detach() + 0.05 * torch.randn(n, rank) @ torch.randn(rank, k) / rank
    x = torch.randn(512, k)
    y = x @ target_w.t() + base.bias.detach()

    def train(layer):
        torch.manual_seed(1)
        A = torch.nn.Parameter(torch.randn(rank, k) * 0.01)
        B = torch.nn.Parameter(torch.zeros(n, rank))
        opt = kbit.optim.AdamW([A, B], lr=1e-2, weight_decay=0.0)
        for _ in range(200):
            loss = (layer(x) + x @ A.t() @ B.t() - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    for p in base.parameters():
        p.requires_grad_(False)
    q = LinearNF4(k, n)
    q.load_state_dict(base.state_dict())
    q = q.to("cpu")
    float_loss, q_loss = train(base), train(q)
    # The 4-bit base's quantization error (~10% of the weights, relative) is part of what LoRA must fit: the
    # loss cannot reach the float run's, but it must come close to the quantization noise floor.
    floor = (x @ (F.dequantize_4bit(q.weight, q.weight.quant_state) - base.weight).t()).square().mean().item()
    assert q_loss < float_loss + 1.5 * floor


def test_replace_linear_4bit():
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model.lm_head = torch.nn.Linear(8, 8)
    x = torch.randn(2, 32)
    ref = model[2](model[1](model[0](x)))
    kbit.nn.replace_linear_4bit(model, quant_type="nf4")
    assert isinstance(model[0], Linear4bit) and isinstance(model[2], Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear
    assert rel_err(model[2](model[1](model[0](x))), ref) < 0.2


def test_bad_input():
    _, q = make_layer(64, 32)
    with pytest.raises(ValueError, match="features"):
        q(torch.randn(2, 63))
    sd = q.state_dict()
    bad = dict(sd)
    bad["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"garbage"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="not valid UTF-8 JSON|JSON"):
        Linear4bit(64, 32).load_state_dict(bad)
    short = dict(sd)
    short["weight"] = sd["weight"][:10]
    with pytest.raises(RuntimeError, match="needs"):
        Linear4bit(64, 32).load_state_dict(short)
    with pytest.raises(RuntimeError, match="shape"):
        Linear4bit(32, 64).load_state_dict(sd)
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(64, 32, quant_type="int8")
    with pytest.raises(ValueError, match="quant_state is required"):
        kbit.matmul_4bit(torch.randn(2, 64), q.weight, None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        Params4bit(torch.randn(4, 4), bogus=1)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "double"])
def test_module_dtype_casts_keep_the_packed_weight(storage, cast):
    """nn.Module.half() and friends call Tensor.half() on each floating-point parameter, bypassing .to(): a packed
    weight stored as float16/bfloat16/float32 bytes must come through unchanged."""
    layer = kbit.nn.LinearNF4(64, 32, quant_storage=storage).to("cpu")
    packed = layer.weight.detach().clone()
    getattr(layer, cast)()
    assert layer.weight.dtype == storage
    assert torch.equal(layer.weight.detach().view(torch.uint8), packed.view(torch.uint8))
