"""kbit optimizers under torch.distributed on CPU (gloo, 2 ranks): DDP, FSDP2, distributed checkpoints.

One spawned group (tests/dist_harness.py) runs every scenario of tests/dist_scenarios.py once (~20-30 s
on 2 busy cores); the tests below check its results against single-process runs made here. Every
scenario also runs with ``torch.optim.AdamW``, the control that proves the harness itself is exact.
docs/distributed.md walks through the same recipes.
"""

from __future__ import annotations

import pytest
import torch

import kbit.optim as O
from kbit import functional as F
from kbit.optim import distributed as kdist

import dist_scenarios as S
from conftest import assert_bitwise_equal

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD = 2
#: Two ways of summing the same fp32 gradients (one batch of 16 rows vs the mean of two batches of 8)
#: differ by reduction order only; after STEPS steps of 32-bit Adam with lr 1e-2 that moves parameters
#: by a few 1e-6 at most (measured 4.8e-6).
FP32_REORDER_ATOL = 2e-5
#: FSDP2 quantizes each rank's shard in its own blocks, DDP the whole tensor: the 8-bit states differ by
#: quantization noise, and so do the parameters. Bound: the largest difference is at most this fraction of
#: how far the parameter moved (measured up to 4% after 6 steps; a wrong shard/block mapping gives ~100%).
QUANT_NOISE_FRACTION = 0.15
#: LAMB8bit keeps one scale per tensor (block_wise=False): under FSDP2 one per shard, a different grid than
#: DDP's single one, so its noise is larger (measured up to 13% of the movement after 6 steps).
TENSORWISE_NOISE_FRACTION = 0.3
#: LAMB/LARS under FSDP2 vs one process: the trust ratio from all-reduced norms differs from the unsharded
#: one in float32 rounding only (measured up to 3e-8 after 6 steps).
TRUST_RATIO_ATOL = 2e-7
#: Lion's update is +-lr per element, so noise shows as sign flips of single elements: at most this
#: fraction of the elements may differ (measured below 5%).
LION_FLIP_FRACTION = 0.15
#: Percentile clipping under FSDP2 sums the squared gradient norm shard by shard (then all-reduces):
#: the clip scale can differ in its last bit from the unsharded one.
CLIP_NORM_ATOL = 1e-6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dist_harness import spawn

    out = tmp_path_factory.mktemp("dist")
    spawn(S.train_all, WORLD, str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, ranks


@pytest.fixture(scope="module")
def reference():
    """Single-process runs on the union of the ranks' batches (mean of per-rank gradients)."""
    out = {}
    for name, make_opt in S.OPTIMIZERS.items():
        out[name] = {n: p.detach().clone() for n, p in S.reference_run(make_opt, WORLD, range(S.STEPS))[0]
                     .named_parameters()}
        out[f"{name}@2"] = {n: p.detach().clone() for n, p in S.reference_run(make_opt, WORLD, range(2))[0]
                            .named_parameters()}
    return out


def test_every_rank_ends_identical(runs):
    _, ranks = runs
    for key, params in ranks[0].items():
        if isinstance(params, dict) and key not in ("paged_files", "reshard_1_to_2_report"):
            for n, p in params.items():
                assert_bitwise_equal(ranks[1][key][n], p, f"{key} {n}: rank 1 vs rank 0")


@pytest.mark.parametrize("name", list(S.OPTIMIZERS))
def test_ddp_equals_single_process_bit_for_bit(runs, reference, name):
    """DDP's all-reduce of two ranks computes (g0 + g1) / 2 exactly as the single-process reference does
    (two addends commute and halving is exact), so every optimizer lands on the same bits."""
    _, ranks = runs
    for n, p in ranks[0][f"ddp/{name}"].items():
        assert_bitwise_equal(p, reference[name][n], f"DDP {name} {n}")


@pytest.mark.parametrize("name", ["torch_adamw", "adamw32bit_clip"])
def test_ddp_equals_one_union_batch_within_fp32_reordering(runs, name):
    """Against one batch of all ranks' rows the gradient sums run in another order: fp32 tolerance."""
    _, ranks = runs
    union = dict(S.union_batch_run(S.OPTIMIZERS[name], WORLD, range(S.STEPS)).named_parameters())
    for n, p in ranks[0][f"ddp/{name}"].items():
        torch.testing.assert_close(p, union[n].detach(), atol=FP32_REORDER_ATOL, rtol=0)


def test_fsdp2_control_and_32bit_match_ddp(runs, reference):
    """Elementwise rules do not care about sharding: torch's AdamW is bit-identical, kbit's 32-bit AdamW with
    percentile clipping differs only by the shard-wise sum of the gradient norm."""
    _, ranks = runs
    for n, p in ranks[0]["fsdp/torch_adamw"].items():
        assert_bitwise_equal(p, reference["torch_adamw"][n], f"FSDP2 torch AdamW {n}")
    for n, p in ranks[0]["fsdp/adamw32bit_clip"].items():
        torch.testing.assert_close(p, reference["adamw32bit_clip"][n], atol=CLIP_NORM_ATOL, rtol=0)


def test_fsdp2_8bit_blocks_start_at_each_shard(runs, reference):
    """The first step updates parameters from the unquantized new state, so quantization shows from the
    second step on. After two steps, a weight whose shards are whole blocks (l1: 16 blocks a rank; l2: 19
    and 18 rows of 256) is bit-identical to DDP's; l3 (whose rank-0 shard ends in a partial block, so rank
    1's blocks start mid-block of DDP's) differs by quantization noise."""
    _, ranks = runs
    fsdp, ref = ranks[0]["fsdp/adamw8bit@2"], reference["adamw8bit@2"]
    for n in ("l1.weight", "l2.weight", "l4.weight", "l1.bias"):
        assert_bitwise_equal(fsdp[n], ref[n], f"FSDP2 AdamW8bit two steps, {n}")
    assert not torch.equal(fsdp["l3.weight"], ref["l3.weight"])
    _assert_within_noise(fsdp["l3.weight"], ref["l3.weight"], dict(S.make_model().named_parameters())["l3.weight"])


def _assert_within_noise(actual, expected, start, what="", fraction=None):
    """max |actual - expected| <= fraction * max |expected - start| (how far it moved)."""
    fraction = QUANT_NOISE_FRACTION if fraction is None else fraction
    moved = (expected - start.detach()).abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= fraction * moved, f"{what}: difference {diff:.2e}, moved {moved:.2e}"


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit", "ademamix8bit"])
def test_fsdp2_8bit_trains_like_ddp_within_quantization_noise(runs, reference, name):
    _, ranks = runs
    start = dict(S.make_model().named_parameters())
    for n, p in ranks[0][f"fsdp/{name}"].items():
        ref = reference[name][n]
        if name == "lion8bit":
            flipped = (p != ref).float().mean().item()
            assert flipped <= LION_FLIP_FRACTION, f"{n}: {flipped:.1%} of the elements differ from DDP"
        else:
            _assert_within_noise(p, ref, start[n], f"FSDP2 vs DDP {n}")


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_fsdp2_trust_ratio_uses_whole_parameter_norms(runs, reference, name):
    """LAMB/LARS under FSDP2 all-reduce the update and parameter norms (Note [sharded trust ratio]): the same
    training as one process up to float32 rounding of the ratio; a shard-local ratio would be far off."""
    _, ranks = runs
    without = {"lamb": lambda ps: O.LAMB(ps, lr=S.LR, weight_decay=0.01, max_unorm=0.0),
               "lars": lambda ps: O.LARS(ps, lr=S.LR, momentum=0.9, weight_decay=0.01, max_unorm=0.0)}[name]
    unclipped = {n: p.detach() for n, p in S.reference_run(without, WORLD, range(S.STEPS))[0].named_parameters()}
    for n, p in ranks[0][f"fsdp/{name}"].items():
        torch.testing.assert_close(p, reference[name][n], atol=TRUST_RATIO_ATOL, rtol=0)
    # the ratio did clip: without it the run lands elsewhere
    assert (unclipped["l1.weight"] - reference[name]["l1.weight"]).abs().max() > 100 * TRUST_RATIO_ATOL


def test_fsdp2_lamb8bit_within_quantization_noise(runs, reference):
    _, ranks = runs
    start = dict(S.make_model().named_parameters())
    for n, p in ranks[0]["fsdp/lamb8bit"].items():
        _assert_within_noise(p, reference["lamb8bit"][n], start[n], f"FSDP2 vs DDP LAMB8bit {n}",
                             fraction=TENSORWISE_NOISE_FRACTION)


def test_qlora_under_fsdp2_with_a_replicated_4bit_base(runs):
    """QLoRA under FSDP2: the frozen 4-bit base weight is left out of sharding (ignored_params) and stays a
    Params4bit on every rank; the adapters and the head are sharded and trained by AdamW8bit. Their state is
    32-bit (below min_8bit_size) and the gradients are the per-rank mean, so one process gets the same bits."""
    _, ranks = runs
    assert ranks[0]["qlora_base_type"] == "Params4bit"
    model = S.make_qlora_model()
    S.reference_run(lambda ps: O.AdamW8bit(ps, lr=S.LR), WORLD, range(S.STEPS), model=model)
    expected = {n: p for n, p in model.named_parameters()}
    for n, p in ranks[0]["fsdp/qlora"].items():
        assert_bitwise_equal(p, expected[n].detach(), f"QLoRA {n}")
    assert not torch.equal(ranks[0]["fsdp/qlora"]["lora_a.weight"], S.make_qlora_model().lora_a.weight.detach())


def test_fsdp2_paged_state_lives_in_files_and_trains_identically(runs):
    _, ranks = runs
    for r in range(WORLD):
        for n, p in ranks[r]["fsdp/paged_adamw8bit"].items():
            assert_bitwise_equal(p, ranks[r]["fsdp/adamw8bit"][n], f"rank {r} paged vs plain {n}")
        files = ranks[r]["paged_files"]
        for n in ("l1.weight", "l2.weight", "l3.weight"):  # 8-bit states and their padded scales
            assert files[n] == ["state1", "state2", "absmax1", "absmax2"], (r, n, files[n])


@pytest.mark.parametrize("name", ["torch_adamw", "adamw8bit"])
def test_dcp_save_load_resume_equals_uninterrupted(runs, name):
    """get_state_dict -> dcp.save after 3 steps; a fresh (differently initialized) model and optimizer
    dcp.load + set_state_dict and take steps 4-6: the same bits as never stopping."""
    _, ranks = runs
    for r in range(WORLD):
        done, resumed = ranks[r][f"dcp/{name}/uninterrupted"], ranks[r][f"dcp/{name}/resumed"]
        for n in done:
            assert_bitwise_equal(resumed[n], done[n], f"rank {r} {name} {n}")


def _full_checkpoint(out, name, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = tmp_path / f"{name}.pt"
    dcp_to_torch_save(out / f"ckpt-{name}", path)
    return torch.load(path, weights_only=False)


def test_dcp_2_ranks_to_1_with_reshard(runs, tmp_path):
    """The documented 2 -> 1 path: dcp_to_torch_save, reshard_optimizer_state, set_state_dict on one
    process. Weights whose shards were whole blocks keep their exact state (their next step is bit-identical
    to the 2-rank run's); l3's state is dequantized and requantized (close, not exact)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    out, ranks = runs
    full = _full_checkpoint(out, "adamw8bit", tmp_path)
    model = S.make_model()
    opt = S.OPTIMIZERS["adamw8bit"](model.parameters())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}

    # Without the conversion the sharded scales do not fit: a clear error naming the fix, nothing loaded. l1's
    # padded scales (2 x 16) even have the length one shard needs (32): the recorded shard layout catches it.
    with pytest.raises(ValueError, match="l1.weight.*written for 2 shards.*reshard_optimizer_state"):
        set_state_dict(model, opt, model_state_dict=full["model"], optim_state_dict=full["optim"])
    assert all(st["step"] == 1 for st in opt.state.values())  # set_state_dict's zero-gradient init, not the checkpoint

    converted = kdist.reshard_optimizer_state(full["optim"], shapes, from_shards=WORLD, to_shards=1)
    inferred = kdist.reshard_optimizer_state(full["optim"], shapes, to_shards=1)  # from the recorded layout
    assert inferred["__reshard__"] == converted["__reshard__"]
    with pytest.raises(ValueError, match="written for 2 shards, not from_shards=3"):
        kdist.reshard_optimizer_state(full["optim"], shapes, from_shards=3, to_shards=1)
    report = converted.pop("__reshard__")
    assert report == {"exact": ["l1.weight", "l2.weight"], "requantized": ["l3.weight"]}
    model = S.make_model()
    opt = S.OPTIMIZERS["adamw8bit"](model.parameters())
    set_state_dict(model, opt, model_state_dict=full["model"], optim_state_dict=converted)
    wrapped = O.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY
    for n, p in model.named_parameters():
        saved, st = full["optim"]["state"][n][wrapped], opt.state[p]
        assert st["step"] == S.SAVE_AT
        if n in report["exact"]:  # codes and the scales of each (unpadded) block are the saved ones
            for j in (1, 2):
                assert_bitwise_equal(st[f"state{j}"], saved[f"state{j}"], f"{n} state{j}")
                per_rank = saved[f"absmax{j}"].view(WORLD, -1)
                used = [-(-(hi - lo) // 256) for lo, hi in kdist._shard_ranges(tuple(p.shape), WORLD)]
                expect = torch.cat([per_rank[r, :u] for r, u in enumerate(used)])
                assert_bitwise_equal(st[f"absmax{j}"], expect, f"{n} absmax{j}")
    S.reference_run(None, WORLD, range(S.SAVE_AT, S.SAVE_AT + 1), model=model, opt=opt)
    two_ranks = ranks[0][f"dcp/adamw8bit/uninterrupted@{S.SAVE_AT + 1}"]
    for n, p in model.named_parameters():
        if n in report["exact"] or n in ("l4.weight",) or n.endswith("bias"):  # 32-bit states are exact too
            assert_bitwise_equal(p.detach(), two_ranks[n], f"resumed on 1 rank, {n}")
        else:
            _assert_within_noise(p.detach(), two_ranks[n], full["model"][n], f"resumed on 1 rank, {n}")


def test_dcp_1_rank_to_2_with_reshard(runs, reference):
    """1 -> 2: a single-process state converted by reshard_optimizer_state and loaded with
    set_state_dict(full_state_dict=True) onto FSDP2 continues within quantization noise of the one-process
    run. Going to 2 shards, l1 (shards of 4096) and l2 (rows of 256) keep their blocks; l3 is requantized."""
    _, ranks = runs
    assert ranks[0]["reshard_1_to_2_report"] == {"exact": ["l1.weight", "l2.weight"], "requantized": ["l3.weight"]}
    start = dict(S.make_model().named_parameters())
    for n, p in ranks[0]["fsdp/adamw8bit_from_1_rank"].items():
        _assert_within_noise(p, reference["adamw8bit"][n], start[n], f"1 -> 2 ranks, {n}")


def test_reshard_requantizes_within_half_a_step():
    """reshard_optimizer_state on a synthetic state: 2 -> 1 -> 3 shards keep every value within the
    quantization error of its new block, and the same layout round-trips exactly."""
    g = torch.Generator().manual_seed(3)
    shape = (150, 37)
    n = 150 * 37
    qmap = F.create_dynamic_map(signed=True)
    values = torch.randn(n, generator=g) * 1e-3
    st = {"state1": None, "absmax1": None, "qmap1": qmap}
    codes = torch.empty(1, n, dtype=torch.uint8)
    width = kdist._blocks(shape, 2, 256)[1]
    scales = torch.zeros(1, width)
    kdist._quantize_into(values, codes[0], scales[0], shape, 2, 256, qmap)
    st["state1"], st["absmax1"] = codes.view(shape), scales.view(-1)
    sd = {"state": {0: {"step": 1, "wrapped": dict(st)}}, "param_groups": []}
    same = kdist.reshard_optimizer_state(sd, {0: shape}, 2, 2)
    assert same.pop("__reshard__") == {"exact": [0], "requantized": []}
    assert_bitwise_equal(same["state"][0]["wrapped"]["state1"], st["state1"], "2 -> 2 codes")
    assert_bitwise_equal(same["state"][0]["wrapped"]["absmax1"], st["absmax1"], "2 -> 2 scales")
    before = qmap[codes.view(-1).long()] * scales.view(-1)[kdist._scale_index(shape, 2, 256)]
    for target in (1, 3):
        moved = kdist.reshard_optimizer_state(sd, {0: shape}, 2, target)
        assert moved.pop("__reshard__")["requantized"] == [0]
        w = moved["state"][0]["wrapped"]
        after = qmap[w["state1"].reshape(-1).long()] * w["absmax1"][kdist._scale_index(shape, target, 256)]
        # The dynamic map's widest gap is 1/64 of the block's absmax; nearest rounding halves it.
        scale_of = w["absmax1"][kdist._scale_index(shape, target, 256)]
        assert bool(((after - before).abs() <= scale_of / 64 + 1e-12).all()), target


@pytest.mark.slow
def test_docs_program_runs(tmp_path):
    """The complete program at the end of docs/distributed.md runs as a script and prints "ok" (it spawns
    2 ranks: too slow for the docs examples' per-block limit, so it is run here)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    match = re.search(r"test_docs_program_runs[^\n]*\n```python\n(.*?)\n```", text, re.S)
    assert match, "the complete program block was not found in docs/distributed.md"
    script = tmp_path / "program.py"
    script.write_text(match.group(1))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_trust_ratio_fields_match_the_families_hyper_tuples():
    """launch_trust_ratio finds max_unorm and trust_eps by position in a family's hyper tuple: pin them."""
    from kbit.optim import families

    config = {"betas": (0.5, 0.25), "eps": 1e-3, "weight_decay": 0.125, "max_unorm": 7.0, "skip_zeros": False}
    for family in (families.ADAM, families.MOMENTUM, families.RMSPROP):
        at, eps_at = kdist._TRUST_FIELDS[family.op]
        hyper = family.hyper(config)
        assert hyper[at] == 7.0, family.op
        if eps_at is not None:
            assert hyper[eps_at] == 1e-3, family.op
