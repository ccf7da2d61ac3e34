"""Sampling: processing order and formulas, support restriction, seeded reproducibility."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.sampling import SampleRow, nucleus, process_logits, sample
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import SamplingParams
from tests.support.runtime import generate

V = 32
EOS = 31


def _logits(n: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(n, V, generator=g)


def _row(params: SamplingParams, index: int = 0, prompt=(1, 2, 3), outputs=(), rid="r") -> SampleRow:
    return SampleRow(rid, params, tuple(prompt), tuple(outputs), index)


def _draws(logits: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    """n draws of one row, one per output index (each index has its own randomness)."""
    return [sample(logits, [_row(params, index=i)])[0].token_id for i in range(n)]


def test_greedy_is_argmax():
    logits = _logits(4)
    rows = [_row(SamplingParams(temperature=0.0), rid=str(i)) for i in range(4)]
    assert [s.token_id for s in sample(logits, rows)] == logits.argmax(-1).tolist()


def test_plain_greedy_rows_with_a_nan_never_pick_it():
    """Plain greedy rows take the argmax of the raw logits only when every logit is
    finite: a NaN (which argmax would pick) or +inf goes through the guarded path."""
    logits = _logits(2)
    logits[0, 5] = float("nan")
    logits[1, 7] = float("inf")
    rows = [_row(SamplingParams(temperature=0.0), rid=str(i)) for i in range(2)]
    guarded = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    assert [s.token_id for s in sample(logits, rows)] == guarded.argmax(-1).tolist()
    assert sample(logits, rows)[0].token_id != 5


def test_plain_greedy_rows_batched_with_processed_ones_sample_as_alone():
    logits = _logits(3, seed=3)
    plain = SamplingParams(temperature=0.0)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=50.0)
    top = int(logits[1].argmax())
    rows = [_row(plain, rid="a"), _row(penalised, prompt=(top,), rid="b"), _row(plain, rid="c")]
    together = [s.token_id for s in sample(logits, rows)]
    alone = [sample(logits[i : i + 1], [r])[0].token_id for i, r in enumerate(rows)]
    assert together == alone
    assert together[1] != top  # the penalty applied in the mixed batch


def test_seeded_draw_is_independent_of_batch_composition():
    logits = _logits(3, seed=1)
    target = SamplingParams(temperature=1.0, seed=1234)
    for index in range(10):
        alone = sample(logits[1:2], [_row(target, index, rid="t")])[0].token_id
        others = [SamplingParams(temperature=0.7, seed=9), SamplingParams(temperature=0.0)]
        batch = sample(
            logits, [_row(others[0], 3, rid="x"), _row(target, index, rid="t"), _row(others[1], rid="y")]
        )
        assert batch[1].token_id == alone


def test_seed_and_index_fix_the_draw_and_different_seeds_differ():
    logits = torch.zeros(1, V)  # uniform: every draw is informative
    a = _draws(logits, SamplingParams(temperature=1.0, seed=7), 20)
    b = _draws(logits, SamplingParams(temperature=1.0, seed=7), 20)
    c = _draws(logits, SamplingParams(temperature=1.0, seed=8), 20)
    assert a == b and a != c
    assert len(set(a)) > 5  # different output indices draw differently


def test_unseeded_requests_are_still_deterministic_per_request_id():
    logits = torch.zeros(1, V)
    p = SamplingParams(temperature=1.0, seed=None)
    one = [sample(logits, [_row(p, i, rid="req-1")])[0].token_id for i in range(10)]
    again = [sample(logits, [_row(p, i, rid="req-1")])[0].token_id for i in range(10)]
    other = [sample(logits, [_row(p, i, rid="req-2")])[0].token_id for i in range(10)]
    assert one == again and one != other


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.full((1, V), float("-inf"))
    logits[0, :3] = probs.log()
    counts = Counter(_draws(logits, SamplingParams(temperature=1.0, seed=3), 3000))
    assert set(counts) <= {0, 1, 2}
    for tok, p in enumerate(probs.tolist()):
        assert counts[tok] / 3000 == pytest.approx(p, abs=0.03)


def test_top_k_restricts_support():
    logits = _logits(seed=2)
    top = set(logits[0].topk(4).indices.tolist())
    drawn = set(_draws(logits, SamplingParams(temperature=5.0, top_k=4, seed=1), 300))
    assert drawn == top  # high temperature: all of the top 4 show up, nothing else
    assert _draws(logits, SamplingParams(temperature=1.0, top_k=1, seed=1), 20) == [int(logits.argmax())] * 20


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.full((V,), float("-inf"))
    logits[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def kept(p):
        ids, weights = nucleus(logits[None], [-1], [p])
        return sorted(ids[0][weights[0] > 0].tolist())

    assert kept(0.0) == [0]
    assert kept(0.4) == [0]
    assert kept(0.7) == [0, 1]
    assert kept(0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8: token 2 is not needed
    assert kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]
    drawn = set(_draws(logits[None], SamplingParams(temperature=1.0, top_p=0.7, seed=5), 300))
    assert drawn == {0, 1}


def _nucleus_by_sorting(logits: torch.Tensor, top_p: float) -> list[int]:
    """The definition, on the whole sorted row: a token stays while the mass strictly
    before it is < top_p (the top token always stays)."""
    probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
    before = torch.cumsum(probs, dim=-1) - probs
    keep = before < top_p
    keep[0] = True
    return sorted(order[keep].tolist())


def test_a_wide_nucleus_grows_past_the_first_candidates():
    """A flat row: the 0.9 nucleus holds most of 5000 tokens, far more than the first
    candidates (NUCLEUS_CANDIDATES): it must come out whole, as sorting the row says."""
    logits = 0.1 * torch.randn(5000, generator=torch.Generator().manual_seed(6))
    ids, weights = nucleus(logits[None], [-1], [0.9])
    kept = sorted(ids[0][weights[0] > 0].tolist())
    assert len(kept) > 4000
    assert kept == _nucleus_by_sorting(logits, 0.9)
    # and a draw never leaves it
    rows = [_row(SamplingParams(temperature=1.0, top_p=0.9, seed=2), index=i) for i in range(50)]
    drawn = {sample(logits[None], [r])[0].token_id for r in rows}
    assert drawn <= set(kept)


def test_top_p_draws_follow_the_renormalised_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = torch.full((1, V), float("-inf"))
    logits[0, :4] = probs.log()
    counts = Counter(_draws(logits, SamplingParams(temperature=1.0, top_p=0.75, seed=4), 3000))
    assert set(counts) == {0, 1, 2}  # mass before token 3 is 0.9 >= 0.75
    for tok, p in enumerate([0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9]):
        assert counts[tok] / 3000 == pytest.approx(p, abs=0.03)


def test_restricted_draws_are_independent_of_batch_composition():
    """Rows with different candidate counts (a top-k of 1000, a wide nucleus, plain
    temperature) in one call: each draws what it draws alone."""
    vocab = 3000
    logits = 0.2 * torch.randn(4, vocab, generator=torch.Generator().manual_seed(8))
    params = [
        SamplingParams(temperature=0.9, top_k=1000, seed=1),
        SamplingParams(temperature=1.0, top_p=0.95, seed=2),
        SamplingParams(temperature=0.7, seed=3),
        SamplingParams(temperature=1.2, top_k=20, top_p=0.5, seed=4, logprobs=3),
    ]
    for index in range(5):
        rows = [_row(p, index, rid=f"r{i}") for i, p in enumerate(params)]
        together = sample(logits, rows)
        for i, row in enumerate(rows):
            assert sample(logits[i : i + 1], [row])[0] == together[i]


def test_penalties_follow_vllm_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5] + [0.0] * (V - 5)])
    prompt, outputs = (0, 1), (2, 2, 3)
    rep = process_logits(logits, [_row(SamplingParams(repetition_penalty=2.0), 3, prompt, outputs)])
    # Prompt and output tokens (0, 1, 2, 3): positive / 2, negative * 2; token 4 untouched.
    assert rep[0, :5].tolist() == [1.0, -4.0, 0.5, -2.0, 0.5]
    freq = process_logits(logits, [_row(SamplingParams(frequency_penalty=0.5), 3, prompt, outputs)])
    # Output counts only: token 2 twice, token 3 once; prompt tokens untouched.
    assert freq[0, :5].tolist() == [2.0, -2.0, 0.0, -1.5, 0.5]
    pres = process_logits(logits, [_row(SamplingParams(presence_penalty=0.25), 3, prompt, outputs)])
    assert pres[0, :5].tolist() == [2.0, -2.0, 0.75, -1.25, 0.5]


def test_penalties_of_a_batch_are_each_rows_own():
    """Rows with different penalties (and none) processed together: each row comes out
    as it does alone."""
    logits = _logits(4, seed=5)
    rows = [
        _row(SamplingParams(repetition_penalty=1.3), 2, (1, 2, 40), (3, 3), rid="a"),
        _row(SamplingParams(frequency_penalty=0.7, presence_penalty=0.2), 3, (4,), (5, 5, 6), rid="b"),
        _row(SamplingParams(), 1, (7,), (8,), rid="c"),
        _row(
            SamplingParams(repetition_penalty=0.8, presence_penalty=1.0, logit_bias=((9, 2.5),)),
            2,
            (9,),
            (9, 10),
            rid="d",
        ),
    ]
    together = process_logits(logits, rows, eos_token_ids=(EOS,))
    for i, row in enumerate(rows):
        assert torch.equal(together[i], process_logits(logits[i : i + 1], [row], eos_token_ids=(EOS,))[0])


def test_penalty_changes_the_sampled_distribution():
    logits = torch.zeros(1, V)
    logits[0, 5] = 3.0
    plain = sample(logits, [_row(SamplingParams(temperature=0.0), outputs=(5, 5), index=2)])
    penal = sample(
        logits, [_row(SamplingParams(temperature=0.0, frequency_penalty=2.0), outputs=(5, 5), index=2)]
    )
    assert plain[0].token_id == 5 and penal[0].token_id != 5


def test_logit_bias_is_added():
    logits = _logits()
    bias = ((3, 100.0), (4, -5.0), (V + 10, 1.0))  # out-of-vocab ids are ignored
    out = process_logits(logits, [_row(SamplingParams(logit_bias=bias))])
    expected = logits.clone()
    expected[0, 3] += 100.0
    expected[0, 4] -= 5.0
    assert torch.equal(out, expected)
    assert sample(logits, [_row(SamplingParams(temperature=1.0, logit_bias=bias, seed=1))])[0].token_id == 3


def test_min_tokens_masks_eos_and_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 7] = 5.0
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(7,))
    assert sample(logits, [_row(p, index=0)], eos_token_ids=(EOS,))[0].token_id not in (EOS, 7)
    assert sample(logits, [_row(p, index=1)], eos_token_ids=(EOS,))[0].token_id not in (EOS, 7)
    assert sample(logits, [_row(p, index=2)], eos_token_ids=(EOS,))[0].token_id == EOS


def test_logprobs_are_log_softmax_after_penalties_before_temperature():
    logits = _logits(seed=4)
    p = SamplingParams(temperature=0.5, top_k=3, seed=2, logprobs=V, frequency_penalty=1.0)
    (s,) = sample(logits, [_row(p, index=1, outputs=(0,))])
    ref = torch.log_softmax(process_logits(logits, [_row(p, index=1, outputs=(0,))]), -1)[0]
    assert s.logprob == pytest.approx(float(ref[s.token_id]), abs=1e-6)
    assert len(s.top_logprobs) == V
    assert math.fsum(math.exp(t.logprob) for t in s.top_logprobs) == pytest.approx(1.0, abs=1e-5)
    values = [t.logprob for t in s.top_logprobs]
    assert values == sorted(values, reverse=True)
    (s0,) = sample(logits, [_row(SamplingParams(temperature=0.0, logprobs=0))])
    assert s0.top_logprobs == () and s0.logprob is not None
    (none,) = sample(logits, [_row(SamplingParams(temperature=0.0))])
    assert none.logprob is None


def test_worker_seeded_sampling_is_independent_of_batch():
    worker = InstanceWorker(WorkerConfig(kv_slots=512))
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = [256, *b"Seeds"]
    alone = generate(worker, {"s": prompt}, 12, p)["s"]
    mixed = generate(
        worker,
        {"x": [256, *b"other"], "s": prompt, "y": [256]},
        12,
        {"x": SamplingParams(temperature=0.8, seed=1), "s": p, "y": greedy},
    )["s"]
    assert alone == mixed
    assert alone != generate(worker, {"s": prompt}, 12, greedy)["s"]
