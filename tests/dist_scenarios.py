"""The training scenarios of tests/test_distributed.py, also run by docs/distributed.md's recipes.

One small MLP whose weights cover the cases that matter for sharded 8-bit state (2 ranks, FSDP2 shards
dim 0 like torch.chunk):

- ``l1.weight`` (256, 32): 4096 elements a shard, 16 whole blocks of 256 (aligned).
- ``l2.weight`` (37, 256): shards of 19 and 18 rows of 256 elements (uneven, aligned).
- ``l3.weight`` (150, 37): shards of 2775 elements: a partial block at the end of rank 0 (not aligned).
- ``l4.weight`` (1, 150) and every bias: too small for 8-bit (32-bit state); rank 1's shard of l4 is empty.

tanh, not ReLU: with ReLU, dead units give exactly-zero gradients, and on those this model's 8-bit Adam
runs took steps far larger than lr (a weight moved by 23 in 6 steps of lr 1e-2, identically in every run,
distributed or not: 8-bit quantization near zero, see docs/numerics.md), which would make the comparisons
below measure that rather than sharding. Each rank trains on its own batches; the single-process
reference (``reference_run``) averages the per-rank gradients of the same batches, which is what DDP and
FSDP2 compute.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as nnF

import kbit.optim as O

STEPS = 6
SAVE_AT = 3  # the DCP scenario saves after this many steps and resumes from there
BATCH = 8
LR = 1e-2

OPTIMIZERS = {
    "torch_adamw": lambda ps: torch.optim.AdamW(ps, lr=LR),  # the control: proves the harness
    "adamw8bit": lambda ps: O.AdamW8bit(ps, lr=LR),
    "lion8bit": lambda ps: O.Lion8bit(ps, lr=LR / 10),
    "ademamix8bit": lambda ps: O.AdEMAMix8bit(ps, lr=LR),  # state1 holds 2 states: (2, *shape), absmax (2, B)
    "adamw32bit_clip": lambda ps: O.AdamW32bit(ps, lr=LR, percentile_clipping=5),
    # trust ratios need whole-parameter norms (Note [sharded trust ratio] in kbit/optim/distributed.py)
    "lamb": lambda ps: O.LAMB(ps, lr=LR, weight_decay=0.01),
    "lamb8bit": lambda ps: O.LAMB8bit(ps, lr=LR, weight_decay=0.01),
    "lars": lambda ps: O.LARS(ps, lr=LR, momentum=0.9, weight_decay=0.01, max_unorm=0.002),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Model()


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(32, 256)
        self.l2 = torch.nn.Linear(256, 37)
        self.l3 = torch.nn.Linear(37, 150)
        self.l4 = torch.nn.Linear(150, 1)

    def forward(self, x):
        x = torch.tanh(self.l1(x))
        x = torch.tanh(self.l2(x))
        x = torch.tanh(self.l3(x))
        return self.l4(x)


class _QLoRA(torch.nn.Module):
    """A frozen 4-bit (NF4) base layer with a trainable low-rank adapter, and a float head."""

    def __init__(self):
        super().__init__()
        import kbit.nn

        self.base = kbit.nn.Linear4bit(32, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        self.base.weight.requires_grad_(False)
        self.lora_a = torch.nn.Linear(32, 8, bias=False)
        self.lora_b = torch.nn.Linear(8, 64, bias=False)
        self.head = torch.nn.Linear(64, 1)
        self.base(torch.zeros(1, 32))  # quantize now (Linear4bit quantizes on first use)

    def forward(self, x):
        return self.head(torch.tanh(self.base(x) + self.lora_b(self.lora_a(x))))


def make_qlora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return _QLoRA()


def fsdp_wrap_qlora(model):
    """FSDP2 shards the adapters and the head; the 4-bit base weight is left out (ignored_params): it stays a
    Params4bit, replicated on every rank (docs/distributed.md says why it cannot be sharded yet)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, ignored_params={model.base.weight})
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 32, generator=g), torch.randn(BATCH, 1, generator=g)


def loss_fn(model, x, y):
    return nnF.mse_loss(model(x), y)


def _train(model, opt, rank: int, steps: range) -> None:
    for i in steps:
        x, y = batch(i, rank)
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _full_params(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def fsdp_wrap(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.l1, model.l2, model.l3, model.l4):
        fully_shard(layer)
    fully_shard(model)
    return model


# ---- rank entry point ---------------------------------------------------------------------------------------
def train_all(rank: int, world_size: int, outdir: str) -> None:
    """DDP and FSDP2 runs of every optimizer, the DCP save/resume run, and the unsupported-rule checks.
    Writes rank<r>.pt with the full parameters of every run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for name, make_opt in OPTIMIZERS.items():
        model = make_model()
        ddp = DDP(model)
        _train(ddp, make_opt(ddp.parameters()), rank, range(STEPS))
        results[f"ddp/{name}"] = _full_params(model)

        model = fsdp_wrap(make_model())
        opt = make_opt(model.parameters())
        _train(model, opt, rank, range(2))
        results[f"fsdp/{name}@2"] = _full_params(model)
        _train(model, opt, rank, range(2, STEPS))
        results[f"fsdp/{name}"] = _full_params(model)

    # DCP: save after SAVE_AT steps, keep going (uninterrupted); a fresh model + optimizer loads and resumes.
    for name in ("torch_adamw", "adamw8bit"):
        ckpt = os.path.join(outdir, f"ckpt-{name}")
        model = fsdp_wrap(make_model())
        opt = OPTIMIZERS[name](model.parameters())
        _train(model, opt, rank, range(SAVE_AT))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        _train(model, opt, rank, range(SAVE_AT, SAVE_AT + 1))
        results[f"dcp/{name}/uninterrupted@{SAVE_AT + 1}"] = _full_params(model)
        _train(model, opt, rank, range(SAVE_AT + 1, STEPS))
        results[f"dcp/{name}/uninterrupted"] = _full_params(model)

        torch.manual_seed(123)  # a different init: everything must come from the checkpoint
        model2 = fsdp_wrap(_Model())
        opt2 = OPTIMIZERS[name](model2.parameters())
        msd2, osd2 = get_state_dict(model2, opt2)
        state = {"model": msd2, "optim": osd2}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
        _train(model2, opt2, rank, range(SAVE_AT, STEPS))
        results[f"dcp/{name}/resumed"] = _full_params(model2)

    # 1 -> 2 shards: a single-process checkpoint (computed identically on every rank) converted with
    # reshard_optimizer_state and loaded as a full state dict onto FSDP2.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from kbit.optim.distributed import reshard_optimizer_state

    one_model, one_opt = reference_run(OPTIMIZERS["adamw8bit"], world_size, range(SAVE_AT))
    msd1, osd1 = get_state_dict(one_model, one_opt)
    shapes = {n: tuple(p.shape) for n, p in one_model.named_parameters()}
    converted = reshard_optimizer_state(osd1, shapes, from_shards=1, to_shards=world_size)
    results["reshard_1_to_2_report"] = converted.pop("__reshard__")
    model = fsdp_wrap(make_model())
    opt = OPTIMIZERS["adamw8bit"](model.parameters())
    set_state_dict(model, opt, model_state_dict=msd1, optim_state_dict=converted,
                   options=StateDictOptions(full_state_dict=True))
    _train(model, opt, rank, range(SAVE_AT, STEPS))
    results["fsdp/adamw8bit_from_1_rank"] = _full_params(model)

    # QLoRA: frozen 4-bit base (replicated), adapters sharded, 8-bit AdamW on the trainable parameters.
    model = fsdp_wrap_qlora(make_qlora_model())
    _train(model, O.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=LR), rank, range(STEPS))
    results["fsdp/qlora"] = _full_params(model)
    results["qlora_base_type"] = type(model.base.weight).__name__

    # Paged state under FSDP2: each rank's shard state in its own files (a lower paging threshold, as the
    # model is small), trained exactly like the unpaged FSDP2 run.
    from kbit.optim import paged

    threshold, paged.PAGED_MIN_NUMEL = paged.PAGED_MIN_NUMEL, 1024
    try:
        model = fsdp_wrap(make_model())
        opt = O.PagedAdamW8bit(model.parameters(), lr=LR)
        _train(model, opt, rank, range(STEPS))
        results["fsdp/paged_adamw8bit"] = _full_params(model)
        results["paged_files"] = {n: [key for key in paged.PAGED_KEYS if key in opt.state[p]
                                      and paged.is_file_backed(opt.state[p][key].to_local())]
                                  for n, p in model.named_parameters()}
    finally:
        paged.PAGED_MIN_NUMEL = threshold
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


# ---- the single-process reference -------------------------------------------------------------------------
def reference_run(make_opt, world_size: int, steps: range, model=None, opt=None):
    """One process, the union of the ranks' batches: each step's gradient is the mean of the per-rank
    gradients (as DDP's all-reduce computes it), then one optimizer step. Returns (model, optimizer)."""
    model = model if model is not None else make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt if opt is not None else make_opt(params)
    for i in steps:
        total = None
        for r in range(world_size):
            model.zero_grad(set_to_none=True)
            loss_fn(model, *batch(i, r)).backward()
            g = [p.grad.clone() for p in params]
            total = g if total is None else [a + b for a, b in zip(total, g)]
        for p, g in zip(params, total):
            p.grad = g / world_size
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def union_batch_run(make_opt, world_size: int, steps: range):
    """One process, one batch that concatenates the ranks' batches (mean loss over all of it)."""
    model = make_model()
    opt = make_opt(model.parameters())
    for i in steps:
        xs, ys = zip(*(batch(i, r) for r in range(world_size)))
        loss_fn(model, torch.cat(xs), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model
