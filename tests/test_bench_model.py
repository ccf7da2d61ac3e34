"""scripts/bench_model.py's graph-vs-eager verdict: a differing greedy token fails the run
only when it is not a near-tie (CUDA graph and eager decode need not be bit-identical, and
a random model's bf16 logits often have their top two within an ulp)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_model", REPO / "scripts" / "bench_model.py")
assert _spec is not None and _spec.loader is not None
bench_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_model)

BF16 = torch.bfloat16


def _logits(rows: list[list[float]]) -> torch.Tensor:
    """fp32 logits as compute_logits returns them: bf16 values widened."""
    return torch.tensor(rows).to(BF16).float()


def test_equal_greedy_tokens_are_no_disagreement():
    eager = _logits([[5.5, 1.0, -2.0], [0.25, 3.0, 2.0]])
    assert bench_model.disagreements_beyond_ties(eager.clone(), eager, BF16) == 0


def test_a_flip_between_logits_an_ulp_apart_is_a_near_tie():
    # at 5.5 a bf16 ulp is 2^-5: 5.5 and 5.46875 are neighbours
    eager = _logits([[5.5, 5.46875, 0.0]])
    graph = _logits([[5.46875, 5.5, 0.0]])  # each moved by one ulp: the argmax flips
    assert graph.argmax(-1) != eager.argmax(-1)
    assert bench_model.disagreements_beyond_ties(graph, eager, BF16) == 0


def test_a_flip_to_a_clearly_worse_token_counts():
    eager = _logits([[5.5, 4.0, 0.0], [1.0, 2.0, 3.0]])
    graph = _logits([[3.0, 4.0, 6.0], [1.0, 2.0, 3.0]])  # row 0 picks eager's worst token
    assert bench_model.disagreements_beyond_ties(graph, eager, BF16) == 1


def test_the_tie_band_scales_with_the_logit_and_the_dtype():
    # 4 ulps at 40.0 in bf16 is 1.0: 39.25 is inside, 38.5 outside
    eager = _logits([[40.0, 39.25, 38.5], [40.0, 39.25, 38.5]])
    graph = _logits([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert bench_model.disagreements_beyond_ties(graph, eager, BF16) == 1
    # in fp32 an ulp at 40 is ~4e-6: both flips count
    assert bench_model.disagreements_beyond_ties(graph, eager, torch.float32) == 2
