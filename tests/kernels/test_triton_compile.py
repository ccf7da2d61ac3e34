"""Every Triton kernel compiles for real GPUs (sm_90, sm_80) on this CPU-only machine.

The interpreter runs kernels as numpy code and accepts things the GPU compiler refuses
(dot shapes, dtype mixes, constexpr misuse); compiling ahead of time for a named target
catches those without a GPU. One autotune config per kernel variant here; run
`python -m esp_serve.kernels.compile_check --all-configs` for every config with register use.
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _variants():
    from esp_serve.kernels import compile_check as cc

    wanted = {
        "prefill d=128 causal=True acc=True",
        "prefill d=128 causal=False acc=False",
        "prefill d=64 causal=True acc=False",
        "prefill d=32 causal=True acc=False",
        "slot d=128 block_m=16",
        "slot d=64 block_m=64",
        "merge d=128",
        "causal_bounds",
    }
    return [v for v in cc.variants(all_configs=False) if v[0] in wanted]


def test_all_kernels_compile_for_hopper_and_ampere(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from esp_serve.kernels import compile_check as cc

    variants = _variants()
    assert len(variants) == 8
    for name, kernel, sig, const, cfgs in variants:
        meta, warps, stages = cfgs[0]
        for arch in (90, 80) if name == "prefill d=128 causal=True acc=True" else (90,):
            compiled, resources = cc.compile_one(kernel, sig, const, meta, warps, stages, arch)
            assert compiled.asm["cubin"], f"{name} sm_{arch}: no cubin"
            print(f"sm_{arch} {name}: {resources}")
