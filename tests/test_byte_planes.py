"""The avx512vbmi level's gather-free code lookups and searches (Note [gather-free lookups] in
csrc/cpu/byte_planes.h) against the scalar reference, bit for bit, on the maps that use them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kbit
import kbit.functional as F
from kbit import _C
from conftest import assert_bitwise_equal

HAS_VBMI = "avx512vbmi" in kbit.supported_cpu_capabilities()
needs_vbmi = pytest.mark.skipif(not HAS_VBMI, reason="this CPU has no AVX512-VBMI")

PLANE_MAPS = {
    "dynamic": F.create_dynamic_map(signed=True),
    "udynamic": F.create_dynamic_map(signed=False),
    "linear": F.create_linear_map(),
    "ulinear": F.create_linear_map(signed=False),
    # Fewer decades: coarser low binades, so sub-bins straddle binades differently.
    **{f"dynamic-e{e}": F.create_dynamic_map(signed=True, max_exponent_bits=e) for e in (1, 3, 5)},
}


def test_which_maps_take_the_byte_plane_search():
    # The optimizers' maps must take it (else the level is no faster); maps it cannot lay out fall back.
    for name, code in PLANE_MAPS.items():
        assert _C.byte_plane_search_usable(code), name
    # A midpoint at 0 (symmetric map without a zero) and repeated zeros cannot be placed.
    assert not _C.byte_plane_search_usable(F.create_linear_map(add_zero=False))
    assert not _C.byte_plane_search_usable(F.create_normal_map())


def _probe_values(code: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Every midpoint and its neighbours up to 300 ulps away (sub-bin and 8-bit position edges), and
    log-uniform values of both signs from 2^-40 to 1; each block of 64 starts with 1.0 so s = x."""
    mids = ((code[:-1] + code[1:]) / 2).contiguous()
    bits = mids.view(torch.int32)
    offsets = torch.tensor([0, 1, -1, 2, -2, 3, 127, -128, 255, -256, 256, 300, -300], dtype=torch.int32)
    near = (bits[:, None] + offsets[None, :]).reshape(-1).view(torch.float32)
    spread = torch.exp2(-40 * torch.rand(20000, generator=rng)) * torch.sign(torch.randn(20000, generator=rng))
    special = torch.tensor([0.0, -0.0, 1e-38, -1e-38, 1.0, -1.0])
    # Both ends of every binade from 2^-40 up (sub-bins may hold the top of one binade and the bottom of
    # the next), and the smallest floats.
    edges = (torch.arange(-40, 1, dtype=torch.int32)[:, None] + 127 << 23) + torch.tensor([0, 1, 2, -1, -2, -3], dtype=torch.int32)
    edges = torch.cat([edges.reshape(-1), torch.tensor([1, 2, 0x7FFFFF], dtype=torch.int32)]).view(torch.float32)
    values = torch.cat([near, spread, special, edges, -edges]).clamp(-1, 1)
    blocks = torch.nn.functional.pad(values, (0, (-values.numel()) % 63)).view(-1, 63)
    return torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)


@needs_vbmi
@pytest.mark.parametrize("name", list(PLANE_MAPS))
def test_search_and_lookup_match_the_scalar_reference(name, rng):
    code = PLANE_MAPS[name]
    x = _probe_values(code, rng)
    results = {}
    for level in ("scalar", "avx512vbmi"):
        with kbit.cpu_capability(level):
            q, absmax = torch.ops.kbit.quantize_blockwise(x, code, 64)
            # Dequantize every code in a tensor large enough for the byte-plane lookup (>= 2^14 elements).
            all_codes = torch.arange(256, dtype=torch.uint8).repeat(80)
            scales = torch.rand(all_codes.numel() // 64, generator=torch.Generator().manual_seed(1))
            d = torch.ops.kbit.dequantize_blockwise(all_codes, scales, code, 64, torch.float32)
            results[level] = (q, absmax, d)
    for got, want, what in zip(results["avx512vbmi"], results["scalar"], ("codes", "absmax", "dequantized")):
        assert_bitwise_equal(got, want, f"{name} {what}")


@needs_vbmi
@pytest.mark.parametrize("optimizer", ["Adam8bit", "Lion8bit"])
def test_optimizer_steps_match_the_scalar_reference(optimizer, rng):
    # Blocks of 256 take the pipelined requantization; 1000 elements end in a partial block.
    shapes = [(64, 256), (1000,)]
    init = [torch.randn(s, generator=rng) for s in shapes]
    grads = [[torch.randn(s, generator=rng) * 10.0 ** k for s in shapes] for k in (-3, 0, 2)]
    finals = {}
    for level in ("scalar", "avx512vbmi"):
        with kbit.cpu_capability(level):
            params = [torch.nn.Parameter(t.clone()) for t in init]
            opt = getattr(kbit.optim, optimizer)(params, lr=1e-2, min_8bit_size=0)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            finals[level] = [p.detach().clone() for p in params] + [
                v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
            ]
    for got, want in zip(finals["avx512vbmi"], finals["scalar"]):
        assert_bitwise_equal(got, want, optimizer)


def _default_level_in_fresh_process() -> str:
    env = {k: v for k, v in os.environ.items() if k != "KBIT_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import kbit; print(kbit.get_cpu_capability())"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@needs_vbmi
def test_default_level_prefers_byte_planes_only_on_amd():
    with open("/proc/cpuinfo") as f:
        amd = "AuthenticAMD" in f.read()
    assert _default_level_in_fresh_process() == ("avx512vbmi" if amd else "avx512")
