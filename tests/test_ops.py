"""The op layer: torch.library.opcheck, torch.compile without graph breaks, fake/meta shapes, argument errors
that name the problem, out= handling, and the native module's refusal to silently copy outputs."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kbit.functional as F
from conftest import assert_bitwise_equal, randn
from kbit._native import _C

ops = torch.ops.kbit
DYNAMIC = F.create_dynamic_map()
FLOAT_STORAGES = [torch.bfloat16, torch.float16, torch.float32]
# Budget for the one inductor compile in the default run (about 1.5 s here with a cold inductor cache).
MAX_INDUCTOR_SECONDS = 60


def _input(shape, dtype, seed=0):
    return randn(shape, dtype, torch.Generator().manual_seed(seed))


# ---- opcheck ----------------------------------------------------------------------------------------------
OPCHECK_INPUTS = [((7, 33), torch.float32, 64), ((5,), torch.float16, 32), ((3, 4, 5), torch.bfloat16, 128),
                  ((1,), torch.float32, 32), ((4097,), torch.bfloat16, 4096)]


@pytest.mark.parametrize("shape,dtype,blocksize", OPCHECK_INPUTS, ids=str)
def test_opcheck_blockwise(shape, dtype, blocksize):
    A = _input(shape, dtype)
    torch.library.opcheck(ops.quantize_blockwise.default, (A, DYNAMIC, blocksize))
    codes, absmax = ops.quantize_blockwise(A, DYNAMIC, blocksize)
    torch.library.opcheck(ops.dequantize_blockwise.default, (codes, absmax, DYNAMIC, blocksize, dtype))
    out = torch.empty(shape, dtype=dtype)
    torch.library.opcheck(ops.dequantize_blockwise.out, (codes, absmax, DYNAMIC, blocksize, dtype), {"out": out})


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", [torch.uint8, torch.int8])
@pytest.mark.parametrize("shape,dtype,blocksize", OPCHECK_INPUTS, ids=str)
def test_opcheck_4bit(shape, dtype, blocksize, storage, qt):
    A = _input(shape, dtype)
    torch.library.opcheck(ops.quantize_4bit.default, (A, blocksize, qt, storage))
    packed, absmax = ops.quantize_4bit(A, blocksize, qt, storage)
    args = (packed, absmax, blocksize, qt, list(shape), dtype)
    torch.library.opcheck(ops.dequantize_4bit.default, args)
    torch.library.opcheck(ops.dequantize_4bit.out, args, {"out": torch.empty(shape, dtype=dtype)})


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("storage", FLOAT_STORAGES, ids=str)
def test_opcheck_4bit_float_storage(storage, qt):
    # opcheck compares outputs with assert_close, for which NaN != NaN. Packed bytes viewed as a float dtype
    # form NaN patterns for some inputs (an opcheck limitation, not an op bug), so the data here keeps every
    # byte NaN-free: NF4 codes in {0, 3..11} (|s| <= 0.3 plus one -absmax per block), FP4 codes 0..7 (x >= 0).
    g = torch.Generator().manual_seed(1)
    if qt == "nf4":
        A = torch.rand(1000, generator=g) * 0.6 - 0.3
        A[::64] = -1.0
    else:
        A = torch.rand(1000, generator=g)
    packed, absmax = ops.quantize_4bit(A, 64, qt, storage)
    assert not bool(packed.isnan().any()), "precondition: no NaN bit patterns in the packed data"
    torch.library.opcheck(ops.quantize_4bit.default, (A, 64, qt, storage))
    torch.library.opcheck(ops.dequantize_4bit.default, (packed, absmax, 64, qt, [1000], torch.float32))


# ---- torch.compile ------------------------------------------------------------------------------------------
def roundtrip(x, qt: str, nested: bool):
    packed, state4 = F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=nested)
    codes, state8 = F.quantize_blockwise(x, blocksize=256, nested=nested)
    return F.dequantize_4bit(packed, state4), packed, F.dequantize_blockwise(codes, state8), codes


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend, qt, nested):
    x = _input((33, 65), torch.bfloat16)
    expected = roundtrip(x, qt, nested)
    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    for got, want, what in zip(compiled(x, qt, nested), expected, ["deq4", "packed", "deq8", "codes"]):
        assert_bitwise_equal(got, want, what)


def test_compile_before_any_eager_call():
    # Regression: the default 8-bit map used to be built lazily on first use, so a process whose first
    # quantize_blockwise ran under torch.compile traced the map's construction (Tensor.tolist) and broke the
    # graph. Only a fresh interpreter shows it.
    code = ("import torch, kbit.functional as F\n"
            "f = torch.compile(lambda x: F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=64)),"
            " fullgraph=True, backend='eager')\n"
            "x = torch.randn(100)\n"
            "assert torch.equal(f(x), F.dequantize_blockwise(*F.quantize_blockwise(x, blocksize=64)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_compile_inductor_matches_eager():
    # Non-nested only: with nesting, inductor may sum the absmax mean in another order (offset differs in the
    # last bit), which is floating-point reassociation, not an op problem.
    x = _input((33, 65), torch.float32)
    expected = roundtrip(x, "nf4", False)
    torch._dynamo.reset()
    start = time.perf_counter()
    got = torch.compile(roundtrip, fullgraph=True, backend="inductor")(x, "nf4", False)
    assert time.perf_counter() - start < MAX_INDUCTOR_SECONDS
    for g, e, what in zip(got, expected, ["deq4", "packed", "deq8", "codes"]):
        assert_bitwise_equal(g, e, what)


# ---- fake tensors / meta ------------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(7, 33), (1,), (0,), (2, 3, 5), (4097,)], ids=str)
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_fake_shapes(mode, shape, storage):
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=storage).element_size()
    with FakeTensorMode() if mode == "fake" else torch.device("meta"):
        A = torch.empty(shape, dtype=torch.bfloat16)
        code = torch.empty(256)
        codes, absmax = ops.quantize_blockwise(A, code, 64)
        deq = ops.dequantize_blockwise(codes, absmax, code, 64, torch.float16)
        packed, absmax4 = ops.quantize_4bit(A, 64, "nf4", storage)
        deq4 = ops.dequantize_4bit(packed, absmax4, 64, "nf4", list(shape), torch.float32)
    assert codes.shape == shape and codes.dtype == torch.uint8 and absmax.shape == (math.ceil(n / 64),)
    assert deq.shape == shape and deq.dtype == torch.float16
    assert packed.shape == (math.ceil((n + 1) // 2 / itemsize), 1) and packed.dtype == storage
    assert absmax4.shape == (math.ceil(n / 64),) and absmax4.dtype == torch.float32
    assert deq4.shape == shape and deq4.dtype == torch.float32


def test_functional_on_meta():
    A = torch.empty(10, 300, device="meta")
    packed, state = F.quantize_4bit(A, blocksize=128, quant_type="nf4")
    assert packed.shape == (1500, 1) and state.absmax.shape == (24,)
    assert F.dequantize_4bit(packed, state).shape == (10, 300)
    codes, state8 = F.quantize_blockwise(A, blocksize=1000)
    assert codes.shape == (10, 300) and state8.absmax.shape == (3,)


# ---- argument errors -------------------------------------------------------------------------------------
X = _input((10, 10), torch.float32)
P4, S4 = F.quantize_4bit(X, blocksize=64, quant_type="nf4")
C8, S8 = F.quantize_blockwise(X, blocksize=64)

BAD_CALLS = {
    "int_input_8bit": (lambda: F.quantize_blockwise(torch.ones(10, dtype=torch.int32)), TypeError, "float32"),
    "int_input_4bit": (lambda: F.quantize_4bit(torch.ones(10, dtype=torch.int64)), TypeError, "float32"),
    "float64_input_op": (lambda: ops.quantize_4bit(X.double(), 64, "nf4", torch.uint8), TypeError, "float64"),
    "blocksize_0_8bit": (lambda: F.quantize_blockwise(X, blocksize=0), ValueError, "positive.*got 0"),
    "blocksize_-1_8bit": (lambda: F.quantize_blockwise(X, blocksize=-1), ValueError, "positive.*got -1"),
    "blocksize_0_4bit": (lambda: F.quantize_4bit(X, blocksize=0), ValueError, "one of 32, 64.*got 0"),
    "blocksize_-1_4bit": (lambda: F.quantize_4bit(X, blocksize=-1), ValueError, "got -1"),
    "blocksize_48_4bit": (lambda: F.quantize_4bit(X, blocksize=48), ValueError, "one of 32, 64.*4096 .got 48"),
    "blocksize_48_op": (lambda: ops.quantize_4bit(X, 48, "nf4", torch.uint8), ValueError, "got 48"),
    "blocksize_str": (lambda: F.quantize_blockwise(X, blocksize="64"), TypeError, "int"),
    "quant_type_int4": (lambda: F.quantize_4bit(X, quant_type="int4"), ValueError, "'nf4' or 'fp4'.*int4"),
    "quant_type_upper": (lambda: ops.quantize_4bit(X, 64, "NF4", torch.uint8), ValueError, "'nf4' or 'fp4'"),
    "dequant_quant_type": (lambda: ops.dequantize_4bit(P4, S4.absmax, 64, "af4", [10, 10], torch.float32),
                           ValueError, "quant_type"),
    "storage_int32": (lambda: F.quantize_4bit(X, quant_storage=torch.int32), TypeError, "quant_storage"),
    "absmax_short_8bit": (lambda: F.dequantize_blockwise(C8, absmax=S8.absmax[:1], blocksize=64), ValueError,
                          "absmax has 1 values but 100 elements in blocks of 64 need 2"),
    "absmax_short_4bit": (lambda: ops.dequantize_4bit(P4, S4.absmax[:1], 64, "nf4", [10, 10], torch.float32),
                          ValueError, "absmax has 1 values but 100 elements in blocks of 64 need 2"),
    "packed_short": (lambda: ops.dequantize_4bit(P4[:40], torch.ones(2), 64, "nf4", [10, 10], torch.float32),
                     ValueError, "holds 40 bytes.*needs 50"),
    "float_codes": (lambda: F.dequantize_blockwise(X, S8), TypeError, "uint8 codes"),
    "float_codes_op": (lambda: ops.dequantize_blockwise(X, S8.absmax, DYNAMIC, 64, torch.float32), TypeError, "uint8"),
    "code_len_128": (lambda: F.quantize_blockwise(X, code=DYNAMIC[:128]), ValueError, "256 values"),
    "code_float64": (lambda: F.quantize_blockwise(X, code=DYNAMIC.double()), ValueError, "float32"),
    "code_len_dequant": (lambda: F.dequantize_blockwise(C8, absmax=S8.absmax, code=DYNAMIC[:16], blocksize=64),
                         ValueError, "256 values"),
    "state_shape_mismatch": (lambda: F.dequantize_4bit(P4, F.QuantState(
        absmax=S4.absmax, shape=(10, 20), dtype=torch.float32, blocksize=64, quant_type="nf4")), ValueError, "need"),
    "state_blocksize_mismatch": (lambda: F.dequantize_4bit(P4, F.QuantState(
        absmax=S4.absmax, shape=(10, 10), dtype=torch.float32, blocksize=32, quant_type="nf4")), ValueError, "need 4"),
    "state_dtype_int": (lambda: F.dequantize_4bit(P4, F.QuantState(
        absmax=S4.absmax, shape=(10, 10), dtype=torch.int8, blocksize=64, quant_type="nf4")), TypeError, "dtype"),
    "state_no_shape": (lambda: F.dequantize_4bit(P4, F.QuantState(
        absmax=S4.absmax, dtype=torch.float32, blocksize=64, quant_type="nf4")), ValueError, "shape is None"),
    "state_not_quantstate": (lambda: F.dequantize_4bit(P4, {"absmax": S4.absmax}), TypeError, "QuantState"),
    "out_wrong_dtype": (lambda: F.dequantize_4bit(P4, S4, out=torch.empty(10, 10, dtype=torch.float16)),
                        ValueError, "out must be a torch.float32"),
    "out_wrong_shape_8bit": (lambda: F.dequantize_blockwise(C8, S8, out=torch.empty(100)), ValueError, "shape"),
    "dequant_no_state": (lambda: F.dequantize_blockwise(C8), ValueError, "quant_state or absmax"),
}


@pytest.mark.parametrize("call,exc,match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- out= that is not contiguous ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_out(cpu_level, dtype):
    A = _input((24, 40), dtype)
    packed, state = F.quantize_4bit(A, blocksize=32, quant_type="nf4")
    codes, state8 = F.quantize_blockwise(A, blocksize=100)
    for make in (lambda: torch.empty(40, 24, dtype=dtype).t(), lambda: torch.empty(24, 80, dtype=dtype)[:, ::2]):
        out = make()
        assert not out.is_contiguous()
        assert F.dequantize_4bit(packed, state, out=out) is out
        assert_bitwise_equal(out, F.dequantize_4bit(packed, state), "4-bit into a strided out")
        out = make()
        assert F.dequantize_blockwise(codes, state8, out=out) is out
        assert_bitwise_equal(out, F.dequantize_blockwise(codes, state8), "8-bit into a strided out")


# ---- the native module never copies silently --------------------------------------------------------------
def _native_calls():
    """name -> (fn, {argument: valid tensor}, other args): valid calls into kbit._C (64 values, blocks of 32, so
    that every array has at least two elements and a strided view of it is really non-contiguous)."""
    x = torch.randn(64)
    packed = torch.zeros(32, dtype=torch.uint8)
    return {
        "quantize_blockwise": (_C.quantize_blockwise, dict(A=x, code=DYNAMIC.clone(), absmax=torch.empty(2),
                                                             out=torch.empty(64, dtype=torch.uint8)), (32, 1)),
        "dequantize_blockwise": (_C.dequantize_blockwise, dict(A=torch.zeros(64, dtype=torch.uint8), absmax=torch.ones(2),
                                                                 code=DYNAMIC.clone(), out=torch.empty(64)), (32, 1)),
        "quantize_4bit": (_C.quantize_4bit, dict(A=x, absmax=torch.empty(2), packed=packed), (32, "nf4", 1)),
        "dequantize_4bit": (_C.dequantize_4bit, dict(A=packed, absmax=torch.ones(2), out=torch.empty(64)),
                            (32, "nf4", 1)),
    }


NATIVE_ARGS = [(fn, arg) for fn, (_, tensors, _) in _native_calls().items() for arg in tensors]


def test_native_valid_calls_succeed():
    for fn, tensors, rest in _native_calls().values():
        fn(*tensors.values(), *rest)


@pytest.mark.parametrize("defect", ["strided", "wrong_dtype"])
@pytest.mark.parametrize("fn_name,arg", NATIVE_ARGS, ids=[f"{f}-{a}" for f, a in NATIVE_ARGS])
def test_native_rejects_instead_of_copying(fn_name, arg, defect):
    fn, tensors, rest = _native_calls()[fn_name]
    t = tensors[arg]
    if defect == "strided":
        bad = torch.zeros(t.numel() * 2, dtype=t.dtype)[::2]
    else:
        bad = torch.zeros(t.numel(), dtype=torch.float64 if t.dtype != torch.float64 else torch.float32)
    assert not bad.is_contiguous() or bad.dtype != t.dtype
    tensors[arg] = bad
    before = bad.clone()
    with pytest.raises(TypeError):
        fn(*tensors.values(), *rest)
    assert_bitwise_equal(bad, before, "rejected argument untouched")
