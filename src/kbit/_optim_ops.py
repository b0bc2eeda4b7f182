"""The fused optimizer-step ops, one per rule family: schemas and fake kernels.

Each op updates a *group* of parameters in place — tensors that share the family's hyper-parameters
and state format — so that a step over many small tensors costs one call. Per-tensor values (lr, step,
gradient scale) are lists. A 32-bit group passes empty ``absmax``/``qmaps`` lists; an 8-bit group
passes uint8 states, their absmax (``blocksize`` > 0: per block; 0: one per tensor) and one code map
per state storage. ``unorm_out`` (possibly empty) receives each tensor's update norm when
``max_unorm`` > 0. ``sr_seed`` (empty, or one 32-bit seed per tensor) asks for bfloat16 parameters to be
written with stochastic rounding (Note [stochastic rounding], csrc/cpu/scalar_ops.h). The rules are written out in csrc/cpu/optim_rules.h and in
kbit/backends/reference_optim.py, the specification.
"""

from __future__ import annotations

import torch

from ._ops import LIBRARY

_COMMON = (
    "int blocksize, float[] lr, int[] step, float[] gnorm_scale"
)

OPTIM_SCHEMAS = {
    "adam_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] absmax1, "
        f"Tensor(e!)[] absmax2, Tensor[] qmaps, {_COMMON}, Tensor(f!)[] unorm_out, float beta1, float beta2, "
        "float eps, float weight_decay, float max_unorm, bool skip_zeros, bool bias_correction, "
        "int[] sr_seed=[]) -> ()"
    ),
    "ademamix_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, Tensor(d!)[] absmax1, "
        f"Tensor(e!)[] absmax2, Tensor[] qmaps, {_COMMON}, float[] beta3, float[] alpha, float beta1, "
        "float beta2, float eps, float weight_decay, int[] sr_seed=[]) -> ()"
    ),
    "lion_step_": (
        f"(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(d!)[] absmax1, Tensor[] qmaps, {_COMMON}, "
        "float beta1, float beta2, float weight_decay, bool skip_zeros, int[] sr_seed=[]) -> ()"
    ),
    "momentum_step_": (
        f"(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(d!)[] absmax1, Tensor[] qmaps, {_COMMON}, "
        "Tensor(f!)[] unorm_out, float momentum, float dampening, float weight_decay, bool nesterov, "
        "float max_unorm, float trust_eps, bool skip_zeros, int[] sr_seed=[]) -> ()"
    ),
    "rmsprop_step_": (
        f"(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(d!)[] absmax1, Tensor[] qmaps, {_COMMON}, "
        "Tensor(f!)[] unorm_out, float alpha, float eps, float weight_decay, float max_unorm, bool skip_zeros, "
        "int[] sr_seed=[]) -> ()"
    ),
    "adagrad_step_": (
        f"(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(d!)[] absmax1, Tensor[] qmaps, {_COMMON}, "
        "float eps, float weight_decay, float lr_decay, bool skip_zeros, int[] sr_seed=[]) -> ()"
    ),
}

_lib = torch.library.Library(LIBRARY, "FRAGMENT")
for _name, _schema in OPTIM_SCHEMAS.items():
    _lib.define(_name + _schema)


#: Largest 8-bit state block the fused kernels take (kMaxFusedBlock in csrc/cpu/optim_call.h).
MAX_STATE_BLOCKSIZE = 4096
#: Logical states held by each state storage of each op (AdEMAMix's state1 stacks m1 and m2).
OP_ROWS = {"adam_step_": (1, 1), "ademamix_step_": (2, 1), "lion_step_": (1,), "momentum_step_": (1,),
           "rmsprop_step_": (1,), "adagrad_step_": (1,)}
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(message: str) -> None:
    raise ValueError(message)


def check_group(params, grads, states, lr, step, gnorm_scale, rows=None, absmaxes=None, qmaps=None,
                blocksize=None, unorm_out=None) -> None:
    """Shape, dtype and device checks shared by every implementation (fake ones included), so the reference,
    the fake and the native kernels reject the same calls with the same ValueError/TypeError. The native
    layer re-checks every size it indexes with (csrc/optim_bindings.cpp). ``rows`` (the op's OP_ROWS entry)
    switches on the checks of states, absmax, code maps, block size and ``unorm_out``."""
    n = len(params)
    if len(grads) != n or len(lr) != n or len(step) != n or len(gnorm_scale) != n:
        raise ValueError("params, grads, lr, step and gnorm_scale must have one entry per parameter")
    for state in states:
        if len(state) != n:
            raise ValueError("every state list must have one entry per parameter")
    device = params[0].device if n else None
    for p, g in zip(params, grads):
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"a gradient must match its parameter's shape, dtype and device (parameter {tuple(p.shape)} "
                f"{p.dtype} on {p.device}, gradient {tuple(g.shape)} {g.dtype} on {g.device})"
            )
        if p.dtype not in _PARAM_DTYPES:
            raise TypeError(f"parameters must be float32, float16 or bfloat16 (got {p.dtype})")
        if p.device != device:
            raise ValueError(f"all parameters of a group must be on one device (got {device} and {p.device})")
    for s in step:
        if s < 1:
            raise ValueError(f"step must be >= 1: it counts the step being taken (got {s})")
    if rows is None or n == 0:
        return
    if len(states) != len(rows):
        _fail(f"this op takes {len(rows)} state lists (got {len(states)})")
    state_dtype = states[0][0].dtype
    if state_dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"optimizer states must be uint8 (8-bit) or float32 (32-bit), got {state_dtype}")
    eight_bit = state_dtype == torch.uint8
    # 4-bit states (16-value code maps) hold two codes per byte (Note [4-bit optimizer states]).
    four_bit = eight_bit and bool(qmaps) and qmaps[0].numel() == 16
    for j, r in enumerate(rows):
        for i, (p, s) in enumerate(zip(params, states[j])):
            if s.dtype != state_dtype:
                raise TypeError(f"state{j + 1} of parameter {i} is {s.dtype}: every state of a group must have the "
                                f"same dtype ({state_dtype})")
            per_row = (p.numel() + 1) // 2 if four_bit else p.numel()
            if s.numel() != r * per_row or s.device != device:
                _fail(f"state{j + 1} of parameter {i} has {s.numel()} values on {s.device}; it needs {r} x "
                      f"{per_row} on {device} (the state does not belong to this parameter)")
    absmaxes = list(absmaxes or [])
    qmaps = list(qmaps or [])
    if not eight_bit:
        if any(len(a) for a in absmaxes) or qmaps:
            _fail("32-bit states take no absmax or code maps: pass empty lists")
    else:
        if len(absmaxes) != len(rows) or len(qmaps) != len(rows):
            _fail("8-bit states need an absmax list and a code map for every state")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 0 <= blocksize <= MAX_STATE_BLOCKSIZE:
            _fail(f"8-bit optimizer blocksize must be in 1..{MAX_STATE_BLOCKSIZE}, or 0 for one absmax per tensor "
                  f"(got {blocksize!r})")
        code_size = 16 if four_bit else 256
        for j, q in enumerate(qmaps):
            if q.dtype != torch.float32 or q.numel() != code_size or q.device != device:
                _fail(f"code map {j + 1} must be {code_size} float32 values on {device} (got {q.numel()} {q.dtype} on "
                      f"{q.device}); use kbit.functional.create_dynamic_map() (8-bit states) or "
                      "kbit.formats.OPTIMIZER_4BIT_*_MAP (4-bit states), the same size for every state")
        if four_bit and (blocksize <= 0 or blocksize % 2):
            _fail(f"4-bit optimizer states need an even blocksize > 0 (got {blocksize})")
        for j, r in enumerate(rows):
            if len(absmaxes[j]) != n:
                _fail("every absmax list must have one entry per parameter")
            for i, (p, a) in enumerate(zip(params, absmaxes[j])):
                blocks = -(-p.numel() // blocksize) if blocksize > 0 else 1
                if a.dtype != torch.float32:
                    raise TypeError(f"absmax{j + 1} of parameter {i} must be float32 (got {a.dtype})")
                if a.numel() != r * blocks or a.device != device:
                    _fail(f"absmax{j + 1} of parameter {i} has {a.numel()} values on {a.device}; {p.numel()} elements "
                          f"in blocks of {blocksize or 'the whole tensor'} need {r} x {blocks} on {device}")
    if unorm_out:
        if len(unorm_out) != n:
            _fail("unorm_out must be empty or have one entry per parameter")
        for i, u in enumerate(unorm_out):
            if u.dtype != torch.float32 or u.numel() != 1 or u.device != device:
                _fail(f"unorm_out[{i}] must be one float32 value on {device} (got {u.numel()} {u.dtype} on {u.device})")


def check_sr_seed(sr_seed, params) -> None:
    """Note [stochastic rounding]: empty, or one 32-bit seed per (bfloat16) parameter."""
    if not sr_seed:
        return
    if len(sr_seed) != len(params):
        _fail("sr_seed must be empty or have one entry per parameter")
    if any(not 0 <= int(s) <= 0xFFFFFFFF for s in sr_seed):
        _fail("sr_seed values must be in 0..2^32-1")
    if any(p.dtype != torch.bfloat16 for p in params):
        _fail("stochastic rounding applies to bfloat16 parameters only")


def check_op(name: str, arg: dict) -> None:
    """check_group for op ``name`` given its arguments by schema name."""
    check_sr_seed(arg.get("sr_seed"), arg["params"])
    nstates = len(OP_ROWS[name])
    check_group(arg["params"], arg["grads"], [arg[f"state{j + 1}"] for j in range(nstates)], arg["lr"], arg["step"],
                arg["gnorm_scale"], rows=OP_ROWS[name], absmaxes=[arg[f"absmax{j + 1}"] for j in range(nstates)],
                qmaps=arg["qmaps"], blocksize=arg["blocksize"], unorm_out=arg.get("unorm_out"))


def arg_names(name: str) -> list[str]:
    """The argument names of op ``name``, in schema order."""
    return [a.split()[-1].split("=")[0] for a in OPTIM_SCHEMAS[name].split("->")[0].strip(" ()").split(", ")]


def _fake(name: str):
    """Fake kernel of one op: the shared checks, with arguments found by name in its schema (not by offset)."""
    names = arg_names(name)

    def fake(*args, **kwargs):
        arg = dict(zip(names, args))
        arg.update(kwargs)
        check_op(name, arg)

    torch.library.register_fake(f"{LIBRARY}::{name}", fake)


for _name in OPTIM_SCHEMAS:
    _fake(_name)
