"""The real ESP scheduler (`esp` and `loongserve` modes) through the simulator: every
request finishes exactly once, KV is never over-committed (the simulator's own ledger),
every plan passes esp_core.sched's check_plan, and runs are deterministic."""

import json

import pytest

from esp_core.sched.plan_check import check_plan, snapshot
from esp_core.sim.policies import LayoutConfig, build_scheduler, cluster_for
from esp_core.sim.simulator import Simulator
from esp_core.sim.workloads import generate


def esp_checker(scheduler):
    before = snapshot(scheduler)
    return lambda plan: check_plan(plan, before, allow_shared_instances=True)


def run(policy, workload, n, rate, cost_model, seed=1, chunked=None, layout=None):
    layout = layout or LayoutConfig()
    cluster = cluster_for(policy, layout)
    sched = build_scheduler(policy, cluster, cost_model, workload, layout, chunked)
    res = Simulator(sched, cost_model, plan_checker=esp_checker).run(generate(workload, n, rate, seed=seed))
    for r in res.records:
        assert r.rejected is None and r.finished_ok, r
    assert not sched.has_unfinished()
    sched.check_invariants()
    return res


@pytest.mark.parametrize("policy", ["esp", "loongserve"])
@pytest.mark.parametrize("workload,n,rate", [("sharegpt", 40, 20.0), ("mixed", 9, 0.5)])
def test_esp_policies_finish_everything(policy, workload, n, rate, cost_model):
    run(policy, workload, n, rate, cost_model)


def test_esp_chunked_prefill_runs_chunks_and_is_deterministic(cost_model):
    # (neither adaptive nor whole prompts: with no short request around, each prompt
    # would go whole)
    layout = LayoutConfig(
        esp_overrides=(("adaptive_chunking", False), ("whole_prompts_without_shorts", False))
    )
    a = run("esp", "lv-eval", 4, 0.2, cost_model, seed=3, chunked=True, layout=layout)
    assert a.stats.prefill_batches > 4  # long prompts went in several chunks
    b = run("esp", "lv-eval", 4, 0.2, cost_model, seed=3, chunked=True, layout=layout)
    assert json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)


def test_esp_on_a_tight_pool(cost_model):
    """Small instances force waiting, pauses and possibly preemption; all still finish."""
    layout = LayoutConfig(gpus=4, tp=1, kv_tokens_per_gpu=20_000)
    run("esp", "sharegpt", 40, 40.0, cost_model, layout=layout)


def test_esp_config_overrides_for_ablations():
    from esp_core.sim.policies import esp_config

    cfg = esp_config("esp", "mixed", overrides={"short_reserved_instances": 0, "spread_chunk_kv": False})
    assert cfg.chunked_prefill and cfg.short_reserved_instances == 0 and not cfg.spread_chunk_kv
    assert cfg.adaptive_chunking and cfg.whole_prompts_without_shorts
    assert not esp_config("esp", "mixed", overrides={"adaptive_chunking": False}).adaptive_chunking
    assert esp_config("loongserve", "mixed", overrides={"max_skip_ahead": 2}).max_skip_ahead == 2
    with pytest.raises(ValueError):
        esp_config("esp", "mixed", overrides={"no_such_knob": 1})


def test_cli_esp_set_reaches_the_scheduler(tmp_path):
    from esp_core.sim.cli import main

    out = tmp_path / "r.json"
    assert (
        main(
            [
                "run",
                "--policy",
                "esp",
                "--workload",
                "lv-eval",
                "--rate",
                "0.2",
                "--num-requests",
                "3",
                "--esp-set",
                "short_reserved_instances=0",
                "--esp-set",
                "short_wait_budget_s=0.2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    cfg = json.loads(out.read_text())["config"]
    assert cfg["esp_overrides"] == {"short_reserved_instances": 0, "short_wait_budget_s": 0.2}


def test_instance_seconds_split_the_busy_time_and_decode_sizes_count_every_step(cost_model):
    res = run("loongserve", "sharegpt", 40, 20.0, cost_model)  # (no migrations: busy = batches)
    s = res.stats
    assert s.prefill_inst_s > 0 and s.decode_inst_s > 0
    assert s.prefill_inst_s + s.decode_inst_s == pytest.approx(sum(s.busy_s), rel=1e-9)
    assert sum(s.decode_batch_hist.values()) == s.decode_steps


def test_esp_decode_merges_through_the_simulator(cost_model):
    """Merged groups' migrations and steps pass the plan checks and the simulator's ledger."""
    layout = LayoutConfig(esp_overrides=(("merge_decode_groups", True),))
    res = run("esp", "mixed", 12, 0.5, cost_model, layout=layout)
    assert res.stats.migrations > 0
