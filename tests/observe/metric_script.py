"""One scripted life of an ESP group, fed to `EngineMetrics`, with the values it must
produce. Shared by the in-memory test and the Ray endpoint test so both check the same
numbers."""

from __future__ import annotations

from esp_core.sched.interface import FinishReason, RequestEvent
from esp_core.sched.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    SampledToken,
    TokenRange,
)


def _tok(rid: str, token_id: int = 7) -> RequestEvent:
    return RequestEvent(rid, token=SampledToken(rid, token_id))


def play(m) -> None:
    """Request a (100 prompt tokens) and b (50) arrive at t=0; both are prefilled together
    at t=0.5 on a ring of 4 instances that keeps the KV on instances 0 and 1 (a scale-down);
    both get their first token at t=2.0; a gets two more (t=2.1, 2.3) and finishes by
    length at 2.3; b is aborted at 3.0. A decode step puts a new token's KV on an instance
    that held none (a scale-up), one request is preempted."""
    m.on_request_arrived("a", 100, now=0.0)
    m.on_request_arrived("b", 50, now=0.0)
    prefill = PrefillBatch(
        batch_id=1,
        instances=(0, 1, 2, 3),
        items=(
            PrefillItem("a", TokenRange(0, 100), 0, (KVKeep(0, (TokenRange(0, 100),)),)),
            PrefillItem("b", TokenRange(0, 50), 0, (KVKeep(1, (TokenRange(0, 50),)),)),
        ),
    )
    m.on_plan(IterationPlan(plan_id=1, prefills=(prefill,)), now=0.5)
    m.on_events([_tok("a"), _tok("b")], now=2.0)
    decode = DecodeBatch(
        batch_id=2,
        instances=(0, 1, 2),
        items=(
            DecodeItem("a", 7, 100, master=0, holders=(0,), new_kv_instance=2),
            DecodeItem("b", 7, 50, master=1, holders=(1,), new_kv_instance=1),
        ),
    )
    m.on_plan(
        IterationPlan(plan_id=2, decodes=(decode,), releases=(Release("c", (3,), ReleaseReason.PREEMPTED),)),
        now=2.0,
    )
    m.on_events([_tok("a")], now=2.1)
    m.on_events([_tok("a"), RequestEvent("a", finish_reason=FinishReason.LENGTH)], now=2.3)
    m.on_events([RequestEvent("b", finish_reason=FinishReason.ABORT)], now=3.0)
    m.set_queue_state(running=3, waiting=7)
    m.set_kv_used(0, 120, total=1000)
    m.set_kv_used(1, 5, total=1000)
    m.on_cost_model_error(predicted_s=1.0, measured_s=2.0, batch_kind="prefill")


# (metric name, extra labels) -> expected value; histograms as (count, sum)
EXPECTED_HISTOGRAMS = {
    ("esp_time_to_first_token_seconds", ()): (2, 4.0),
    ("esp_inter_token_latency_seconds", ()): (2, 0.3),
    ("esp_e2e_request_latency_seconds", ()): (2, 5.3),
    ("esp_request_queue_time_seconds", ()): (2, 1.0),
    ("esp_prefill_dop", ()): (1, 4.0),
    ("esp_cost_model_error_ratio", (("batch_kind", "prefill"),)): (1, 0.5),
}
EXPECTED_COUNTERS = {
    ("esp_prompt_tokens_total", ()): 150,
    ("esp_generation_tokens_total", ()): 4,
    ("esp_scale_up_total", ()): 1,
    ("esp_scale_down_total", ()): 1,
    ("esp_preemptions_total", ()): 1,
    ("esp_request_success_total", (("finished_reason", "length"),)): 1,
    ("esp_request_success_total", (("finished_reason", "abort"),)): 1,
}
EXPECTED_GAUGES = {
    ("esp_num_requests_running", ()): 3,
    ("esp_num_requests_waiting", ()): 7,
    ("esp_kv_slots_used", (("instance", "0"),)): 120,
    ("esp_kv_slots_used", (("instance", "1"),)): 5,
    ("esp_kv_slots_total", (("instance", "0"),)): 1000,
}
