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


def check_group(params, grads, states, lr, step, gnorm_scale) -> None:
    """Shape and dtype checks shared by every implementation (fake ones included)."""
    n = len(params)
    if len(grads) != n or len(lr) != n or len(step) != n or len(gnorm_scale) != n:
        raise ValueError("params, grads, lr, step and gnorm_scale must have one entry per parameter")
    for state in states:
        if len(state) != n:
            raise ValueError("every state list must have one entry per parameter")
    for p, g in zip(params, grads):
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(
                f"a gradient must match its parameter's shape, dtype and device (parameter {tuple(p.shape)} "
                f"{p.dtype} on {p.device}, gradient {tuple(g.shape)} {g.dtype} on {g.device})"
            )
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"parameters must be float32, float16 or bfloat16 (got {p.dtype})")
    for s in step:
        if s < 1:
            raise ValueError(f"step must be >= 1: it counts the step being taken (got {s})")


def _fake(name: str):
    """Fake kernel of one op: the shared checks, with arguments found by name in its schema (not by offset)."""
    names = [arg.split()[-1].split("=")[0] for arg in OPTIM_SCHEMAS[name].split("->")[0].strip(" ()").split(", ")]
    states = [i for i, n in enumerate(names) if n in ("state1", "state2")]

    def fake(*args, **kwargs):
        arg = dict(zip(names, args))
        arg.update(kwargs)
        check_group(arg["params"], arg["grads"], [args[i] for i in states], arg["lr"], arg["step"], arg["gnorm_scale"])

    torch.library.register_fake(f"{LIBRARY}::{name}", fake)


for _name in OPTIM_SCHEMAS:
    _fake(_name)
