"""`model.rope_scaling`: a checkpoint trained with a short context, served with a RoPE
scaling override, computes what transformers computes with that `rope_scaling` in its
config, at positions beyond the checkpoint's original context (tests/support/hf_rope.py).

Tolerances as in test_hf_reference.py: HF computes RoPE angles in fp32, we in float64.
"""

from __future__ import annotations

import random

import pytest
import torch

from esp_core.runtime.config import UnsupportedModelError, WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from tests.runtime.hf_models import hf_greedy, hf_logits
from tests.support.hf_rope import ORIGINAL_CONTEXT, SCALINGS, VOCAB, scaled_pair
from tests.support.runtime import generate, reference_logits

LOGIT_ATOL = 1e-3
MARGIN = 2e-3
KV_SLOTS = 512


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return {name: scaled_pair(tmp_path_factory.mktemp(name), s) for name, s in SCALINGS.items()}


def _worker(path, rope_scaling) -> InstanceWorker:
    return InstanceWorker(WorkerConfig(model=str(path), kv_slots=KV_SLOTS, rope_scaling=rope_scaling))


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_the_context_grows_by_the_factor(name, pairs):
    path, _ = pairs[name]
    assert _worker(path, None).arch.max_context_len == ORIGINAL_CONTEXT
    arch = _worker(path, SCALINGS[name]).arch
    assert arch.rope_type == name
    assert arch.max_context_len == int(ORIGINAL_CONTEXT * SCALINGS[name]["factor"])


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_logits_match_transformers_beyond_the_original_context(name, pairs):
    """The last 48 positions of the scaled context (all past ORIGINAL_CONTEXT). For dynamic
    NTK this is also where HF's length-dependent base equals our frozen one (rope.py)."""
    path, reference = pairs[name]
    ours = _worker(path, SCALINGS[name]).model
    prompt = _prompt(48, seed=1)
    end = ours.arch.max_context_len
    positions = list(range(end - len(prompt), end))
    assert positions[0] > ORIGINAL_CONTEXT
    got = reference_logits(ours, prompt, positions)
    torch.testing.assert_close(got, hf_logits(reference, prompt, positions), atol=LOGIT_ATOL, rtol=0)
    # the override is what makes them match: the unscaled model computes something else
    unscaled = InstanceWorker(WorkerConfig(model=str(path), kv_slots=KV_SLOTS)).model
    in_context = list(range(len(prompt)))  # (the unscaled model refuses positions past 64)
    assert not torch.allclose(
        reference_logits(ours, prompt, in_context), reference_logits(unscaled, prompt, in_context), atol=1e-2
    )


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_greedy_generation_matches_transformers(name, pairs):
    """A 100-token prompt (past the original 64) prefilled and decoded by InstanceWorker
    against HF's greedy loop. Dynamic NTK is left out: HF rescales its base with each
    step's length, ours is frozen at the longest context (rope.py)."""
    path, reference = pairs[name]
    worker = _worker(path, SCALINGS[name])
    prompt = _prompt(100, seed=3)
    steps = 12
    ours = generate(worker, {"a": prompt}, steps)["a"]
    ref, margins = hf_greedy(reference, prompt, steps)
    compared = 0
    for mine, theirs, margin in zip(ours, ref, margins):
        if margin <= MARGIN:
            break
        assert mine == theirs, f"{name}: step {compared}: {ours} vs HF {ref}"
        compared += 1
    assert compared >= 4, f"{name}: too few confident steps ({margins})"
    assert worker.kv_free_slots() == KV_SLOTS


def test_an_invalid_override_is_refused_naming_the_key(pairs):
    path, _ = pairs["linear"]
    with pytest.raises(UnsupportedModelError, match="'beta_fast'"):
        WorkerConfig(model=str(path), rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 8})
    with pytest.raises(UnsupportedModelError, match="factor must be a number >= 1"):
        WorkerConfig(model=str(path), rope_scaling={"rope_type": "yarn"})
