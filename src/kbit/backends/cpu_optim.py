"""CPU optimizer steps: thin calls into the native fused kernels (kbit._C, csrc/optim_bindings.cpp).

The native layer accepts only contiguous arrays (Note [no silent copies]); a non-contiguous parameter
or state is updated through a contiguous copy that is written back, so the caller always sees the
update. Optimizers keep their parameters contiguous, so that path is rare.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.dlpack import to_dlpack

from .. import _optim_ops
from .._native import _C
from .._ops import implements


class _Flat:
    """DLPack capsules of contiguous tensors (the kernels read only their element count); copies back the
    ones that were not contiguous. Capsules, not tensors: nanobind would call each tensor's Python-level
    ``__dlpack__`` (~2 us a tensor, six per parameter, and it refuses tensors that require grad), while
    ``to_dlpack`` costs a tenth of that."""

    def __init__(self):
        self._writeback: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, tensors, writable: bool = False):
        out = []
        for t in tensors:
            if t.is_contiguous():
                out.append(to_dlpack(t))
            else:
                c = t.detach().contiguous()
                if writable:
                    self._writeback.append((t, c))
                out.append(to_dlpack(c))
        return out

    def finish(self) -> None:
        for t, c in self._writeback:
            with torch.no_grad():
                t.copy_(c)


@contextlib.contextmanager
def _flat():
    f = _Flat()
    yield f
    f.finish()


def _threads() -> int:
    return torch.get_num_threads()


@implements("adam_step_", "cpu")
def adam_step_(params, grads, state1, state2, absmax1, absmax2, qmaps, blocksize, lr, step, gnorm_scale, unorm_out,
               beta1, beta2, eps, weight_decay, max_unorm, skip_zeros, bias_correction, sr_seed=()):
    _optim_ops.check_op("adam_step_", locals())  # first statement: locals() are the arguments
    with _flat() as f:
        _C.adam_step(f(params, True), f(grads), f(state1, True), f(state2, True), f(absmax1, True), f(absmax2, True),
                     f(qmaps), blocksize, list(lr), list(step), list(gnorm_scale), f(unorm_out, True), beta1, beta2,
                     eps, weight_decay, max_unorm, skip_zeros, bias_correction, list(sr_seed), _threads())


@implements("ademamix_step_", "cpu")
def ademamix_step_(params, grads, state1, state2, absmax1, absmax2, qmaps, blocksize, lr, step, gnorm_scale, beta3,
                   alpha, beta1, beta2, eps, weight_decay, sr_seed=()):
    _optim_ops.check_op("ademamix_step_", locals())  # first statement: locals() are the arguments
    with _flat() as f:
        _C.ademamix_step(f(params, True), f(grads), f(state1, True), f(state2, True), f(absmax1, True),
                         f(absmax2, True), f(qmaps), blocksize, list(lr), list(step), list(gnorm_scale), list(beta3),
                         list(alpha), beta1, beta2, eps, weight_decay, list(sr_seed), _threads())


@implements("lion_step_", "cpu")
def lion_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, beta1, beta2, weight_decay,
               skip_zeros, sr_seed=()):
    _optim_ops.check_op("lion_step_", locals())  # first statement: locals() are the arguments
    with _flat() as f:
        _C.lion_step(f(params, True), f(grads), f(state1, True), f(absmax1, True), f(qmaps), blocksize, list(lr),
                     list(step), list(gnorm_scale), beta1, beta2, weight_decay, skip_zeros, list(sr_seed), _threads())


@implements("momentum_step_", "cpu")
def momentum_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, unorm_out, momentum,
                   dampening, weight_decay, nesterov, max_unorm, trust_eps, skip_zeros, sr_seed=()):
    _optim_ops.check_op("momentum_step_", locals())  # first statement: locals() are the arguments
    with _flat() as f:
        _C.momentum_step(f(params, True), f(grads), f(state1, True), f(absmax1, True), f(qmaps), blocksize, list(lr),
                         list(step), list(gnorm_scale), f(unorm_out, True), momentum, dampening, weight_decay,
                         nesterov, max_unorm, trust_eps, skip_zeros, list(sr_seed), _threads())


@implements("rmsprop_step_", "cpu")
def rmsprop_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, unorm_out, alpha, eps,
                  weight_decay, max_unorm, skip_zeros, sr_seed=()):
    _optim_ops.check_op("rmsprop_step_", locals())  # first statement: locals() are the arguments
    with _flat() as f:
        _C.rmsprop_step(f(params, True), f(grads), f(state1, True), f(absmax1, True), f(qmaps), blocksize, list(lr),
                        list(step), list(gnorm_scale), f(unorm_out, True), alpha, eps, weight_decay, max_unorm,
                        skip_zeros, list(sr_seed), _threads())


@implements("adagrad_step_", "cpu")
def adagrad_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, eps, weight_decay, lr_decay,
                  skip_zeros, sr_seed=()):
    _optim_ops.check_op("adagrad_step_", locals())  # first statement: locals() are the arguments
    with _flat() as f:
        _C.adagrad_step(f(params, True), f(grads), f(state1, True), f(absmax1, True), f(qmaps), blocksize, list(lr),
                        list(step), list(gnorm_scale), eps, weight_decay, lr_decay, skip_zeros, list(sr_seed), _threads())
