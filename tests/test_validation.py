"""Validation at the boundary: every public function, op, optimizer and layer given a wrong dtype, shape,
contiguity, device (meta tensors among CPU ones), block size or a QuantState that does not belong to its data
raises a ValueError or TypeError whose message names the problem, before any kernel runs: never a
RuntimeError from deep inside, a crash, or silently wrong numbers.

One table (CASES) of (id, call, exception, message pattern); the op rows run against every implementation
(the native CPU kernel through torch.ops.kbit and the pure-PyTorch reference), so both reject the same
calls. ``test_every_op_has_cases`` keeps the table complete when ops are added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import kbit
import kbit.functional as F
import kbit.nn as knn
import kbit.optim as O
from kbit import _ops, _optim_ops
from kbit.backends import reference, reference_optim
from kbit.functional import QuantState

CODE = F.create_dynamic_map()
UCODE = F.create_dynamic_map(signed=False)
META = torch.device("meta")


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _q4(nested=False):
    """A (16, 64) NF4 weight in 16 blocks of 64: packed data and its state."""
    return F.quantize_4bit(_randn(16, 64), blocksize=64, quant_type="nf4", compress_statistics=nested)


def _qs4(nested=False, **changes):
    _, qs = _q4(nested)
    fields = dict(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize, quant_type=qs.quant_type,
                  dtype=qs.dtype, offset=qs.offset, state2=qs.state2)
    fields.update(changes)
    return QuantState(**fields)


def _q8():
    return F.quantize_blockwise(_randn(300), blocksize=64)


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], object]
    exc: type
    match: str  # regex the message must contain: names the problem (and usually the fix)


def _cases_functional() -> list[Case]:
    packed, qs = _q4()
    packed_n, qs_n = _q4(nested=True)
    codes8, qs8 = _q8()
    x = _randn(300)
    A = _randn(2, 64)
    return [
        # quantize_blockwise
        Case("qb/not-a-tensor", lambda: F.quantize_blockwise([1.0, 2.0]), TypeError, "must be a torch.Tensor"),
        Case("qb/int-input", lambda: F.quantize_blockwise(torch.ones(5, dtype=torch.int32)), TypeError, r"float32.*int32"),
        Case("qb/float64", lambda: F.quantize_blockwise(x.double()), TypeError, r"\.float\(\)"),
        Case("qb/blocksize-0", lambda: F.quantize_blockwise(x, blocksize=0), ValueError, "blocksize must be a positive"),
        Case("qb/blocksize-negative", lambda: F.quantize_blockwise(x, blocksize=-64), ValueError, "positive"),
        Case("qb/blocksize-float", lambda: F.quantize_blockwise(x, blocksize=64.0), TypeError, "blocksize must be an int"),
        Case("qb/blocksize-bool", lambda: F.quantize_blockwise(x, blocksize=True), TypeError, "must be an int"),
        Case("qb/code-length", lambda: F.quantize_blockwise(x, code=torch.zeros(10)), ValueError, "256 values"),
        Case("qb/code-float64", lambda: F.quantize_blockwise(x, code=CODE.double()), ValueError, "float32"),
        Case("qb/code-unsorted", lambda: F.quantize_blockwise(x, code=CODE.flip(0)), ValueError, "sorted"),
        Case("qb/code-nan", lambda: F.quantize_blockwise(x, code=torch.full((256,), float("nan"))), ValueError, "NaN"),
        Case("qb/code-on-meta", lambda: F.quantize_blockwise(x, code=CODE.to(META)), ValueError, "code is on meta"),
        Case("qb/input-on-meta-code-cpu", lambda: F.quantize_blockwise(x.to(META), code=CODE), ValueError, "meta"),
        Case("qb/out-wrong-shape", lambda: F.quantize_blockwise(x, out=torch.empty(3, dtype=torch.uint8)), ValueError,
             r"out must be a torch.uint8 tensor of shape \(300,\)"),
        Case("qb/out-wrong-dtype", lambda: F.quantize_blockwise(x, out=torch.empty(300)), ValueError, "torch.uint8"),
        Case("qb/absmax-out-wrong", lambda: F.quantize_blockwise(x, absmax=torch.empty(3)), ValueError, "absmax must be"),
        # dequantize_blockwise
        Case("dqb/float-codes", lambda: F.dequantize_blockwise(x, qs8), TypeError, "uint8 codes"),
        Case("dqb/no-state", lambda: F.dequantize_blockwise(codes8), ValueError, "quant_state or absmax"),
        Case("dqb/state-not-quantstate", lambda: F.dequantize_blockwise(codes8, quant_state="x"), TypeError, "QuantState"),
        Case("dqb/absmax-short", lambda: F.dequantize_blockwise(codes8, absmax=torch.ones(2), blocksize=64), ValueError,
             r"absmax has 2 values but 300 elements in blocks of 64 need 5"),
        Case("dqb/absmax-long", lambda: F.dequantize_blockwise(codes8, absmax=torch.ones(9), blocksize=64), ValueError,
             "need 5"),
        Case("dqb/absmax-blocksize-mismatch", lambda: F.dequantize_blockwise(codes8, absmax=qs8.absmax, blocksize=128),
             ValueError, "check blocksize and shape"),
        Case("dqb/absmax-float16", lambda: F.dequantize_blockwise(codes8, absmax=qs8.absmax.half(), blocksize=64),
             TypeError, "absmax must be float32"),
        Case("dqb/absmax-on-meta", lambda: F.dequantize_blockwise(codes8, absmax=qs8.absmax.to(META), blocksize=64),
             ValueError, "absmax is on meta"),
        Case("dqb/code-length", lambda: F.dequantize_blockwise(codes8, QuantState(absmax=qs8.absmax, code=CODE[:16],
             blocksize=64, dtype=torch.float32)), ValueError, "256 values"),
        Case("dqb/state-blocksize-none", lambda: F.dequantize_blockwise(codes8, QuantState(absmax=qs8.absmax, code=CODE,
             blocksize=None)), TypeError, "blocksize must be an int"),
        Case("dqb/state-dtype-int", lambda: F.dequantize_blockwise(codes8, QuantState(absmax=qs8.absmax, code=CODE,
             blocksize=64, dtype=torch.int32)), TypeError, "dtype must be"),
        Case("dqb/codes-on-meta", lambda: F.dequantize_blockwise(codes8.to(META), qs8), ValueError, "meta"),
        Case("dqb/out-wrong-dtype", lambda: F.dequantize_blockwise(codes8, qs8, out=torch.empty(300, dtype=torch.half)),
             ValueError, "out must be a torch.float32"),
        Case("dqb/out-on-meta", lambda: F.dequantize_blockwise(codes8, qs8, out=torch.empty(300, device=META)),
             ValueError, "on meta"),
        # quantize_4bit
        Case("q4/blocksize-48", lambda: F.quantize_4bit(x, blocksize=48), ValueError, "one of 32, 64"),
        Case("q4/blocksize-str", lambda: F.quantize_4bit(x, blocksize="64"), TypeError, "must be an int"),
        Case("q4/quant-type", lambda: F.quantize_4bit(x, quant_type="int4"), ValueError, "'nf4' or 'fp4'"),
        Case("q4/quant-storage", lambda: F.quantize_4bit(x, quant_storage=torch.int32), TypeError, "quant_storage"),
        Case("q4/int-input", lambda: F.quantize_4bit(torch.ones(4, dtype=torch.int64)), TypeError, "float32"),
        Case("q4/out-wrong", lambda: F.quantize_4bit(x, out=torch.empty(3, dtype=torch.uint8)), ValueError, "out must be"),
        # dequantize_4bit and the QuantState it is given
        Case("dq4/packed-short", lambda: F.dequantize_4bit(packed[:10], qs), ValueError,
             "holds 10 bytes but shape with 1024 elements needs 512"),
        Case("dq4/packed-int32", lambda: F.dequantize_4bit(packed.view(-1).view(torch.int32), qs), TypeError, "quant_storage"),
        Case("dq4/no-state", lambda: F.dequantize_4bit(packed), ValueError, "absmax and out"),
        Case("dq4/absmax-without-out", lambda: F.dequantize_4bit(packed, absmax=qs.absmax), ValueError, "absmax and out"),
        Case("dq4/state-not-quantstate", lambda: F.dequantize_4bit(packed, quant_state=[1]), TypeError, "QuantState"),
        Case("dq4/state-8bit", lambda: F.dequantize_4bit(packed, QuantState(absmax=qs.absmax, code=CODE, blocksize=64,
             dtype=torch.float32)), ValueError, "not a 4-bit QuantState"),
        Case("dq4/state-quant-type", lambda: F.dequantize_4bit(packed, _qs4(quant_type="int4")), ValueError, "'nf4'"),
        Case("dq4/state-blocksize", lambda: F.dequantize_4bit(packed, _qs4(blocksize=48)), ValueError, "one of 32"),
        Case("dq4/state-blocksize-none", lambda: F.dequantize_4bit(packed, _qs4(blocksize=None)), TypeError, "an int"),
        Case("dq4/state-absmax-short", lambda: F.dequantize_4bit(packed, _qs4(absmax=qs.absmax[:3])), ValueError,
             "absmax has 3 values but 1024 elements in blocks of 64 need 16"),
        Case("dq4/state-absmax-blocksize", lambda: F.dequantize_4bit(packed, _qs4(blocksize=128)), ValueError, "need 8"),
        Case("dq4/state-shape-larger-than-data", lambda: F.dequantize_4bit(packed, _qs4(shape=(32, 64))), ValueError,
             "needs 1024"),
        Case("dq4/state-shape-negative", lambda: F.dequantize_4bit(packed, _qs4(shape=(-16, -64))), ValueError,
             "non-negative ints"),
        Case("dq4/state-dtype-int", lambda: F.dequantize_4bit(packed, _qs4(dtype=torch.int8)), TypeError,
             "quant_state.dtype must be"),
        Case("dq4/state-code-length", lambda: F.dequantize_4bit(packed, _qs4(code=torch.zeros(3))), ValueError,
             "16 values"),
        Case("dq4/nested-offset-missing", lambda: F.dequantize_4bit(packed_n, _qs4(True, offset=None)), ValueError,
             "offset"),
        Case("dq4/nested-offset-vector", lambda: F.dequantize_4bit(packed_n, _qs4(True, offset=torch.zeros(3))),
             ValueError, "float32 scalar"),
        Case("dq4/nested-absmax-float", lambda: F.dequantize_4bit(packed_n, _qs4(True, absmax=torch.ones(16))),
             TypeError, "uint8 codes"),
        Case("dq4/nested-state2-absmax-short", lambda: F.dequantize_4bit(packed_n, _qs4(True, state2=QuantState(
             absmax=torch.ones(0), code=CODE, blocksize=256, dtype=torch.float32))), ValueError, "need 1"),
        Case("dq4/nested-state2-code-short", lambda: F.dequantize_4bit(packed_n, _qs4(True, state2=QuantState(
             absmax=qs_n.state2.absmax, code=CODE[:5], blocksize=256, dtype=torch.float32))), ValueError, "256 values"),
        Case("dq4/nested-state2-not-state", lambda: F.dequantize_4bit(packed_n, _qs4(True, state2="x")), TypeError,
             "state2 must be a QuantState"),
        Case("dq4/packed-on-meta", lambda: F.dequantize_4bit(packed.to(META), qs), ValueError, "meta"),
        Case("dq4/out-wrong-shape", lambda: F.dequantize_4bit(packed, qs, out=torch.empty(3)), ValueError,
             r"shape \(16, 64\)"),
        # matmul_4bit / gemv_4bit
        Case("mm/wrong-features", lambda: kbit.matmul_4bit(_randn(2, 63), packed, qs), ValueError,
             "input has 63 features.*the weight expects 64"),
        Case("mm/0-dim-input", lambda: kbit.matmul_4bit(torch.tensor(1.0), packed, qs), ValueError, "features"),
        Case("mm/int-input", lambda: kbit.matmul_4bit(torch.ones(2, 64, dtype=torch.int32), packed, qs), TypeError,
             "float32"),
        Case("mm/no-state", lambda: kbit.matmul_4bit(A, packed, None), ValueError, "quant_state is required"),
        Case("mm/state-3d", lambda: kbit.matmul_4bit(A, packed, _qs4(shape=(4, 4, 64))), ValueError, "2-D"),
        Case("mm/state-quant-type-none", lambda: kbit.matmul_4bit(A, packed, _qs4(quant_type=None)), ValueError, "'nf4'"),
        Case("mm/state-blocksize-none", lambda: kbit.matmul_4bit(A, packed, _qs4(blocksize=None)), TypeError, "an int"),
        Case("mm/packed-short", lambda: kbit.matmul_4bit(A, packed[:5], qs), ValueError, "needs 512"),
        Case("mm/absmax-short", lambda: kbit.matmul_4bit(A, packed, _qs4(absmax=qs.absmax[:4])), ValueError, "need 16"),
        Case("mm/bias-length", lambda: kbit.matmul_4bit(A, packed, qs, bias=torch.ones(3)), ValueError,
             "bias must have 16 values"),
        Case("mm/bias-int", lambda: kbit.matmul_4bit(A, packed, qs, bias=torch.ones(16, dtype=torch.int64)), TypeError,
             "bias must be a float tensor"),
        Case("mm/bias-on-meta", lambda: kbit.matmul_4bit(A, packed, qs, bias=torch.ones(16, device=META)), ValueError,
             "bias is on meta"),
        Case("mm/out-wrong-shape", lambda: kbit.matmul_4bit(A, packed, qs, out=torch.empty(3)), ValueError,
             r"out must be a torch.float32 tensor of shape \(2, 16\)"),
        Case("mm/input-on-meta", lambda: kbit.matmul_4bit(A.to(META), packed, qs), ValueError, "meta"),
        Case("mm/weight-on-meta", lambda: kbit.matmul_4bit(A, packed.to(META), qs), ValueError,
             "packed weight B is on meta"),
        Case("mm/nested-offset-missing", lambda: kbit.matmul_4bit(A, packed_n, _qs4(True, offset=None)), ValueError,
             "offset"),
        Case("mm/nested-absmax-float", lambda: kbit.matmul_4bit(A, packed_n, _qs4(True, absmax=torch.ones(16))),
             TypeError, "uint8 codes"),
        Case("gemv/no-state", lambda: F.gemv_4bit(A[:1], packed), ValueError, "state cannot be None"),
        Case("gemv/transposed", lambda: F.gemv_4bit(A[:1], packed, state=qs, transposed_A=True), ValueError,
             "not supported"),
        Case("gemv/state-type", lambda: F.gemv_4bit(A[:1], packed, state="x"), TypeError, "QuantState"),
        Case("gemv/wrong-features", lambda: F.gemv_4bit(_randn(1, 65), packed, state=qs), ValueError, "65 features"),
    ]


# ---- the ops, through every implementation -----------------------------------------------------------------
def _quant_op_cases() -> list[tuple[str, str, tuple, dict, type, str]]:
    """(id, op, args, kwargs, exception, pattern) for the quantization ops."""
    packed, qs = _q4()
    packed_n, qs_n = _q4(nested=True)
    codes8, qs8 = _q8()
    x = _randn(300)
    A = _randn(2, 64)
    nested = dict(absmax_8bit=qs_n.absmax, absmax_code=qs_n.state2.code, absmax_offset=qs_n.offset)
    return [
        ("int-input", "quantize_blockwise", (torch.ones(4, dtype=torch.int32), CODE, 64), {}, TypeError, "float32"),
        ("code-short", "quantize_blockwise", (x, CODE[:3], 64), {}, ValueError, "256 values"),
        ("blocksize-0", "quantize_blockwise", (x, CODE, 0), {}, ValueError, "positive"),
        ("code-meta", "quantize_blockwise", (x, CODE.to(META), 64), {}, ValueError, "code is on meta"),
        ("absmax-short", "dequantize_blockwise", (codes8, qs8.absmax[:2], CODE, 64, torch.float32), {}, ValueError,
         "need 5"),
        ("float-codes", "dequantize_blockwise", (x, qs8.absmax, CODE, 64, torch.float32), {}, TypeError, "uint8"),
        ("dtype-int", "dequantize_blockwise", (codes8, qs8.absmax, CODE, 64, torch.int32), {}, TypeError, "dtype"),
        ("out-shape", "dequantize_blockwise.out", (codes8, qs8.absmax, CODE, 64, torch.float32),
         dict(out=torch.empty(5)), ValueError, "out must be"),
        ("blocksize-48", "quantize_4bit", (x, 48, "nf4", torch.uint8), {}, ValueError, "one of 32"),
        ("quant-type", "quantize_4bit", (x, 64, "int4", torch.uint8), {}, ValueError, "'nf4' or 'fp4'"),
        ("storage-int32", "quantize_4bit", (x, 64, "nf4", torch.int32), {}, TypeError, "quant_storage"),
        ("packed-short", "dequantize_4bit", (packed[:3], qs.absmax, 64, "nf4", [16, 64], torch.float32), {},
         ValueError, "needs 512"),
        ("shape-negative", "dequantize_4bit", (packed, qs.absmax, 64, "nf4", [-16, -64], torch.float32), {},
         ValueError, "non-negative"),
        ("absmax-short", "dequantize_4bit", (packed, qs.absmax[:1], 64, "nf4", [16, 64], torch.float32), {},
         ValueError, "need 16"),
        ("absmax-int", "dequantize_4bit", (packed, qs.absmax.int(), 64, "nf4", [16, 64], torch.float32), {},
         TypeError, "absmax must be float32"),
        ("out-dtype", "dequantize_4bit.out", (packed, qs.absmax, 64, "nf4", [16, 64], torch.float32),
         dict(out=torch.empty(16, 64, dtype=torch.half)), ValueError, "out must be"),
        ("shapeB-3d", "gemm_4bit", (A, packed, [16, 64, 1], qs.absmax, 64, "nf4"), {}, ValueError, r"\[N, K\]"),
        ("shapeB-negative", "gemm_4bit", (A, packed, [-16, 64], qs.absmax, 64, "nf4"), {}, ValueError, "non-negative"),
        ("features", "gemm_4bit", (_randn(2, 32), packed, [16, 64], qs.absmax, 64, "nf4"), {}, ValueError,
         "32 features"),
        ("B-meta", "gemm_4bit", (A, packed.to(META), [16, 64], qs.absmax, 64, "nf4"), {}, ValueError, "B is on meta"),
        ("bias-float64-ok-but-meta", "gemm_4bit", (A, packed, [16, 64], qs.absmax, 64, "nf4", torch.ones(16, device=META)),
         {}, ValueError, "bias is on meta"),
        ("nested-partial", "gemm_4bit", (A, packed_n, [16, 64], qs_n.state2.absmax, 64, "nf4", None, qs_n.absmax), {},
         ValueError, "together"),
        ("nested-codes-short", "gemm_4bit", (A, packed_n, [16, 64], qs_n.state2.absmax, 64, "nf4", None),
         dict(nested, absmax_8bit=qs_n.absmax[:3]), ValueError, "3 codes"),
        ("nested-offset-vector", "gemm_4bit", (A, packed_n, [16, 64], qs_n.state2.absmax, 64, "nf4", None),
         dict(nested, absmax_offset=torch.zeros(2)), ValueError, "scalar"),
        ("nested-absmax-long", "gemm_4bit", (A, packed_n, [16, 64], torch.ones(4), 64, "nf4", None), nested,
         ValueError, "nested absmax has 4 values"),
    ]


N_OPT = 1000


def _optim_args(name: str, eight_bit: bool = True, **changes) -> dict:
    """Valid arguments of optimizer op ``name`` by schema name (one parameter of N_OPT elements), then ``changes``."""
    rows = _optim_ops.OP_ROWS[name]
    g = torch.Generator().manual_seed(1)
    arg: dict = dict(params=[torch.randn(N_OPT, generator=g)], grads=[torch.randn(N_OPT, generator=g) * 0.01],
                     lr=[1e-3], step=[1], gnorm_scale=[1.0], blocksize=256 if eight_bit else 0, unorm_out=[],
                     qmaps=[CODE, UCODE][: len(rows)] if eight_bit else [])
    for j, r in enumerate(rows, start=1):
        shape = (r, N_OPT) if r > 1 else (N_OPT,)
        arg[f"state{j}"] = [torch.zeros(shape, dtype=torch.uint8 if eight_bit else torch.float32)]
        arg[f"absmax{j}"] = [torch.full((r, 4) if r > 1 else (4,), 1e-3)] if eight_bit else []
    for spec in _optim_ops.OPTIM_SCHEMAS[name].split("->")[0].strip(" ()").split(", "):
        typ, key = spec.split()[0], spec.split()[-1]
        if "=" in key:  # an argument with a default: left to it
            continue
        if key not in arg:
            if typ == "float[]":  # AdEMAMix's per-tensor beta3 and alpha
                arg[key] = [0.999 if key == "beta3" else 2.0]
            else:
                arg[key] = False if typ == "bool" else (0.0 if key in ("max_unorm", "weight_decay") else 0.9)
    arg.update(changes)
    return arg


def _call_optim(impl, name: str, arg: dict) -> None:
    impl(*[arg[k] for k in _optim_ops.arg_names(name) if k in arg])  # trailing defaulted arguments may be left out


def _optim_op_cases(name: str) -> list[tuple[str, dict, bool, type, str]]:
    """(id, changes, eight_bit, exception, pattern) for optimizer op ``name``."""
    two_rows = _optim_ops.OP_ROWS[name][0] == 2
    full = (2, N_OPT) if two_rows else (N_OPT,)
    cases = [
        ("state-short", dict(state1=[torch.zeros(10, dtype=torch.uint8)]), True, ValueError, "state1 of parameter 0"),
        ("state-float16", dict(state1=[torch.zeros(full, dtype=torch.float16)]), True, TypeError,
         "uint8 .8-bit. or float32 .32-bit."),
        ("state-meta", dict(state1=[torch.zeros(full, dtype=torch.uint8, device=META)]), True, ValueError, "on meta"),
        ("32bit-state-short", dict(state1=[torch.zeros(10)]), False, ValueError, "state1 of parameter 0"),
        ("32bit-with-qmaps", dict(qmaps=[CODE]), False, ValueError, "take no absmax or code maps"),
        ("absmax-short", dict(absmax1=[torch.ones(2)]), True, ValueError, "absmax1 of parameter 0 has 2 values"),
        ("absmax-float16", dict(absmax1=[torch.ones((2, 4) if two_rows else 4, dtype=torch.float16)]), True, TypeError,
         "absmax1 of parameter 0 must be float32"),
        ("absmax-missing", dict(absmax1=[]), True, ValueError, "one entry per parameter"),
        ("qmaps-missing", dict(qmaps=[]), True, ValueError, "code map for every state"),
        ("qmap-short", dict(qmaps=[CODE[:10]] + [UCODE] * (len(_optim_ops.OP_ROWS[name]) - 1)), True, ValueError,
         "256 float32 values"),
        ("blocksize-negative", dict(blocksize=-1), True, ValueError, "blocksize must be in 1..4096"),
        ("blocksize-8192", dict(blocksize=8192), True, ValueError, "blocksize must be in 1..4096"),
        ("blocksize-mismatch", dict(blocksize=100), True, ValueError, "blocks of 100"),
        ("lr-length", dict(lr=[]), True, ValueError, "one entry per parameter"),
        ("step-0", dict(step=[0]), True, ValueError, "step must be >= 1"),
        ("grad-shape", dict(grads=[torch.randn(5)]), True, ValueError, "gradient must match"),
        ("grad-dtype", dict(grads=[torch.randn(N_OPT, dtype=torch.float16)]), True, ValueError, "gradient must match"),
        ("param-int", dict(params=[torch.ones(N_OPT, dtype=torch.int32)], grads=[torch.ones(N_OPT, dtype=torch.int32)]),
         True, TypeError, "float32, float16 or bfloat16"),
        ("param-float64", dict(params=[torch.ones(N_OPT, dtype=torch.float64)],
                               grads=[torch.ones(N_OPT, dtype=torch.float64)]), True, TypeError, "float64"),
    ]
    bf16 = dict(params=[torch.randn(N_OPT).bfloat16()], grads=[torch.randn(N_OPT).bfloat16()])
    cases += [
        ("sr-seed-float32-param", dict(sr_seed=[1]), True, ValueError, "bfloat16 parameters only"),
        ("sr-seed-length", dict(bf16, sr_seed=[1, 2]), True, ValueError, "sr_seed must be empty or have one entry"),
        ("sr-seed-negative", dict(bf16, sr_seed=[-1]), True, ValueError, "0..2"),
    ]
    if name in ("adam_step_", "lion_step_", "momentum_step_"):  # 4-bit states: two codes per byte, 16-value maps
        maps = [torch.linspace(-1, 1, 16), torch.linspace(0, 1, 16)][: len(_optim_ops.OP_ROWS[name])]
        four = dict(qmaps=maps, blocksize=128, **{f"absmax{j}": [torch.ones(8)] for j in (1, 2)},
                    **{f"state{j}": [torch.zeros(500, dtype=torch.uint8)] for j in (1, 2)})
        cases += [
            ("4bit-state-sized-for-8bit", dict(four, state1=[torch.zeros(N_OPT, dtype=torch.uint8)]), True, ValueError,
             "needs 1 x 500"),
            ("4bit-odd-blocksize", dict(four, blocksize=127, **{f"absmax{j}": [torch.ones(8)] for j in (1, 2)}), True,
             ValueError, "even blocksize"),
            ("4bit-maps-mixed", dict(four, qmaps=[torch.linspace(-1, 1, 16), CODE][: len(maps)] if len(maps) == 2
                                     else [CODE]), True, ValueError, "must be 16 float32 values|needs 1 x 1000"),
        ]
    if len(_optim_ops.OP_ROWS[name]) == 2:
        cases.append(("states-mixed", dict(state2=[torch.zeros(N_OPT)]), True, TypeError, "same dtype"))
    else:
        cases.append(("32bit-state-with-absmax", dict(state1=[torch.zeros(full)]), True, ValueError,
                      "take no absmax or code maps"))
    if "unorm_out" in _optim_ops.arg_names(name):
        cases.append(("unorm-size", dict(unorm_out=[torch.zeros(3)], max_unorm=1.0), True, ValueError,
                      r"unorm_out\[0\] must be one float32 value"))
    return cases


def _table():
    rows = [pytest.param(c.call, c.exc, c.match, id=c.id) for c in _cases_functional()]
    impls = {"native": lambda name: _resolve(torch.ops.kbit, name),
             "reference": lambda name: getattr(reference, name.replace(".out", "_out"))}
    for impl_name, get in impls.items():
        for cid, op, args, kwargs, exc, match in _quant_op_cases():
            rows.append(pytest.param((lambda get=get, op=op, args=args, kwargs=kwargs: get(op)(*args, **kwargs)),
                                     exc, match, id=f"op/{impl_name}/{op}/{cid}"))
    for impl_name, mod in {"native": torch.ops.kbit, "reference": reference_optim}.items():
        for name in _optim_ops.OPTIM_SCHEMAS:
            for cid, changes, eight_bit, exc, match in _optim_op_cases(name):
                call = (lambda mod=mod, name=name, changes=changes, eight_bit=eight_bit:
                        _call_optim(getattr(mod, name), name, _optim_args(name, eight_bit, **changes)))
                rows.append(pytest.param(call, exc, match, id=f"op/{impl_name}/{name}/{cid}"))
    rows += [pytest.param(c.call, c.exc, c.match, id=c.id) for c in _cases_modules() + _cases_optimizers()]
    return rows


def _resolve(ns, name):
    base, _, overload = name.partition(".")
    op = getattr(ns, base)
    return getattr(op, overload) if overload else op


# ---- layers and optimizers ---------------------------------------------------------------------------------
def _linear():
    torch.manual_seed(0)
    return knn.LinearNF4(64, 16).to("cpu")


def _cases_modules() -> list[Case]:
    lin = _linear()
    return [
        Case("Linear4bit/quant-type", lambda: knn.Linear4bit(64, 16, quant_type="int4"), ValueError, "'nf4' or 'fp4'"),
        Case("Linear4bit/blocksize", lambda: knn.Linear4bit(64, 16, blocksize=48), ValueError, "blocksize must be one of"),
        Case("Linear4bit/quant-storage", lambda: knn.Linear4bit(64, 16, quant_storage=torch.int32), TypeError,
             "quant_storage"),
        Case("Linear4bit/compute-dtype", lambda: knn.Linear4bit(64, 16, compute_dtype=torch.int32).to("cpu")(
             _randn(2, 64)), TypeError, "computes in float32"),
        Case("Linear4bit/forward-features", lambda: lin(_randn(2, 63)), ValueError, "63 features"),
        Case("Linear4bit/forward-0-dim", lambda: lin(torch.tensor(1.0)), ValueError, "features"),
        Case("Linear4bit/forward-meta", lambda: lin(_randn(2, 64).to(META)), ValueError, "meta"),
        Case("Params4bit/blocksize", lambda: knn.Params4bit(_randn(4, 4), blocksize=3), ValueError, "blocksize"),
        Case("Params4bit/quant-type", lambda: knn.Params4bit(_randn(4, 4), quant_type="q4"), ValueError, "'nf4'"),
        Case("Params4bit/unknown-kwarg", lambda: knn.Params4bit(_randn(4, 4), blocksiz=64), TypeError, "blocksiz"),
        Case("Params4bit/quantized-without-state", lambda: knn.Params4bit(torch.zeros(8, 1, dtype=torch.uint8),
             bnb_quantized=True), ValueError, "needs its quant_state"),
        Case("Params4bit/int-weight", lambda: knn.Params4bit(torch.ones(4, 4, dtype=torch.int32)).to("cpu"), TypeError,
             "float weight"),
        Case("Embedding4bit/quant-type", lambda: knn.Embedding4bit(10, 64, quant_type="x"), ValueError, "'nf4'"),
        Case("Embedding4bit/blocksize", lambda: knn.Embedding4bit(10, 64, blocksize=100), ValueError, "blocksize"),
        Case("Embedding4bit/float-indices", lambda: knn.EmbeddingNF4(10, 64).to("cpu")(torch.tensor([1.0])),
             TypeError, "indices must be int64 or int32"),
        Case("Embedding8bit/float-indices", lambda: knn.Embedding8bit(10, 64)(torch.tensor([1.0])), TypeError,
             "indices must be int64"),
        # Out-of-range rows raise torch's own IndexError, as nn.Embedding does (torch checks before reading).
        Case("Embedding4bit/index-out-of-range", lambda: knn.EmbeddingNF4(10, 64).to("cpu")(torch.tensor([10])),
             IndexError, "index out of range"),
        Case("Embedding4bit/index-out-of-range-partial-rows", lambda: knn.EmbeddingNF4(10, 48).to("cpu")(
             torch.tensor([-1])), IndexError, "index out of range"),
        Case("Embedding8bit/index-out-of-range", lambda: knn.Embedding8bit(10, 64)(torch.tensor([11])), IndexError,
             "index out of range"),
    ]


def _param(n=5000, dtype=torch.float32):
    return torch.nn.Parameter(_randn(n, dtype=dtype))


def _step(opt_factory, param, grad):
    opt = opt_factory([param])
    param.grad = grad
    opt.step()


def _cases_optimizers() -> list[Case]:
    p = _param()
    return [
        Case("optim/lr-negative", lambda: O.Adam8bit([p], lr=-1.0), ValueError, "learning rate"),
        Case("optim/lr-nan", lambda: O.Adam([p], lr=float("nan")), ValueError, "learning rate"),
        Case("optim/eps-negative", lambda: O.Adam([p], eps=-1.0), ValueError, "epsilon"),
        Case("optim/weight-decay-negative", lambda: O.AdamW([p], weight_decay=-0.1), ValueError, "weight_decay"),
        Case("optim/beta-1", lambda: O.Adam8bit([p], betas=(1.0, 0.999)), ValueError, "beta parameter at index 0"),
        Case("optim/betas-short", lambda: O.Adam8bit([p], betas=(0.9,)), ValueError, "at least 2 numbers"),
        Case("optim/betas-garbage-string", lambda: O.Adam8bit([p], betas="abc"), ValueError, "abc"),
        Case("optim/ademamix-two-betas", lambda: O.AdEMAMix([p], betas=(0.9, 0.999)), ValueError, "three betas"),
        Case("optim/optim-bits", lambda: O.Adam([p], optim_bits=16), ValueError, "optim_bits must be"),
        Case("optim/percentile-0", lambda: O.Adam([p], percentile_clipping=0), ValueError, "percentile_clipping"),
        Case("optim/percentile-float", lambda: O.Adam([p], percentile_clipping=95.5), ValueError, "an int"),
        Case("optim/min-8bit-size", lambda: O.Adam8bit([p], min_8bit_size=-1), ValueError, "min_8bit_size"),
        Case("optim/max-unorm-negative", lambda: O.LAMB([p], max_unorm=-1.0), ValueError, "max_unorm"),
        Case("optim/lion-no-trust-ratio", lambda: _step(lambda ps: O.Optimizer1State("lion", ps, max_unorm=1.0), _param(),
             _randn(5000)), ValueError, "not implemented for lion"),
        Case("optim/step-int-param", lambda: _step(O.Adam8bit, torch.nn.Parameter(torch.ones(4, dtype=torch.int32),
             requires_grad=False), torch.ones(4, dtype=torch.int32)), TypeError, "float32, float16 or bfloat16"),
        Case("optim/step-float64-param", lambda: _step(O.Adam8bit, _param(dtype=torch.float64),
             _randn(5000, dtype=torch.float64)), TypeError, "float64"),
        Case("optim/step-complex-param", lambda: _step(O.Adam, torch.nn.Parameter(torch.ones(4, dtype=torch.complex64)),
             torch.ones(4, dtype=torch.complex64)), TypeError, "complex"),
        # torch.optim and bitsandbytes raise RuntimeError for sparse gradients; kept for compatibility.
        Case("optim/step-sparse-grad", lambda: _step(O.Adam8bit, _param(), _randn(5000).to_sparse()), RuntimeError,
             "sparse gradients"),
    ]


@pytest.mark.parametrize("call, exc, match", _table())
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc or (exc is ValueError and isinstance(info.value, ValueError)), \
        f"raised {type(info.value).__name__}: {info.value}"
    assert re.search(match, str(info.value)), f"message does not name the problem: {info.value}"


def test_every_op_has_cases():
    """Every torch.ops.kbit op has rows in the table (a new op must add its own)."""
    covered = {op.split(".")[0] for _, op, *_ in _quant_op_cases()} | set(_optim_ops.OPTIM_SCHEMAS)
    all_ops = {name.split(".")[0] for name in _ops.OP_NAMES} | set(_optim_ops.OPTIM_SCHEMAS)
    assert all_ops <= covered, sorted(all_ops - covered)


@pytest.mark.parametrize("name", list(_optim_ops.OPTIM_SCHEMAS))
@pytest.mark.parametrize("eight_bit", [True, False], ids=["8bit", "32bit"])
def test_optim_table_baseline_is_valid(name, eight_bit):
    """The rows above change one argument of a valid call: the valid call itself runs everywhere, so each row
    fails for the reason it names."""
    for impl in (getattr(torch.ops.kbit, name), getattr(reference_optim, name)):
        _call_optim(impl, name, _optim_args(name, eight_bit))


def test_quant_op_baselines_are_valid():
    packed, qs = _q4()
    packed_n, qs_n = _q4(nested=True)
    A = _randn(2, 64)
    for ns in (torch.ops.kbit, reference):
        ns.gemm_4bit(A, packed, [16, 64], qs.absmax, 64, "nf4")
        ns.gemm_4bit(A, packed_n, [16, 64], qs_n.state2.absmax, 64, "nf4", None, qs_n.absmax, qs_n.state2.code,
                     qs_n.offset)
    kbit.matmul_4bit(A, packed, qs, bias=torch.ones(16, dtype=torch.float64))  # any float bias is cast


def test_meta_tensors_give_shapes_only():
    """All-meta inputs are valid: the fake kernels return meta outputs of the right shapes (torch.compile and
    model loaders rely on it). Only *mixed* devices are errors (rows above)."""
    x = torch.empty(300, device=META)
    packed, qs = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert packed.device == META and packed.shape == (150, 1) and qs.absmax.shape == (5,)
    codes, qs8 = F.quantize_blockwise(x, blocksize=64)
    assert codes.device == META and qs8.absmax.shape == (5,)


@pytest.mark.parametrize("name", list(_optim_ops.OPTIM_SCHEMAS))
def test_optim_op_errors_leave_tensors_untouched(name):
    """A rejected optimizer call writes nothing (checks run before the kernel)."""
    arg = _optim_args(name, True, absmax1=[torch.ones(2)])
    before = [t.clone() for t in arg["params"] + arg["state1"]]
    with pytest.raises(ValueError):
        _call_optim(getattr(torch.ops.kbit, name), name, arg)
    assert all(torch.equal(a, b) for a, b in zip(arg["params"] + arg["state1"], before))


def test_non_contiguous_inputs_are_computed_not_rejected():
    """Contiguity is never a user error: strided inputs and outputs give the contiguous results."""
    x = _randn(600)[::2]
    codes, qs8 = F.quantize_blockwise(x, blocksize=64)
    assert torch.equal(codes, F.quantize_blockwise(x.contiguous(), blocksize=64)[0])
    out = torch.empty(600)[::2]
    F.dequantize_blockwise(codes, qs8, out=out)
    assert torch.equal(out, F.dequantize_blockwise(codes, qs8))
    w = _randn(64, 16).t()
    packed, qs = F.quantize_4bit(w, quant_type="nf4")
    assert torch.equal(packed, F.quantize_4bit(w.contiguous(), quant_type="nf4")[0])
    A = _randn(64, 3).t()
    assert torch.equal(kbit.matmul_4bit(A, packed, qs), kbit.matmul_4bit(A.contiguous(), packed, qs))
