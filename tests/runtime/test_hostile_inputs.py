"""What a hostile request or checkpoint can no longer do to the runtime: NaN never picks a
token, and a sharded checkpoint's index cannot name files outside its directory."""

from __future__ import annotations

import json

import pytest
import torch

from esp_core.runtime.sampling import SampleRow, sample
from esp_core.runtime.weights import CheckpointError, _shard_files
from esp_core.sched.plan import SamplingParams


def _row(**params) -> SampleRow:
    return SampleRow("r", SamplingParams(**params), (1, 2, 3), (), 0)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0, "repetition_penalty": 1e-300},
        {"temperature": 1.0, "repetition_penalty": float("inf")},
        {"temperature": 1e-40},
        {"temperature": 1e-40, "logprobs": 3},
    ],
)
def test_extreme_values_never_sample_through_nan(params):
    """Values the ingress refuses, sent anyway: the token is a real argmax/draw over
    finite logits (token 2 dominates), never token 0 picked because of NaN."""
    logits = torch.full((1, 16), -5.0)
    logits[0, 2] = 5.0
    logits[0, 1] = 4.0  # a seen (prompt) token: the penalty pushes it to +-inf
    [tok] = sample(logits, [_row(**params)])
    assert tok.token_id in (1, 2)
    if tok.logprob is not None:
        assert all(
            torch.isfinite(torch.tensor(t.logprob)) or t.logprob == float("-inf") for t in tok.top_logprobs
        )


def test_nan_logits_are_refused_not_sampled():
    logits = torch.full((1, 8), float("nan"))
    with pytest.raises(ValueError, match="no finite value"):
        sample(logits, [_row(temperature=0.0)])
    logits[0, 5] = 1.0  # one finite logit: it is the only candidate
    assert sample(logits, [_row(temperature=1.0, seed=3)])[0].token_id == 5


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shards_outside_the_model_directory_are_refused(tmp_path, shard):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-1.safetensors", "b.weight": shard}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / "model-1.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="outside"):
        _shard_files(model)


def test_shards_inside_the_model_directory_are_found(tmp_path):
    (tmp_path / "sub").mkdir()
    index = {"weight_map": {"a": "model-1.safetensors", "b": "sub/model-2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("model-1.safetensors", "sub/model-2.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in _shard_files(tmp_path)] == ["model-1.safetensors", "model-2.safetensors"]
