"""Tensor parallelism served over HTTP: an ESP group of 2 instances x TP 2 (4 rank actors
in 2 placement-group bundles, one world group of 4 ranks) next to the same model at TP 1.

A tiny random Llama with 2 KV heads (one per TP rank) is created by the test. Greedy
completions of 7, 2,000 and 6,000 tokens (the last one cannot fit one instance's KV pool:
a ring prefill across both TP instances, then distributed decode) must equal transformers'
own greedy generation and the TP 1 app's output, token for token; both groups' pools are
fully free afterwards."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.live.test_esp_serving import prompt_ids, token_ids
from tests.serve_session import ServeClient

pytestmark = pytest.mark.slow

KV_SLOTS = 4096  # per instance: a 6,000-token prompt needs both
MAX_MODEL_LEN = 8192
MAX_TOKENS = 8
SERVED = "tiny-tp"
PROMPT_LENS = (7, 2000, 6000)


def app_config(model_dir: str, tp: int) -> dict:
    tiny = {"CPU": 0.01}  # 2 cores for 6 rank actors, 2 controllers, an ingress
    return {
        "model": {
            "path": model_dir,
            "tokenizer": "builtin",
            "served_name": SERVED,
            "max_model_len": MAX_MODEL_LEN,
            "dtype": "float32",
        },
        "cluster": {
            "num_instances": 2,
            "tensor_parallel_size": tp,
            "instance_resources": tiny,
            "controller_resources": tiny,
            "kv_slots_per_instance": KV_SLOTS,
            "num_threads_per_instance": 1,
            "group_init_timeout_s": 60,
            "comm_timeout_s": 120,
        },
        "scheduler": {"policy": "esp"},
        "server": {
            "api_keys_env": None,
            "ingress_max_replicas": 1,
            "ingress_num_cpus": 0.01,
            "request_timeout_s": 300,
        },
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.support.esp import save_tiny_model

    return str(
        save_tiny_model(tmp_path_factory.mktemp("tp_serve") / "tiny", seed=5, num_heads=4, num_kv_heads=2)
    )


@pytest.fixture(scope="module")
def apps(model_dir):
    """{tp: client} for the same model served at TP 2 and at TP 1."""
    from tests.serve_session import deploy, release

    clients = {}
    try:
        for tp in (2, 1):
            base, timings = deploy(f"tp{tp}", f"/tp{tp}", app_config(model_dir, tp), health_timeout_s=300)
            clients[tp] = ServeClient(base, "unused", timings, KV_SLOTS, 2, timeout_s=300.0)
        yield clients
    finally:
        for tp in clients:
            release(f"tp{tp}")


def served_greedy(client: ServeClient, ids: list[int]) -> tuple[list[int], float]:
    body = {
        "model": SERVED,
        "prompt": ids,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
        "return_tokens_as_token_ids": True,
    }
    t0 = time.perf_counter()
    with httpx.Client(base_url=client.base_url, timeout=client.timeout_s) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return token_ids(r.json()["choices"][0]), time.perf_counter() - t0


def transformers_greedy(model_dir: str, prompts: dict[int, list[int]]) -> dict[int, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # never stop early: the served requests ignore EOS
    gen = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = {}
    with torch.no_grad():
        for n, ids in prompts.items():
            seq = hf.generate(torch.tensor([ids]), generation_config=gen)[0]
            out[n] = seq[len(ids) :].tolist()
    return out


@pytest.fixture(scope="module")
def prompts() -> dict[int, list[int]]:
    return {n: prompt_ids(n, seed=n) for n in PROMPT_LENS}


@pytest.fixture(scope="module")
def expected(model_dir, prompts) -> dict[int, list[int]]:
    return transformers_greedy(model_dir, prompts)


def rank_actors(group_id: str) -> list[str]:
    import ray

    prefix = f"esp-instance-{group_id}"  # replacements: {group_id}r1-...
    return sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    )


def test_tp2_x2_serves_what_transformers_and_tp1_generate(apps, prompts, expected):
    got: dict[int, dict[int, list[int]]] = {1: {}, 2: {}}
    for n, ids in prompts.items():
        for tp in (2, 1):
            got[tp][n], elapsed = served_greedy(apps[tp], ids)
            print(f"TP {tp} x 2 instances: {n}-token prompt, {MAX_TOKENS} tokens in {elapsed:.2f} s")
    for n in PROMPT_LENS:
        assert len(expected[n]) == MAX_TOKENS
        assert got[2][n] == expected[n], (n, got[2][n], expected[n])
        assert got[1][n] == expected[n], (n, got[1][n], expected[n])
    status = apps[2].status()
    assert status["tensor_parallel_size"] == 2
    assert status["cost_model"]["nodes"] == 1  # the placement read back when the group formed
    # 2 instances x 2 TP ranks, each rank its own actor
    gid = status["group_id"]
    assert rank_actors(gid) == [f"esp-instance-{gid}-{i}{s}" for i in (0, 1) for s in ("", "-tp1")]
    # the 6,000-token prompt was prefilled on both TP instances (a ring of 2)
    assert status["prefill_dop_counts"].get("2", 0) >= 1, status["prefill_dop_counts"]
    for tp in (2, 1):
        apps[tp].wait_pool_free()


def test_a_lost_tp_rank_replaces_its_whole_instance(apps, prompts, expected):
    """Killing TP rank 1 of instance 1 rebuilds the group with both ranks of instance 1
    new; it then serves exactly what it did before."""
    import ray

    app = apps[2]
    before = app.status()
    gid = before["group_id"]
    victim = f"esp-instance-{gid}-1-tp1"
    namespace = next(
        a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == victim
    )
    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)
    # the next plan for instance 1 (or a health check) finds the rank gone
    for n in (6000, 7):
        got, _ = served_greedy(app, prompts[n])
        assert got == expected[n], n
    status = app.wait_pool_free()
    assert status["recoveries"] == before["recoveries"] + 1
    assert status["instances_answering"] == 2
    # instance 0 kept its ranks; both ranks of instance 1 were replaced
    assert rank_actors(gid) == [
        f"esp-instance-{gid}-0",
        f"esp-instance-{gid}-0-tp1",
        f"esp-instance-{gid}r1-1",
        f"esp-instance-{gid}r1-1-tp1",
    ]
