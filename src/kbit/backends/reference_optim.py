"""Pure-PyTorch optimizer steps: the specification of the fused optimizer ops, for every device.

Every float32 operation happens in the order csrc/cpu/optim_rules.h performs it (plain multiplies and
adds: no addcmul, lerp or alpha=, which may fuse), and the per-tensor scalars are computed in float64
and rounded once, as csrc/optim_bindings.cpp does. Without a trust ratio the native kernels therefore
match this module bit for bit; with one (max_unorm > 0) the norms are summed in a different order and
agree to float64 rounding.
"""

from __future__ import annotations

import math
import struct
from typing import Callable, Sequence

import torch

from .. import _optim_ops
from .._ops import implements
from . import reference


def f32(x: float) -> float:
    """x rounded to the nearest float32 (the kernels receive their scalars as float32)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


# ---- states: dequantize / requantize ---------------------------------------------------------------
class _StateIO:
    """Reads the logical states of one tensor as float32 and writes them back (quantized in 8-bit mode)."""

    def __init__(self, storages: Sequence[torch.Tensor], absmaxes: Sequence[torch.Tensor] | None,
                 qmaps: Sequence[torch.Tensor], rows: Sequence[int], n: int, blocksize: int):
        self.storages, self.absmaxes, self.qmaps, self.rows, self.n = storages, absmaxes, qmaps, rows, n
        self.eight_bit = storages[0].dtype == torch.uint8  # quantized (8-bit, or 4-bit with 16-value maps)
        self.four_bit = self.eight_bit and qmaps[0].numel() == 16  # Note [4-bit optimizer states]
        self.row_size = (n + 1) // 2 if self.four_bit else n
        self.blocksize = blocksize if blocksize > 0 else max(n, 1)

    def _codes(self, packed_row: torch.Tensor) -> torch.Tensor:
        if not self.four_bit:
            return packed_row
        return torch.stack([packed_row >> 4, packed_row & 0x0F], dim=1).reshape(-1)[: self.n]

    def _quantize(self, values: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise absmax and exact-nearest codes (8-bit: the quantize_blockwise op's reference; 4-bit: the
        same rule over a 16-value map)."""
        if not self.four_bit:
            return reference.quantize_blockwise(values, qmap, self.blocksize)
        absmax, scaled, _ = reference.absmax_and_scaled(values, self.blocksize)
        return reference.count_below(reference.midpoints(qmap), scaled).to(torch.uint8), absmax

    def _packed(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.four_bit:
            return codes
        pairs = torch.cat([codes.reshape(-1), codes.new_zeros(self.n % 2)]).reshape(-1, 2)
        return (pairs[:, 0] << 4) | pairs[:, 1]

    def read(self) -> list[torch.Tensor]:
        out = []
        for j, storage in enumerate(self.storages):
            flat = storage.reshape(self.rows[j], self.row_size if self.eight_bit else self.n)
            for r in range(self.rows[j]):
                if self.eight_bit:
                    absmax = self.absmaxes[j].reshape(self.rows[j], -1)[r]
                    out.append(reference._dequantize_blockwise(self._codes(flat[r]), absmax, self.qmaps[j],
                                                               self.blocksize, torch.float32))
                else:
                    out.append(flat[r].clone())
        return out

    def write(self, states: Sequence[torch.Tensor]) -> None:
        k = 0
        for j, storage in enumerate(self.storages):
            flat = storage.view(self.rows[j], self.row_size if self.eight_bit else self.n)
            for r in range(self.rows[j]):
                if self.eight_bit:
                    codes, absmax = self._quantize(states[k], self.qmaps[j])
                    flat[r].copy_(self._packed(codes))
                    self.absmaxes[j].view(self.rows[j], -1)[r].copy_(absmax)
                else:
                    flat[r].copy_(states[k])
                k += 1


# ---- the rules (csrc/cpu/optim_rules.h) --------------------------------------------------------------
def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (IEEE sqrt, as the kernels' sqrtps). torch's own float32 sqrt
    is off by one ulp for some inputs on CPU; float64 sqrt rounded to float32 is exact for float32 input."""
    return x.double().sqrt().float()



# Each rule takes its hyper-parameters in float64 and rounds every scalar once, as the bindings do
# (1 - beta is computed before rounding, not from the rounded beta).
def _adam_rule(beta1, beta2, eps, decay, bc2):
    def rule(p, g, s):
        p = p * f32(decay)
        s[0] = s[0] * f32(beta1) + g * f32(1.0 - beta1)
        s[1] = s[1] * f32(beta2) + (g * g) * f32(1.0 - beta2)
        return p, s[0] / (_sqrt(s[1]) * f32(1.0 / bc2) + f32(eps))

    return rule


def _ademamix_rule(beta1, beta2, beta3, alpha, eps, decay, bc1, bc2):
    def rule(p, g, s):
        p = p * f32(decay)
        s[0] = s[0] * f32(beta1) + g * f32(1.0 - beta1)
        s[1] = s[1] * f32(beta3) + g * f32(1.0 - beta3)
        s[2] = s[2] * f32(beta2) + (g * g) * f32(1.0 - beta2)
        denom = _sqrt(s[2]) * f32(1.0 / bc2) + f32(eps)
        return p, (s[0] * f32(1.0 / bc1) + s[1] * f32(alpha)) / denom

    return rule


def _sign(x: torch.Tensor) -> torch.Tensor:
    """sign() as csrc/cpu/optim_rules.h computes it: +-1, with zeros (of either sign) and NaN passed through.
    Not torch.sign, which maps NaN and -0.0 to +0.0: a NaN Lion state would silently freeze its parameter
    instead of showing up as NaN (docs/numerics.md)."""
    return torch.where(x > 0, 1.0, torch.where(x < 0, -1.0, x))


def _lion_rule(beta1, beta2, decay):
    def rule(p, g, s):
        p = p * f32(decay)
        u = _sign(s[0] * f32(beta1) + g * f32(1.0 - beta1))
        s[0] = s[0] * f32(beta2) + g * f32(1.0 - beta2)
        return p, u

    return rule


def _momentum_rule(momentum, dampening, weight_decay, nesterov, first):
    def rule(p, g, s):
        if weight_decay != 0.0:
            g = g + p * f32(weight_decay)
        s[0] = g.clone() if first else s[0] * f32(momentum) + g * f32(1.0 - dampening)
        return p, (g + s[0] * f32(momentum)) if nesterov else s[0]

    return rule


def _rmsprop_rule(alpha, eps, weight_decay):
    def rule(p, g, s):
        if weight_decay != 0.0:
            g = g + p * f32(weight_decay)
        s[0] = s[0] * f32(alpha) + (g * g) * f32(1.0 - alpha)
        return p, g / (_sqrt(s[0]) + f32(eps))

    return rule


def _adagrad_rule(eps, weight_decay):
    def rule(p, g, s):
        if weight_decay != 0.0:
            g = g + p * f32(weight_decay)
        s[0] = s[0] + g * g
        return p, g / (_sqrt(s[0]) + f32(eps))

    return rule


# ---- Note [stochastic rounding] (csrc/cpu/scalar_ops.h) ------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, in 16-bit halves so nothing overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sr_bits_at(seed: int, index: torch.Tensor) -> torch.Tensor:
    """The 32 random bits (as int64) of the elements at ``index`` (int64, >= 0):
    lowbias32(lowbias32(lo(i) ^ seed) ^ hi(i)), lo/hi the 32-bit halves of i."""
    return _lowbias32(_lowbias32((index & _MASK32) ^ int(seed)) ^ (index >> 32))


def sr_bits(seed: int, n: int, device=None) -> torch.Tensor:
    """The random bits of elements 0..n-1."""
    return sr_bits_at(seed, torch.arange(n, dtype=torch.int64, device=device))


def round_bf16_stochastic(x: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 -> bfloat16: add the low 16 random bits to the float32 pattern and truncate; NaN -> 0x7fc0."""
    flat = x.reshape(-1)
    u = flat.view(torch.int32).to(torch.int64) & _MASK32
    r = (u + (sr_bits(seed, flat.numel(), flat.device) & 0xFFFF)) >> 16
    r = torch.where(torch.isnan(flat), torch.full_like(r, 0x7FC0), r)
    return ((r ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16).reshape(x.shape)


def _write_param(p: torch.Tensor, value: torch.Tensor, sr_seed: int | None) -> None:
    """One rounding to p's dtype: to nearest even (torch's conversion), or stochastic for bfloat16."""
    if sr_seed is not None:  # bfloat16 only: _optim_ops.check_sr_seed has checked that
        value = round_bf16_stochastic(value, sr_seed)
    p.detach().copy_(value.reshape(p.shape))


def _seed(sr_seed, i: int) -> int | None:
    return int(sr_seed[i]) if sr_seed else None


def _step_tensor(p, g, io: _StateIO, rule: Callable, k: float, gnorm_scale: float, skip_zeros: bool,
                 max_unorm: float, trust_eps: float, unorm_factor: float, unorm_out, sr_seed: int | None) -> None:
    """Note [optimizer step] for one tensor, with the trust ratio of Note [trust ratio]."""
    p32 = p.detach().reshape(-1).float()
    g32 = g.detach().reshape(-1).float() * f32(gnorm_scale)
    old = io.read()
    states = [s.clone() for s in old]
    p_new, u = rule(p32, g32, states)
    if skip_zeros:
        zero = g32 == 0
        p_new = torch.where(zero, p32, p_new)
        states = [torch.where(zero, o, s) for o, s in zip(old, states)]
        u = torch.where(zero, torch.zeros_like(u), u)
    if max_unorm > 0.0:
        unorm = math.sqrt(float((u.double() ** 2).sum())) * unorm_factor
        threshold = max_unorm * math.sqrt(float((p32.double() ** 2).sum())) + trust_eps
        if unorm > threshold and unorm > 0.0:
            k = f32(k * (threshold / unorm))
        if unorm_out is not None:
            unorm_out.fill_(unorm)
    p_new = p_new - u * k
    _write_param(p, p_new, sr_seed)
    io.write(states)


def _iter_group(params, grads, storages, absmaxes, qmaps, rows, blocksize):
    eight_bit = bool(params) and storages[0][0].dtype == torch.uint8
    for i, (p, g) in enumerate(zip(params, grads)):
        io = _StateIO([s[i] for s in storages], [a[i] for a in absmaxes] if eight_bit else None,
                      list(qmaps), rows, p.numel(), blocksize)
        yield i, p, g, io


@implements("adam_step_", None)
def adam_step_(params, grads, state1, state2, absmax1, absmax2, qmaps, blocksize, lr, step, gnorm_scale, unorm_out,
               beta1, beta2, eps, weight_decay, max_unorm, skip_zeros, bias_correction, sr_seed=()):
    _optim_ops.check_op("adam_step_", locals())  # first statement: locals() are the arguments
    for i, p, g, io in _iter_group(params, grads, [state1, state2], [absmax1, absmax2], qmaps, (1, 1), blocksize):
        bc1 = 1.0 - beta1 ** step[i] if bias_correction else 1.0
        bc2 = math.sqrt(1.0 - beta2 ** step[i]) if bias_correction else 1.0
        rule = _adam_rule(beta1, beta2, eps, 1.0 - lr[i] * weight_decay, bc2)
        _step_tensor(p, g, io, rule, f32(lr[i] / bc1), gnorm_scale[i], skip_zeros, max_unorm, 0.0, 1.0 / bc1,
                     unorm_out[i] if unorm_out else None, _seed(sr_seed, i))


@implements("ademamix_step_", None)
def ademamix_step_(params, grads, state1, state2, absmax1, absmax2, qmaps, blocksize, lr, step, gnorm_scale, beta3,
                   alpha, beta1, beta2, eps, weight_decay, sr_seed=()):
    _optim_ops.check_op("ademamix_step_", locals())  # first statement: locals() are the arguments
    for i, p, g, io in _iter_group(params, grads, [state1, state2], [absmax1, absmax2], qmaps, (2, 1), blocksize):
        bc1 = 1.0 - beta1 ** step[i]
        bc2 = math.sqrt(1.0 - beta2 ** step[i])
        rule = _ademamix_rule(beta1, beta2, beta3[i], alpha[i], eps, 1.0 - lr[i] * weight_decay, bc1, bc2)
        _step_tensor(p, g, io, rule, f32(lr[i]), gnorm_scale[i], False, 0.0, 0.0, 1.0, None, _seed(sr_seed, i))


@implements("lion_step_", None)
def lion_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, beta1, beta2, weight_decay,
               skip_zeros, sr_seed=()):
    _optim_ops.check_op("lion_step_", locals())  # first statement: locals() are the arguments
    for i, p, g, io in _iter_group(params, grads, [state1], [absmax1], qmaps, (1,), blocksize):
        rule = _lion_rule(beta1, beta2, 1.0 - lr[i] * weight_decay)
        _step_tensor(p, g, io, rule, f32(lr[i]), gnorm_scale[i], skip_zeros, 0.0, 0.0, 1.0, None, _seed(sr_seed, i))


@implements("momentum_step_", None)
def momentum_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, unorm_out, momentum,
                   dampening, weight_decay, nesterov, max_unorm, trust_eps, skip_zeros, sr_seed=()):
    _optim_ops.check_op("momentum_step_", locals())  # first statement: locals() are the arguments
    for i, p, g, io in _iter_group(params, grads, [state1], [absmax1], qmaps, (1,), blocksize):
        rule = _momentum_rule(momentum, dampening, weight_decay, nesterov, step[i] == 1)
        _step_tensor(p, g, io, rule, f32(lr[i]), gnorm_scale[i], skip_zeros, max_unorm, f32(trust_eps), 1.0,
                     unorm_out[i] if unorm_out else None, _seed(sr_seed, i))


@implements("rmsprop_step_", None)
def rmsprop_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, unorm_out, alpha, eps,
                  weight_decay, max_unorm, skip_zeros, sr_seed=()):
    _optim_ops.check_op("rmsprop_step_", locals())  # first statement: locals() are the arguments
    for i, p, g, io in _iter_group(params, grads, [state1], [absmax1], qmaps, (1,), blocksize):
        rule = _rmsprop_rule(alpha, eps, weight_decay)
        _step_tensor(p, g, io, rule, f32(lr[i]), gnorm_scale[i], skip_zeros, max_unorm, f32(eps), 1.0,
                     unorm_out[i] if unorm_out else None, _seed(sr_seed, i))


@implements("adagrad_step_", None)
def adagrad_step_(params, grads, state1, absmax1, qmaps, blocksize, lr, step, gnorm_scale, eps, weight_decay, lr_decay,
                  skip_zeros, sr_seed=()):
    _optim_ops.check_op("adagrad_step_", locals())  # first statement: locals() are the arguments
    for i, p, g, io in _iter_group(params, grads, [state1], [absmax1], qmaps, (1,), blocksize):
        rule = _adagrad_rule(eps, weight_decay)
        k = f32(lr[i] / (1.0 + (step[i] - 1) * lr_decay))
        _step_tensor(p, g, io, rule, k, gnorm_scale[i], skip_zeros, 0.0, 0.0, 1.0, None, _seed(sr_seed, i))

