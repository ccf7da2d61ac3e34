"""A scripted request through the controller-side tracing, shared by the in-process test
and the Ray Serve handle test: chunked prefill (two chunks on different rings, scale-down
to 2 instances), then decode with a scale-up, a pause, and a finish by length."""

from __future__ import annotations

from esp_core.sched.interface import FinishReason, RequestEvent
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    PrefillBatch,
    PrefillItem,
    SampledToken,
    TokenRange,
)

PROMPT = 1000


def play(ct, request_id: str, carrier: dict) -> None:
    ct.on_request_arrived(request_id, carrier, PROMPT)
    chunk1 = PrefillBatch(
        10,
        (0, 1, 2, 3),
        (PrefillItem(request_id, TokenRange(0, 600), 0, (KVKeep(0, (TokenRange(0, 600),)),), sample=False),),
    )
    ct.on_plan(IterationPlan(1, prefills=(chunk1,)))
    ct.on_batch_result(BatchResult(10, "prefill", (0, 1, 2, 3), elapsed_s=0.5))
    chunk2 = PrefillBatch(
        11,
        (1, 2),
        (
            PrefillItem(
                request_id,
                TokenRange(600, PROMPT),
                0,
                (KVKeep(1, (TokenRange(600, PROMPT),)),),
                cached_holders=(0,),
            ),
        ),
    )
    ct.on_plan(IterationPlan(2, prefills=(chunk2,)))
    ct.on_batch_result(BatchResult(11, "prefill", (1, 2), (SampledToken(request_id, 5),), 0.3))
    ct.on_events([RequestEvent(request_id, token=SampledToken(request_id, 5))])
    for step, (holders, new_kv) in enumerate([((0, 1), 1), ((0, 1), 2)]):
        batch = DecodeBatch(
            20 + step,
            (0, 1, 2),
            (DecodeItem(request_id, 5, PROMPT + step, master=1, holders=holders, new_kv_instance=new_kv),),
        )
        ct.on_plan(IterationPlan(3 + step, decodes=(batch,)))
        ct.on_batch_result(BatchResult(20 + step, "decode", (0, 1, 2), (SampledToken(request_id, 6),), 0.01))
        ct.on_events([RequestEvent(request_id, token=SampledToken(request_id, 6))])
    ct.on_plan(IterationPlan(5, paused=(request_id,)))
    ct.on_events(
        [
            RequestEvent(
                request_id, finish_reason=FinishReason.LENGTH, num_prompt_tokens=PROMPT, num_output_tokens=3
            )
        ]
    )


def span_dicts(spans) -> list[dict]:
    """Finished spans as plain dicts (what crosses a process boundary in the Serve test)."""
    out = []
    for s in spans:
        out.append(
            {
                "name": s.name,
                "trace_id": s.context.trace_id,
                "span_id": s.context.span_id,
                "parent_span_id": s.parent.span_id if s.parent else None,
                "attributes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.attributes.items()},
                "events": [e.name for e in s.events],
                "status": s.status.status_code.name,
            }
        )
    return out


def check(spans: list[dict], trace_id: int, parent_span_id: int, request_id: str) -> None:
    """Assert the controller's spans of the scripted request."""
    by_name: dict[str, list[dict]] = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    assert sorted(by_name) == ["esp.decode", "esp.generate", "esp.prefill", "esp.queue"]
    (root,) = by_name["esp.generate"]
    assert root["trace_id"] == trace_id and root["parent_span_id"] == parent_span_id
    assert root["attributes"]["esp.request_id"] == request_id
    assert root["attributes"]["gen_ai.usage.input_tokens"] == PROMPT
    assert root["attributes"]["gen_ai.usage.output_tokens"] == 3
    assert root["attributes"]["gen_ai.response.finish_reasons"] == ["length"]
    assert root["events"] == ["gen_ai.first_token"]
    for name in ("esp.queue", "esp.prefill", "esp.decode"):
        for s in by_name[name]:
            assert s["trace_id"] == trace_id and s["parent_span_id"] == root["span_id"], name
    p1, p2 = sorted(by_name["esp.prefill"], key=lambda s: s["attributes"]["esp.batch_id"])
    assert p1["attributes"]["esp.prefill.dop"] == 4
    assert p1["attributes"]["esp.prefill.instances"] == [0, 1, 2, 3]
    assert p1["attributes"]["esp.prefill.keep_instances"] == [0]
    assert (p1["attributes"]["esp.prefill.chunk_start"], p1["attributes"]["esp.prefill.tokens"]) == (0, 600)
    assert p2["attributes"]["esp.prefill.dop"] == 2
    assert p2["attributes"]["esp.prefill.instances"] == [1, 2]
    assert p2["attributes"]["esp.prefill.tokens"] == 400
    (decode,) = by_name["esp.decode"]
    assert decode["attributes"]["esp.decode.steps"] == 2
    assert decode["events"] == ["esp.scale_up", "esp.paused"]
    assert all(s["status"] == "UNSET" for s in spans)
