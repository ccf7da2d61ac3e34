"""The KV pool sized from a memory budget, the activation reserve bounding prefill pieces,
and startup refusing budgets that cannot hold the model (in seconds, with the numbers)."""

from __future__ import annotations

import time

import pytest

from esp_core.runtime.builtin import builtin_arch
from esp_core.runtime.config import ModelArch, WorkerConfig
from esp_core.runtime.memory import (
    GIB,
    MemoryBudgetError,
    activation_bytes_per_token,
    plan_pool,
    weight_bytes,
)
from esp_core.runtime.worker import InstanceWorker
from esp_serve.app.config import ConfigError, load_config

# SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 -> 46,080 bytes of KV per token in fp32
SMOLLM2 = ModelArch(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def test_pool_is_what_the_budget_leaves_after_weights_and_activations():
    assert SMOLLM2.kv_bytes_per_token(4) == 30 * 2 * 3 * 64 * 4 == 46080
    weights = weight_bytes(SMOLLM2, 4)
    plan = plan_pool(SMOLLM2, "float32", 3 * GIB, weights, piece_tokens=8192)
    # activations take at most a quarter of what the weights leave: most of it is KV
    assert 4096 <= plan.piece_tokens <= 8192
    assert plan.activation_bytes < plan.kv_bytes
    assert plan.activation_bytes >= 8192 * activation_bytes_per_token(SMOLLM2, 4)
    left = 3 * GIB - weights - plan.activation_bytes
    assert plan.kv_slots == left // 46080
    assert plan.weight_bytes + plan.activation_bytes + plan.kv_bytes <= 3 * GIB
    # bf16 halves both weights and KV per token: about twice the tokens
    half = plan_pool(SMOLLM2, "bfloat16", 3 * GIB, weight_bytes(SMOLLM2, 2), piece_tokens=8192)
    assert half.kv_slots > 1.9 * plan.kv_slots


def test_an_explicit_pool_that_does_not_fit_is_refused_with_the_numbers():
    """The default CPU pool of 131072 tokens is 6 GiB for SmolLM2: 4 instances on a 24 GiB machine."""
    with pytest.raises(MemoryBudgetError) as err:
        plan_pool(SMOLLM2, "float32", 3 * GIB, weight_bytes(SMOLLM2, 4), 8192, kv_slots=131072)
    msg = str(err.value)
    for part in (
        "6.",
        "GiB",
        "3.00 GiB",
        "131072",
        "45.0 KiB/token",
        "kv_slots_per_instance",
        "memory_fraction",
    ):
        assert part in msg, (part, msg)
    ok = plan_pool(SMOLLM2, "float32", 3 * GIB, weight_bytes(SMOLLM2, 4), 8192, kv_slots=20000)
    assert ok.kv_slots == 20000


def test_weights_alone_over_the_budget_are_refused():
    with pytest.raises(MemoryBudgetError, match="weights 0.50 GiB"):
        plan_pool(SMOLLM2, "float32", GIB // 2, weight_bytes(SMOLLM2, 4), 8192)


def test_a_small_activation_budget_cuts_the_prefill_piece():
    """The activation reserve holds a piece, not a whole long prompt: the piece shrinks to fit
    (and the app chunks prefill to it) instead of the instance running out of memory."""
    arch = builtin_arch()
    per_token = activation_bytes_per_token(arch, 4)
    budget = 200 * 2**20  # 200 MiB: weights ~13 MiB, a workspace, then activations vs KV
    plan = plan_pool(arch, "float32", budget, weight_bytes(arch, 4), piece_tokens=131072)
    assert 256 <= plan.piece_tokens < 131072
    assert plan.activation_bytes >= plan.piece_tokens * per_token
    assert plan.kv_slots >= 1024
    cfg = load_config({"cluster": {"memory_gib_per_instance": 200 / 1024}})
    assert not cfg.with_memory_plan(plan.kv_slots, 131072).scheduler.chunk_tokens < 16384
    cut = cfg.with_memory_plan(plan.kv_slots, plan.piece_tokens)
    assert cut.scheduler.chunked_prefill and cut.scheduler.chunk_tokens == plan.piece_tokens
    assert cut.cluster_spec().kv_slots_per_instance == plan.kv_slots


def test_worker_sizes_its_pool_from_the_measured_weights():
    cfg = WorkerConfig(kv_slots=None, memory_budget_bytes=GIB // 4, prefill_piece_tokens=2048)
    worker = InstanceWorker(cfg)
    plan = worker.memory_plan
    assert plan is not None and worker.kv_total_slots() == plan.kv_slots > 1024
    assert plan.weight_bytes == builtin_arch().num_params * 4  # measured = parameter count
    assert "KV pool" in plan.describe() and "GiB" in plan.describe()


def test_worker_refuses_before_loading_weights():
    cfg = WorkerConfig(kv_slots=10**6, memory_budget_bytes=GIB // 4)
    t0 = time.monotonic()
    with pytest.raises(MemoryBudgetError, match="kv_slots_per_instance: 1000000"):
        InstanceWorker(cfg)
    assert time.monotonic() - t0 < 10


def test_impossible_budget_fails_the_config_in_seconds():
    """`serve run` builds the app with load_config: it raises before any replica or
    instance exists, so there is no restart loop to wait through."""
    from esp_serve.app.builder import build_app

    args = {"cluster": {"num_instances": 4, "memory_gib_per_instance": 0.25, "kv_slots_per_instance": 10**6}}
    t0 = time.monotonic()
    with pytest.raises(
        ConfigError, match="cluster: one instance needs .* GiB but its memory budget is 0.25 GiB"
    ):
        build_app(args)
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConfigError, match="memory budget"):
        load_config({"cluster": {"memory_fraction": 1e-6}})
    # a failure only an instance can see (a GPU's measured memory) ends after a few tries
    from esp_serve.app.builder import CONTROLLER_START_RETRIES, controller_options

    assert controller_options(load_config({}))["max_constructor_retry_count"] == CONTROLLER_START_RETRIES <= 3
