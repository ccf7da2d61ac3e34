"""`model.rope_scaling` under ESP: a prompt past the checkpoint's original context,
prefilled in chunks across rings of 2 and 4 instances and decoded with rotating masters,
against transformers with the same `rope_scaling` (tests/support/hf_rope.py).

Teacher-forced with HF's greedy tokens, so every sampled position is compared: the whole
log-softmax vector within TOL, and the greedy token wherever HF's top-2 margin exceeds it.
"""

from __future__ import annotations

import random

import pytest
import torch

from esp_core.sched.plan import DecodeBatch, IterationPlan, NewRequest, Release, ReleaseReason, SamplingParams
from tests.runtime.hf_models import hf_greedy, hf_logits
from tests.support.esp import ESPCluster, decode_item, even_keep, next_id, prefill_batch, prefill_item
from tests.support.hf_rope import ORIGINAL_CONTEXT, SCALINGS, VOCAB, scaled_pair

pytestmark = pytest.mark.slow

TOL = 1e-3  # |logprob difference|: HF's fp32 RoPE angles against our float64 ones
KV_SLOTS = 256
PROMPT = 100  # past ORIGINAL_CONTEXT (64)
N_OUT = 4


def _assert_matches(tok, want: torch.Tensor, where: str) -> None:
    """tok: our SampledToken; want: HF's log-softmax [VOCAB] at the same position."""
    got = torch.full((VOCAB,), float("nan"))
    for t in tok.top_logprobs:
        got[t.token_id] = t.logprob
    err = float((got - want).abs().max())
    assert err < TOL, f"{where}: logprob error {err:.2e}"
    top2 = torch.topk(want, 2).values
    if float(top2[0] - top2[1]) > TOL:
        assert tok.token_id == int(torch.argmax(want)), where


@pytest.mark.parametrize("name", ["linear", "yarn"])
def test_chunked_esp_prefill_and_decode_match_transformers(name, dist_group, tmp_path):
    path, reference = scaled_pair(tmp_path / name, SCALINGS[name])
    cluster = ESPCluster(dist_group, str(path), KV_SLOTS, rope_scaling=SCALINGS[name])
    rng = random.Random(7)
    prompt = [rng.randrange(3, VOCAB) for _ in range(PROMPT)]
    outputs, _ = hf_greedy(reference, prompt, N_OUT)
    # position len(prompt) - 1 + j predicts output j: [N_OUT, VOCAB]
    want = torch.log_softmax(hf_logits(reference, prompt + outputs[:-1]), dim=-1)[PROMPT - 1 :]
    params = SamplingParams(max_tokens=N_OUT, temperature=0.0, ignore_eos=True, logprobs=VOCAB)
    new = (NewRequest("r", tuple(prompt), params),)
    try:
        # chunk 1 within the original context on (0, 1); chunk 2 past it on all four,
        # attending to chunk 1's KV where it stayed
        first = prefill_item("r", 0, 48, 1, even_keep(0, 48, (0, 1)), sample=False)
        cluster.execute(
            IterationPlan(next_id(), new_requests=new, prefills=(prefill_batch((1, 0), [first]),))
        )
        assert 48 < ORIGINAL_CONTEXT < PROMPT
        second = prefill_item("r", 48, PROMPT, 2, even_keep(48, PROMPT, (2, 3, 0)), cached_holders=(0, 1))
        sampled = cluster.execute(IterationPlan(next_id(), prefills=(prefill_batch((3, 2, 1, 0), [second]),)))
        _assert_matches(sampled["r"], want[0], f"{name} prefill")
        for j in range(N_OUT - 1):
            item = decode_item("r", outputs[j], PROMPT + j, j % 4, (0, 1, 2, 3), (j + 1) % 4, outputs[:j])
            batch = DecodeBatch(next_id(), (0, 1, 2, 3), (item,))
            sampled = cluster.execute(IterationPlan(next_id(), decodes=(batch,)))
            _assert_matches(sampled["r"], want[j + 1], f"{name} decode step {j}")
    finally:
        release = Release("r", (0, 1, 2, 3), ReleaseReason.FINISHED)
        cluster.execute(IterationPlan(next_id(), releases=(release,)))
    for free, total, holding, states in cluster.pool_states():
        assert free == total and not holding and not states, (free, total, holding, states)
