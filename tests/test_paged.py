"""Paged optimizers on CPU: state in memory-mapped files (kbit/optim/paged.py).

Checked: every Paged class trains bit for bit like its plain twin while its large states are file-backed;
state_dict is the plain format (ordinary tensors) and loading puts the state back into files; the files
go where they are told and disappear with the optimizer; resident anonymous memory does not grow by the
state size (measured from /proc/self/status); other devices get a one-time note.
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

import kbit.optim as O
from kbit.optim import paged

from conftest import assert_bitwise_equal

#: Every Paged class with its plain twin (PagedAdamW8bit -> AdamW8bit).
PAGED_PAIRS = [(cls, getattr(O, name[len("Paged"):])) for name, cls in sorted(vars(O).items())
               if name.startswith("Paged") and isinstance(cls, type)]
#: A paged parameter (>= PAGED_MIN_NUMEL, with a partial last block) and a small one that stays in memory.
SHAPES = [(300, 257), (7,)]
assert 300 * 257 >= paged.PAGED_MIN_NUMEL > 7

#: The RSS test's state: 2 x 32M float32 = 256 MiB (PagedAdamW32bit on a 32M-element parameter).
RSS_NUMEL = 32 * 2**20
#: Anonymous memory a step may add besides the state: the kernels' per-thread scratch, Python objects and
#: allocator slack. Generous against noise, and 1/16 of the state: a state kept in anonymous memory fails it.
MAX_ANON_GROWTH_BYTES = 16 * 2**20


def _run(cls, params, grads, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def _data(steps=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
    grads = [[torch.randn(s, generator=g) * 0.01 for s in SHAPES] for _ in range(steps)]
    return params, grads


def _big(ps):
    return ps[0]


def test_paged_pairs_are_twins():
    assert len(PAGED_PAIRS) >= 12
    for paged_cls, plain_cls in PAGED_PAIRS:
        assert paged_cls._FORCED_PAGED and not plain_cls._FORCED_PAGED
        assert paged_cls._FORCED_BITS == plain_cls._FORCED_BITS


@pytest.mark.parametrize("paged_cls,plain_cls", PAGED_PAIRS, ids=lambda c: c.__name__)
def test_paged_trains_bit_for_bit_like_plain(paged_cls, plain_cls):
    params, grads = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not implemented" warning on CPU any more
        a, opt_a = _run(paged_cls, params, grads)
    b, opt_b = _run(plain_cls, params, grads)
    assert opt_a.is_paged and not opt_b.is_paged
    for x, y in zip(a, b):
        assert_bitwise_equal(x.detach(), y.detach(), "param")
    big, small = opt_a.state[a[0]], opt_a.state[a[1]]
    for key in paged.PAGED_KEYS:
        if key in big:
            assert paged.is_file_backed(big[key]), f"{key} of the large parameter is not file-backed"
            assert_bitwise_equal(big[key], opt_b.state[b[0]][key], key)
        if key in small:
            assert not paged.is_file_backed(small[key]), f"{key} of a {SHAPES[1]} parameter should stay in memory"
    assert not any(paged.is_file_backed(t) for st in opt_b.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("paged_cls,plain_cls", [(O.PagedAdamW8bit, O.AdamW8bit), (O.PagedLion32bit, O.Lion32bit),
                                                 (O.PagedAdEMAMix8bit, O.AdEMAMix8bit)], ids=lambda c: c.__name__)
def test_state_dict_is_plain_and_loads_back_into_files(tmp_path, paged_cls, plain_cls):
    params, grads = _data(steps=5)
    a, opt_a = _run(paged_cls, params, grads[:3])
    b, opt_b = _run(plain_cls, params, grads[:3])
    path = tmp_path / "opt.pt"
    torch.save(opt_a.state_dict(), path)
    sd_a, sd_b = torch.load(path), opt_b.state_dict()
    # Same format as the plain optimizer's: same keys, plain tensors with the same bits.
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for k in sd_a["state"]:
        wa, wb = sd_a["state"][k], sd_b["state"][k]
        assert wa.keys() == wb.keys() and wa["step"] == wb["step"]
        wrapped = O.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY
        inner_a, inner_b = wa[wrapped], wb[wrapped]
        assert inner_a.keys() == inner_b.keys()
        for key in inner_a:
            assert type(inner_a[key]) is torch.Tensor
            assert_bitwise_equal(inner_a[key], inner_b[key], key)
    # Load into a fresh paged optimizer: state back in files, training continues identically.
    c = [torch.nn.Parameter(x.detach().clone()) for x in a]
    opt_c = paged_cls(c)
    opt_c.load_state_dict(torch.load(path))
    for key in paged.PAGED_KEYS:
        if key in opt_c.state[c[0]]:
            assert paged.is_file_backed(opt_c.state[c[0]][key]), key
    for gs in grads[3:]:
        for p, q, g in zip(c, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_c.step()
        opt_b.step()
    for x, y in zip(c, b):
        assert_bitwise_equal(x.detach(), y.detach(), "param after resume")


def _maps_with(prefix: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6
                and line.split(maxsplit=5)[5].startswith(prefix)]


def test_state_dir_setting_env_and_cleanup(tmp_path, monkeypatch):
    params, grads = _data(steps=1)
    env_dir, set_dir = tmp_path / "env", tmp_path / "set"
    monkeypatch.setenv(paged.ENV_VAR, str(env_dir))
    try:
        a, opt_a = _run(O.PagedAdamW8bit, params, grads)
        assert len(_maps_with(str(env_dir))) == 4  # state1, state2, absmax1, absmax2 of the large parameter
        O.set_paged_state_dir(set_dir)
        assert O.get_paged_state_dir() == str(set_dir)
        b, opt_b = _run(O.PagedLion, params, grads)
        assert len(_maps_with(str(set_dir))) == 1
    finally:
        O.set_paged_state_dir(None)
    # Note [unlinked state files]: nothing in the directories, the mappings are all that keep the data ...
    assert os.listdir(env_dir) == [] and os.listdir(set_dir) == []
    assert all(m.endswith("(deleted)") for m in _maps_with(str(tmp_path)))
    # ... and they go with the optimizer.
    del opt_a, opt_b, a, b
    gc.collect()
    assert _maps_with(str(tmp_path)) == []


def test_default_dir_is_a_private_temp_dir(monkeypatch):
    monkeypatch.delenv(paged.ENV_VAR, raising=False)
    d = O.get_paged_state_dir()
    assert os.path.isdir(d) and os.path.basename(d).startswith("kbit-paged-")
    assert O.get_paged_state_dir() == d  # made once


@pytest.mark.skipif(paged._fs_type("/dev/shm") != "tmpfs", reason="needs /dev/shm on tmpfs")
def test_tmpfs_dir_warns(monkeypatch):
    d = f"/dev/shm/kbit-test-{os.getpid()}"
    O.set_paged_state_dir(d)
    try:
        with pytest.warns(UserWarning, match="tmpfs"):
            paged.zeros((4,), torch.float32)
    finally:
        O.set_paged_state_dir(None)
        os.rmdir(d)


def test_other_devices_get_a_one_time_note():
    """Paging is CPU-only; elsewhere (meta stands in for CUDA here) the optimizer says so once, from the
    user's line, and keeps ordinary device state."""
    p = torch.nn.Parameter(torch.zeros(10, device="meta"))
    p.grad = torch.ones(10, device="meta")
    opt = O.PagedAdamW([p])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
    notes = [w for w in caught if "paged optimizer state is implemented on CPU only" in str(w.message)]
    assert len(notes) == 1 and notes[0].filename == __file__
    assert opt.state[p]["state1"].device.type == "meta"


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value, _ = line.split()
                out[key[:-1]] = int(value) * 1024
    return out


def test_resident_memory_of_paged_state_is_file_backed_and_reclaimable():
    """256 MiB of AdamW32bit state: the step writes it all, yet anonymous memory stays flat (the pages are the
    files' page cache, RssFile), and dropping them (madvise) brings RssFile back down while the values stay."""
    if paged._fs_type(O.get_paged_state_dir()) in ("tmpfs", "ramfs"):
        pytest.skip("the paged-state directory is on tmpfs (set KBIT_PAGED_DIR to a disk directory)")
    state_bytes = 2 * RSS_NUMEL * 4
    p = torch.nn.Parameter(torch.full((RSS_NUMEL,), 0.5))
    p.grad = torch.full((RSS_NUMEL,), 0.25)
    opt = O.PagedAdamW32bit([p])
    warm = torch.nn.Parameter(torch.ones(8))  # load the kernels' code and thread pool before measuring
    warm.grad = torch.ones(8)
    O.AdamW32bit([warm]).step()
    gc.collect()
    start = _rss()
    opt.step()  # first step: makes the state (in files) and writes all of it
    first = _rss()
    before = first
    opt.step()
    after = _rss()
    first_growth = first["RssAnon"] - start["RssAnon"]
    print(f"\nfirst paged step (state made and written): RssAnon {first_growth / 2**20:+.1f} MiB")
    assert first_growth < MAX_ANON_GROWTH_BYTES
    files = paged.state_tensors(opt)
    assert sum(t.numel() * t.element_size() for t in files) == state_bytes
    anon_growth = after["RssAnon"] - before["RssAnon"]
    print(f"\nRSS with {state_bytes / 2**20:.0f} MiB of paged state: RssAnon {after['RssAnon'] / 2**20:.0f} MiB "
          f"(step added {anon_growth / 2**20:+.1f} MiB), RssFile {after['RssFile'] / 2**20:.0f} MiB")
    assert anon_growth < MAX_ANON_GROWTH_BYTES
    # The param and grad (2 x 128 MiB) are anonymous, the state is not: RssAnon < param + grad + slack.
    assert after["RssAnon"] < before["RssAnon"] + MAX_ANON_GROWTH_BYTES
    assert after["RssFile"] >= state_bytes * 0.9, "the state's pages should be resident file pages after a step"
    expected = opt.state[p]["state1"][:1000].clone()
    paged.release(files)
    dropped = _rss()
    print(f"after release: RssFile {dropped['RssFile'] / 2**20:.0f} MiB, RssAnon {dropped['RssAnon'] / 2**20:.0f} MiB")
    assert after["RssFile"] - dropped["RssFile"] >= state_bytes * 0.9
    assert torch.equal(opt.state[p]["state1"][:1000], expected)  # read back from the page cache / file
    del opt, files
    gc.collect()
    # The contrast that shows the measurement sees state memory: the plain optimizer's first step allocates
    # its 256 MiB of state as anonymous memory.
    plain = O.AdamW32bit([p])
    before = _rss()
    plain.step()
    grown = _rss()["RssAnon"] - before["RssAnon"]
    print(f"plain AdamW32bit, first step: RssAnon {grown / 2**20:+.0f} MiB")
    assert grown >= state_bytes * 0.9
