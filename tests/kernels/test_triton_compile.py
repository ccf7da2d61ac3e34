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
            if arch == 90 and name.startswith("prefill d=128") and "spill_stack=" in resources:
                # the main loops once carried [D, N] tensors of 64-bit pointers: 0.5-2 KB of
                # stack per thread in every head_dim-128 config on Hopper (Triton 3.6/3.7)
                assert resources.endswith("spill_stack=0"), f"{name} sm_90 spills: {resources}"


def test_autotuning_off_leaves_each_kernel_its_first_config():
    """ESP_TRITON_AUTOTUNE=0 (gpu_check's tests on a fresh GPU host): one config per
    autotuned kernel, the first of the tuned list, so nothing else is compiled or timed."""
    import json
    import os
    import subprocess
    import sys

    probe = (
        "import json\n"
        "from esp_serve.kernels import triton_decode as d, triton_prefill as p\n"
        "print(json.dumps([[c.all_kwargs() for c in k.configs] for k in (p._prefill_kernel, d._slot_kernel)]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {}
    for flag in ("1", "0"):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=dict(env, ESP_TRITON_AUTOTUNE=flag),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        runs[flag] = json.loads(out.strip().splitlines()[-1])
    for tuned, first in zip(runs["1"], runs["0"]):
        assert len(tuned) > 1
        assert first == tuned[:1]
