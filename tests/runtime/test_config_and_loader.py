"""Config parsing/validation and the checkpoint loader's refusals and error messages."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from esp_core.runtime.builtin import builtin_arch, save_builtin
from esp_core.runtime.config import ModelArch, UnsupportedModelError, WorkerConfig
from esp_core.runtime.weights import CheckpointError, load_hf_checkpoint

BASE = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    rope_theta=10000.0,
    eos_token_id=[2, 3],
    bos_token_id=1,
)


def test_from_hf_config_basics():
    a = ModelArch.from_hf_config(BASE)
    assert (a.architecture, a.head_dim, a.num_kv_heads, a.eos_token_ids) == ("llama", 8, 1, (2, 3))
    assert a.rope_scaling is None and a.sliding_window is None
    hash(a)  # frozen and hashable (rope_scaling is a tuple of items)
    q = ModelArch.from_hf_config(
        {
            **BASE,
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "sliding_window": 64,
            "use_sliding_window": False,
        }
    )
    assert q.qkv_bias and not q.o_proj_bias and q.sliding_window is None
    m = ModelArch.from_hf_config(
        {**BASE, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    )
    assert m.sliding_window is None  # window >= context: plain full attention


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "supported model_type: llama"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "only causal LMs"),
        (
            {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 128},
            "sliding-window attention is not supported",
        ),
        (
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "sliding_window": 128,
                "use_sliding_window": True,
            },
            "sliding-window",
        ),
        (
            {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
            "rope type 'longrope' is not supported; supported: default, linear, dynamic, llama3, yarn",
        ),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "bogus": 1}}, "key 'bogus'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"num_key_value_heads": 3, "num_attention_heads": 2}, "multiple of num_kv_heads"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_configs_are_refused_clearly(change, message):
    with pytest.raises(UnsupportedModelError, match=message.replace("(", r"\(")):
        ModelArch.from_hf_config({**BASE, **change})


def test_both_rope_layouts_parse_identically():
    legacy = {
        **BASE,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    }
    new = {
        **BASE,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 5e5,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }
    new.pop("rope_theta")
    a, b = ModelArch.from_hf_config(legacy), ModelArch.from_hf_config(new)
    assert a == b and a.rope_type == "yarn" and a.rope_theta == 5e5


def test_to_hf_config_round_trips():
    for arch in (
        builtin_arch(),
        ModelArch.from_hf_config({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ):
        assert ModelArch.from_hf_config(arch.to_hf_config()) == arch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float64"}, "set one of float32, bfloat16, float16"),
        ({"device": "gpu"}, "set 'cpu', 'cuda' or 'cuda:N'"),
        ({"kv_slots": 0}, "kv_slots"),
        ({"kv_slots": True}, "kv_slots"),
        ({"num_threads": 0}, "num_threads"),
        ({"attention_backend": "xformers"}, "attention_backend"),
        ({"model": ""}, "model"),
    ],
)
def test_worker_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig(**kwargs)


def test_worker_config_defaults_and_cuda_spellings():
    c = WorkerConfig()
    assert c.is_builtin and c.dtype == "float32" and c.device == "cpu"
    WorkerConfig(device="cuda:1", dtype="bfloat16", num_threads=2)


# ------------------------------------------------------------------ loader errors
@pytest.fixture
def ckpt(tmp_path):
    return save_builtin(tmp_path / "m", seed=3)


def test_loads_the_saved_builtin_exactly(ckpt):
    from esp_core.runtime.builtin import builtin_state_dict

    arch, weights = load_hf_checkpoint(ckpt, progress=False)
    assert arch == builtin_arch()
    ref = builtin_state_dict(3)
    assert weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in ref)


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_checkpoint(tmp_path / "empty")


def test_no_weights_and_pickle_only(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_checkpoint(ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints"):
        load_hf_checkpoint(ckpt)


def test_missing_unexpected_and_misshapen_tensors(ckpt):
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(32)
    tensors["model.norm.weight"] = torch.ones(255)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as err:
        load_hf_checkpoint(ckpt)
    msg = str(err.value)
    assert "missing tensors: ['model.layers.0.mlp.up_proj.weight']" in msg
    assert "unexpected tensors: ['model.layers.0.self_attn.q_norm.weight']" in msg
    assert "model.norm.weight: checkpoint (255,) vs config (256,)" in msg


def test_unsupported_architecture_names_the_dir(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(model_type="phi3", architectures=["Phi3ForCausalLM"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="phi3"):
        load_hf_checkpoint(ckpt)


def test_sharded_index_errors(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="shard files that are missing"):
        load_hf_checkpoint(ckpt)
    (ckpt / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="malformed"):
        load_hf_checkpoint(ckpt)


@pytest.mark.parametrize(
    "scaling, expected",
    [
        (None, 256),
        ({"rope_type": "linear", "factor": 2.0}, 512),
        ({"rope_type": "dynamic", "factor": 4.0}, 1024),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            256,
        ),
    ],
)
def test_max_context_len_follows_rope_scaling(scaling, expected):
    assert ModelArch.from_hf_config({**BASE, "rope_scaling": scaling}).max_context_len == expected
