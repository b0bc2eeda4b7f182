"""kbit optimizers on sharded (DTensor) parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Note [sharded state]
A step works on the *local shard* of each DTensor parameter (``p.to_local()``, ``grad.to_local()``): the
fused kernels see ordinary tensors and every rank quantizes its own shard, in blocks that start at the
shard's first element, so a block never straddles two ranks. The state is kept as DTensors so that
``torch.distributed.checkpoint`` (DCP) saves and loads each rank's piece:

- ``state1``/``state2`` have the parameter's global shape (AdEMAMix's ``state1`` a leading 2) and its
  placements: the codes of rank r are exactly the codes of rank r's elements.
- ``absmax1``/``absmax2`` (and tensor-wise ``max``/``new_max``) hold one scale per block *of the local
  shard*. Shards are not all the same size (``torch.chunk`` gives the last ranks fewer rows, possibly
  none), while DCP lays out DTensors in equal chunks; so every rank keeps ``B_max`` scales, the block
  count of the largest shard, and uses the first ``ceil(local numel / 256)`` of them (the rest stay 0).
  The global absmax is ``(S * B_max,)`` sharded on its last dimension, S = the number of shards.

Consequences for checkpoints (docs/distributed.md): a DCP checkpoint loads exactly on the same sharding
(any process count with the same shard layout); on a different number of shards the codes of state1/2
reshard exactly but the scales do not line up with the new blocks, so :func:`reshard_optimizer_state`
converts them — exactly when every old shard boundary falls on a multiple of 256 elements, otherwise by
dequantizing and requantizing (each value within half a quantization step of the new code).

Rules that need whole-parameter norms get them by all-reducing over the shard group: percentile clipping
(the gradient norm) and the LAMB/LARS/RMSprop trust ratio (Note [sharded trust ratio]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import functional as F
from ..formats import OPTIMIZER_BLOCKSIZE_8BIT
from . import families, stochastic_rounding

try:  # torch.distributed is optional (some builds lack it)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    dist = None
    DTensor = None

#: State key recording the scale layout of a sharded 8-bit state: int64 [shards, scales per shard]. Saved
#: with the state (DCP), so a checkpoint of another layout is refused on load even where the padded scale
#: vectors happen to have the same length (only states of sharded parameters carry it).
LAYOUT_KEY = "shard_layout"
#: Keys holding one scale per block (or per tensor) of a state: laid out per shard (Note [sharded state]).
SCALE_KEYS = ("absmax1", "absmax2", "max1", "max2", "new_max1", "new_max2")
ELEMENT_KEYS = ("state1", "state2")


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view sharing its memory), or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def _shard_mesh_dims(p) -> list[int]:
    return [i for i, pl in enumerate(p.placements) if pl.is_shard()]


def _max_local_numel(p) -> int:
    """Elements of the largest local shard of ``p`` (torch.chunk sizes, placement by placement)."""
    shape = list(p.shape)
    for i, pl in enumerate(p.placements):
        if pl.is_shard():
            d = pl.dim
            shape[d] = -(-shape[d] // p.device_mesh.size(i))
    return math.prod(shape)


def _num_shards(p) -> int:
    return math.prod(p.device_mesh.size(i) for i in _shard_mesh_dims(p))


def padded_scales(p, key: str, blocksize: int) -> int:
    """Scales every rank keeps for ``key`` of a sharded ``p`` (B_max of Note [sharded state])."""
    if key.startswith("absmax"):
        return -(-_max_local_numel(p) // blocksize)
    return 1


def _layout_of(p, st: dict) -> list[int]:
    key = "absmax1" if "absmax1" in st else "max1"
    return [_num_shards(p), padded_scales(p, key, OPTIMIZER_BLOCKSIZE_8BIT)]


def check_layout(p, st: dict) -> str | None:
    """Why a loaded state's shard layout does not fit ``p`` (None if it does, or if it has no 8-bit scales)."""
    saved = st.get(LAYOUT_KEY)
    if saved is not None and not (isinstance(saved, torch.Tensor) and saved.dtype == torch.int64
                                  and saved.numel() == 2):
        return f"{LAYOUT_KEY} must be an int64 tensor [shards, scales per shard]"
    has_scales = "absmax1" in st or "max1" in st
    fix = "convert it with kbit.optim.distributed.reshard_optimizer_state (docs/distributed.md)"
    if not is_sharded(p):
        if saved is not None and has_scales:
            return (f"the state was written for {int(saved[0])} shards (FSDP2) and this parameter is not sharded: "
                    + fix)
        return None
    if not has_scales:
        return None
    if saved is None:
        return f"8-bit state of a sharded parameter lacks {LAYOUT_KEY!r} (not written for this sharding): " + fix
    current = _layout_of(p, st)
    if [int(x) for x in saved.reshape(-1).tolist()] != current:
        return (f"the state was written for {int(saved[0])} shards of {int(saved[1])} scales, this sharding has "
                f"{current[0]} of {current[1]}: " + fix)
    return None


def check_scales(p, st: dict, j: int, rows: int) -> str | None:
    """Why the scales of state ``j`` of a sharded ``p`` do not fit its sharding (None if they do)."""
    for key in (f"absmax{j}", f"max{j}", f"new_max{j}"):
        if key not in st:
            continue
        a = st[key]
        width = padded_scales(p, key, OPTIMIZER_BLOCKSIZE_8BIT) * _num_shards(p)
        shape = (rows, width) if rows > 1 and key.startswith("absmax") else (rows * width,)
        if not is_sharded(a) or tuple(a.shape) != shape or a.dtype != torch.float32:
            return (f"{key} must be a float32 DTensor of shape {shape} for this sharding (got "
                    f"{type(a).__name__} {tuple(a.shape)}): a checkpoint from a different number of shards needs "
                    "kbit.optim.distributed.reshard_optimizer_state (docs/distributed.md)")
    if f"absmax{j}" not in st and f"max{j}" not in st:
        return f"8-bit state needs absmax{j} or max{j}"
    return None


# Note [sharded trust ratio]
# With max_unorm > 0 the fused kernel scales the step by min(1, (max_unorm * |p| + trust_eps) / |u|), both
# norms taken in a pre-pass over the tensor it is given: on a shard, the shard's norms. The ratio must be
# the whole parameter's, so a sharded parameter with a trust ratio takes two passes:
#   1. the step runs on copies of the shard and its state with an unreachable max_unorm: nothing is clipped
#      and the kernel reports the shard's update norm |u|_r (the copies are then dropped);
#   2. |u|^2 and |p|^2 are all-reduced over the shard group, giving the global ratio R; the real step runs
#      with the max_unorm' for which the kernel's own shard-local formula yields R:
#      max_unorm' = (R * |u|_r - trust_eps) / |p|_r (max_unorm = 0 when R = 1). A shard whose |p|_r is 0
#      cannot express R that way; its step runs with lr * R instead, which is the same update there
#      (decay of a zero parameter is zero).
# The trust ratio only scales the step size, never the state update, so pass 1 does not change what pass 2
# computes. The result equals the unsharded step up to float32 rounding of R; it costs one extra pass over
# the shard and a small all-reduce per parameter.
TRUST_RATIO = "kbit.sharded_trust_ratio"
#: max_unorm of pass 1: large enough that nothing is clipped, small enough that max_unorm * |p| stays finite.
_UNCLIPPED_MAX_UNORM = 1e30
#: family -> (index of max_unorm in its hyper tuple, index of its trust_eps or None for 0); families.py's order.
_TRUST_FIELDS = {families.ADAM.op: (4, None), families.MOMENTUM.op: (4, 5), families.RMSPROP.op: (3, 1)}


def shard_groups(p) -> tuple:
    return tuple(p.device_mesh.get_group(i) for i in _shard_mesh_dims(p))


def prepare(family, p, grad, state: dict, config: dict, gnorm_scale: float, sr_seed: int | None = None):
    """families.prepare for a sharded ``p``: the local shard, the local state views; a trust-ratio
    parameter gets a key of its own (launched by :func:`launch_trust_ratio`)."""
    groups = shard_groups(p)
    lp, lgrad = p.to_local(), grad.to_local()
    if sr_seed is not None:  # Note [stochastic rounding]: element indices are the shard's own, so mix in its rank
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        sr_seed = stochastic_rounding.step_seed(sr_seed, rank, 0, 0)
    key, item = families.prepare(family, lp, lgrad, local_state(state, lp), config, gnorm_scale, sr_seed)
    if config["max_unorm"] > 0.0:
        if family.op not in _TRUST_FIELDS:  # pragma: no cover - families.check_supported rejects these first
            raise ValueError(f"max_unorm is not implemented for {family.op}")
        item.full_state = state  # the DTensor state, whose unorm_vec gets the global update norm
        key = (TRUST_RATIO, id(lp), groups, key)
    return key, item


def _with(key: tuple, hyper: tuple) -> tuple:
    return key[:-1] + (hyper,)


def launch_trust_ratio(family, key: tuple, items: list) -> None:
    """One sharded parameter's step with the whole parameter's trust ratio (Note [sharded trust ratio])."""
    _, _, groups, inner = key
    (item,) = items
    hyper = inner[-1]
    at, eps_at = _TRUST_FIELDS[family.op]
    max_unorm = hyper[at]
    trust_eps = hyper[eps_at] if eps_at is not None else 0.0
    state = item.state
    # Pass 1 on copies: the shard's update norm, nothing clipped.
    copies = {k: (v.clone() if isinstance(v, torch.Tensor) and not k.startswith("qmap") else v)
              for k, v in state.items()}
    copies["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=item.p.device)
    dry = dataclasses.replace(item, p=item.p.clone(), state=copies)
    unclipped = list(hyper)
    unclipped[at] = _UNCLIPPED_MAX_UNORM
    families.launch(family, _with(inner, tuple(unclipped)), [dry])
    u_local = float(copies["unorm_vec"][0])
    p_local = float(torch.linalg.vector_norm(item.p, dtype=torch.float64))
    sums = torch.tensor([u_local * u_local, p_local * p_local], dtype=torch.float64)
    for group in groups:
        dist.all_reduce(sums, group=group)
    u_global, p_global = math.sqrt(float(sums[0])), math.sqrt(float(sums[1]))
    threshold = max_unorm * p_global + trust_eps
    ratio = threshold / u_global if u_global > threshold and u_global > 0.0 else 1.0
    # Pass 2: the real step with a shard-local max_unorm (or lr) that reproduces the global ratio.
    real = list(hyper)
    real[at] = 0.0
    lr = item.lr
    if ratio < 1.0:
        if p_local > 0.0 and ratio * u_local > trust_eps:
            real[at] = (ratio * u_local - trust_eps) / p_local
        else:
            lr = lr * ratio
    if real[at] > 0.0:  # the kernel writes the shard's norm; unorm_vec gets the global one below
        state = dict(state, unorm_vec=torch.zeros(1, dtype=torch.float32, device=item.p.device))
    step_item = dataclasses.replace(item, lr=lr, state=state)
    families.launch(family, _with(inner, tuple(real)), [step_item])
    full_state = item.full_state
    if "unorm_vec" in full_state:
        full_state["unorm_vec"].fill_(u_global)


def wrap_state(state: dict, p, blocksize: int, zeros) -> None:
    """Turn the freshly made local state of a sharded ``p`` into DTensors (Note [sharded state]).
    ``zeros(shape, dtype)`` allocates the padded scale tensors (paged or not, as the optimizer's state)."""
    mesh, placements = p.device_mesh, tuple(p.placements)
    for key in ELEMENT_KEYS:
        if key in state:
            t = state[key]
            extra = t.dim() - p.dim()  # AdEMAMix's leading 2
            pl = tuple(Shard(x.dim + extra) if x.is_shard() else x for x in placements)
            shape = tuple(t.shape[:extra]) + tuple(p.shape)
            state[key] = DTensor.from_local(t, mesh, pl, run_check=False, shape=torch.Size(shape),
                                            stride=_contiguous_stride(shape))
    shards = _num_shards(p)
    if any(key in state for key in SCALE_KEYS):
        state[LAYOUT_KEY] = torch.tensor(_layout_of(p, state), dtype=torch.int64)
    for key in SCALE_KEYS:
        if key in state:
            t = state[key]
            width = padded_scales(p, key, blocksize)
            lead = tuple(t.shape[:-1]) if t.dim() > 1 else ()
            padded = zeros(lead + (width,), t.dtype)
            padded[..., : t.shape[-1]].copy_(t)
            last = len(lead)
            pl = tuple(Shard(last) if x.is_shard() else Replicate() for x in placements)
            shape = lead + (width * shards,)
            state[key] = DTensor.from_local(padded, mesh, pl, run_check=False, shape=torch.Size(shape),
                                            stride=_contiguous_stride(shape))


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def local_state(state: dict, lp: torch.Tensor) -> dict:
    """The state a kernel updates for the local shard ``lp``: local views of the DTensors, scales cut to
    the shard's own block count (views; a non-contiguous one is written back by the CPU backend)."""
    out = {}
    for key, value in state.items():
        if is_sharded(value):
            value = value.to_local()
            if key in SCALE_KEYS:
                if key.startswith("absmax"):
                    blocksize = OPTIMIZER_BLOCKSIZE_8BIT
                    value = value[..., : -(-lp.numel() // blocksize)]
                else:
                    value = value[..., :1].reshape(-1)
        out[key] = value
    return out


def sq_norm(grad: torch.Tensor) -> float:
    """Squared float32 norm of a gradient; for a sharded one, of the whole gradient (all-reduced)."""
    if not is_sharded(grad):
        return float(torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2)
    part = torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32) ** 2
    part = part.reshape(1)
    for i in _shard_mesh_dims(grad):
        dist.all_reduce(part, group=grad.device_mesh.get_group(i))
    return float(part[0])


# ---- checkpoints across shard counts ----------------------------------------------------------------------
def reshard_optimizer_state(state_dict: dict, param_shapes: dict[Any, tuple], from_shards: int | None = None,
                            to_shards: int = 1, blocksize: int = OPTIMIZER_BLOCKSIZE_8BIT) -> dict[str, Any]:
    """Convert a *full* optimizer state dict written with ``from_shards`` shards to ``to_shards`` shards.

    ``state_dict`` is a kbit optimizer state dict with full (not DTensor) tensors, e.g. from
    ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` or ``get_state_dict(...,
    options=StateDictOptions(full_state_dict=True))``; ``param_shapes`` maps each state key (FQN or index)
    to its parameter's global shape; shards split dim 0 as FSDP2 does (``torch.chunk``). A count of 1 is
    an unsharded parameter (DDP or no wrapper), whose scales are not padded. ``from_shards`` defaults to
    the count the state records (``shard_layout``), else 1; a given count must agree with it.

    Element states (state1/state2: codes or float32) are copied unchanged (exact). The 8-bit scales are
    rebuilt for the new blocks: when every block of the new layout is a block of the old one (same first
    and last element) the old scales are reused and the result is exact; otherwise each state is
    dequantized with its old blocks and requantized with the new ones (each value then moves by at most
    half a step of the code map, scaled by its new block's absmax). Returns a new dict with a report
    ``{"exact": [...], "requantized": [...]}`` under ``"__reshard__"`` (pop it before loading).
    """
    if to_shards < 1 or (from_shards is not None and from_shards < 1):
        raise ValueError(f"shard counts must be >= 1 (got from_shards={from_shards}, to_shards={to_shards})")
    out = dict(state_dict)
    out["state"] = {}
    report = {"exact": [], "requantized": []}
    for key, pst in state_dict["state"].items():
        pst = dict(pst)
        inner_key = next((k for k, v in pst.items() if isinstance(v, dict)), None)
        inner = dict(pst[inner_key]) if inner_key is not None else pst
        if key not in param_shapes:
            raise KeyError(f"reshard_optimizer_state: no parameter shape given for state {key!r}")
        shape = tuple(param_shapes[key])
        saved = pst.pop(LAYOUT_KEY, None)
        saved = inner.pop(LAYOUT_KEY, saved)
        old = int(saved.reshape(-1)[0]) if saved is not None else 1
        if from_shards is not None and saved is not None and from_shards != old:
            raise ValueError(f"state {key!r} was written for {old} shards, not from_shards={from_shards}")
        old = from_shards if from_shards is not None else old
        if "absmax1" in inner or "max1" in inner:
            exact = _reshard_scales(inner, shape, old, to_shards, blocksize)
            report["exact" if exact else "requantized"].append(key)
            if to_shards > 1:
                akey = "absmax1" if "absmax1" in inner else "max1"
                pst[LAYOUT_KEY] = torch.tensor([to_shards, inner[akey].shape[-1] // to_shards], dtype=torch.int64)
        if inner_key is not None:
            pst[inner_key] = inner
        out["state"][key] = pst
    out["__reshard__"] = report
    return out


def _shard_ranges(shape: tuple, shards: int) -> list[tuple[int, int]]:
    """Element ranges [lo, hi) of each shard of a parameter split on dim 0 like torch.chunk / FSDP2."""
    rows = shape[0] if shape else 1
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    chunk = -(-rows // shards) if rows else 0
    out = []
    for r in range(shards):
        lo = min(r * chunk, rows)
        hi = min((r + 1) * chunk, rows)
        out.append((lo * row, hi * row))
    return out


def _blocks(shape, shards: int, blocksize: int | None) -> tuple[list[tuple[int, int, int]], int]:
    """The quantization blocks of a parameter split into ``shards`` (1: unsharded): (start, end, scale index)
    in flat element offsets, and the width of the scale vector (per-shard padding included). ``blocksize``
    None: one scale per shard (tensor-wise ``max``)."""
    n = math.prod(shape)
    ranges = _shard_ranges(shape, shards) if shards > 1 else [(0, n)]
    size = lambda lo, hi: (hi - lo) if blocksize is None else blocksize  # noqa: E731
    used = [(-(-(hi - lo) // size(lo, hi)) if hi > lo else 0) if blocksize is not None else 1 for lo, hi in ranges]
    width = max(used) if shards > 1 else used[0]
    blocks = []
    for r, (lo, hi) in enumerate(ranges):
        for b in range(used[r] if hi > lo else 0):
            start = lo + b * size(lo, hi)
            blocks.append((start, min(start + size(lo, hi), hi), r * width + b))
    return blocks, width * len(ranges)


def _scale_index(shape, shards: int, blocksize: int | None) -> torch.Tensor:
    """For every element, the index of its scale in a layout of ``shards`` shards."""
    n = math.prod(shape)
    ranges = _shard_ranges(shape, shards) if shards > 1 else [(0, n)]
    _, width = _blocks(shape, shards, blocksize)
    width //= len(ranges)
    idx = torch.empty(n, dtype=torch.long)
    for r, (lo, hi) in enumerate(ranges):
        within = torch.arange(hi - lo) // blocksize if blocksize is not None else torch.zeros(hi - lo, dtype=torch.long)
        idx[lo:hi] = r * width + within
    return idx


def _quantize_into(values, codes, scales, shape, shards: int, blocksize: int | None, qmap) -> None:
    """Quantize one row of float32 ``values`` shard by shard, in blocks starting at each shard's first element."""
    n = math.prod(shape)
    ranges = _shard_ranges(shape, shards) if shards > 1 else [(0, n)]
    width = scales.numel() // len(ranges)
    for r, (lo, hi) in enumerate(ranges):
        if hi == lo:
            continue
        x = values[lo:hi]
        if blocksize is not None:
            q, qs = F.quantize_blockwise(x.contiguous(), code=qmap, blocksize=blocksize)
            codes[lo:hi] = q.reshape(-1)
            a = qs.absmax.reshape(-1)
            scales[r * width: r * width + a.numel()] = a
        else:  # one scale per shard: nearest code of x / max|x|
            m = x.abs().max()
            scales[r * width] = m
            normed = x / m if m > 0 else torch.zeros_like(x)
            codes[lo:hi] = (normed[:, None] - qmap[None, :]).abs().argmin(dim=1).to(torch.uint8)


def _reshard_scales(st: dict, shape: tuple, from_shards: int, to_shards: int, blocksize: int) -> bool:
    """Rewrite one parameter's 8-bit states for ``to_shards``; True if no value had to be requantized."""
    n = math.prod(shape)
    exact = True
    for j in (1, 2):
        skey = f"state{j}"
        if skey not in st or st[skey].dtype != torch.uint8:
            continue
        akey = f"absmax{j}" if f"absmax{j}" in st else f"max{j}"
        bs = blocksize if akey.startswith("absmax") else None
        codes, scales, qmap = st[skey], st[akey], st[f"qmap{j}"]
        rows = codes.shape[0] if codes.dim() == len(shape) + 1 else 1
        if codes.numel() != rows * n:
            raise ValueError(f"reshard_optimizer_state handles 8-bit states (one code per element); {skey} has "
                             f"{codes.numel()} bytes for {rows * n} elements (4-bit packed states are not supported)")
        flat_codes = codes.reshape(rows, n)
        old_scales = scales.reshape(rows, -1)
        old, _ = _blocks(shape, from_shards, bs)
        new, width = _blocks(shape, to_shards, bs)
        old_index = {(start, end): i for start, end, i in old}
        new_scales = torch.zeros((rows, width), dtype=torch.float32)
        new_codes = flat_codes
        if all((start, end) in old_index for start, end, _ in new):
            # Every new block is an old block: same elements, same scale, same codes.
            src = torch.tensor([old_index[(start, end)] for start, end, _ in new], dtype=torch.long)
            dst = torch.tensor([i for _, _, i in new], dtype=torch.long)
            new_scales[:, dst] = old_scales[:, src]
        else:
            exact = False
            values = qmap[flat_codes.long()] * old_scales[:, _scale_index(shape, from_shards, bs)]
            new_codes = torch.empty_like(flat_codes)
            for r in range(rows):
                _quantize_into(values[r], new_codes[r], new_scales[r], shape, to_shards, bs, qmap)
        st[skey] = new_codes.reshape(codes.shape)
        st[akey] = new_scales if scales.dim() > 1 else new_scales.reshape(-1)
        if f"new_max{j}" in st:
            st[f"new_max{j}"] = st[akey].clone()
    return exact
