"""The SSE body of a streamed answer (app/streaming.py): chunks ready at one wake-up go
out as one body part that still parses as separate `data:` events in order; the end,
usage and [DONE] share the last part; stop strings, failures and the timeout end the
stream and cancel every controller stream."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from opentelemetry import trace
from ray.exceptions import RayActorError

from esp_core.tokenizer import load_tokenizer
from esp_serve.app.choices import Choice, Delta
from esp_serve.app.protocol import TokenEvent
from esp_serve.app.streaming import GROUP_STOPPED, sse_body, within
from esp_serve.app.telemetry import RequestSpan
from tests.support.streams import ScriptedStream

TOK = load_tokenizer("builtin")


def tokens(text: str, finish: str | None = "length", start: int = 0) -> list[TokenEvent]:
    """One event per byte of `text` (the builtin tokenizer is byte-level); the last ends it."""
    ids = list(text.encode())
    return [
        TokenEvent(t, num_output_tokens=start + k + 1, finish_reason=finish if k == len(ids) - 1 else None)
        for k, t in enumerate(ids)
    ]


def render(d: Delta | None) -> list[dict[str, Any]]:
    if d is None:
        return [{"opening": True}]
    return [{"index": d.choice.index, "text": d.text, "finish_reason": d.finish_reason}]


def run_body(streams: list[ScriptedStream], stops: list[str] | None = None, timeout_s: float = 30.0):
    """(body parts as yielded, the `data:` payloads in order, the choices)."""
    choices = [Choice(i, TOK, (256,), stops or []) for i in range(len(streams))]
    rs = RequestSpan(trace.INVALID_SPAN)

    async def collect() -> list[str]:
        body = sse_body(streams, choices, render, lambda: {"usage": 1}, rs, 1, timeout_s, "rid")
        return [part async for part in body]

    parts = asyncio.run(collect())
    events = [e for part in parts for e in part.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    payloads = [e[len("data: ") :] for e in events]
    return parts, [p if p == "[DONE]" else json.loads(p) for p in payloads], choices


def test_tokens_ready_together_are_one_part_of_separate_events_in_order():
    # one stream item with 5 tokens (a reader that fell behind), then 3 more with the end
    stream = ScriptedStream([tokens("hello", finish=None), tokens("abc", start=5)])
    parts, events, _ = run_body([stream])
    assert len(parts) == 3  # opening; the first item; the last item + usage + [DONE]
    assert events[0] == {"opening": True}
    assert [e["text"] for e in events[1:-2]] == list("helloabc")
    assert [e["finish_reason"] for e in events[1:-2]] == [None] * 7 + ["length"]
    assert events[-2:] == [{"usage": 1}, "[DONE]"]
    assert parts[-1].endswith('data: {"usage":1}\n\ndata: [DONE]\n\n')
    assert stream.cancelled


def test_several_choices_keep_each_choice_in_order():
    streams = [ScriptedStream([tokens("ab", finish=None), tokens("cd", start=2)]) for _ in range(3)]
    _, events, choices = run_body(streams)
    chunks = [e for e in events if isinstance(e, dict) and "index" in e]
    for i in range(3):
        assert "".join(e["text"] for e in chunks if e["index"] == i) == "abcd"
        assert [e["finish_reason"] for e in chunks if e["index"] == i][-1] == "length"
    assert events[-2:] == [{"usage": 1}, "[DONE]"]
    assert all(s.cancelled for s in streams) and all(c.finish_reason == "length" for c in choices)


def test_a_stop_string_ends_the_stream_and_cancels_it():
    stream = ScriptedStream([tokens("say STOP now", finish=None), tokens("never")], hang=True)
    _, events, choices = run_body([stream], stops=["STOP"])
    assert "".join(e["text"] for e in events[1:-2]) == "say "
    assert choices[0].finish_reason == "stop" and stream.cancelled
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("failure", "cause"), [(RayActorError(), GROUP_STOPPED), (RuntimeError("boom"), "RuntimeError")]
)
def test_a_broken_stream_sends_what_it_had_then_the_error(failure, cause):
    stream = ScriptedStream([tokens("ok", finish=None), failure])
    _, events, choices = run_body([stream])
    assert [e["text"] for e in events[1:3]] == ["o", "k"]
    assert events[3]["error"]["code"] == "generation_failed" and events[-1] == "[DONE]"
    assert choices[0].error == cause and stream.cancelled


def test_a_stream_that_ends_early_is_an_error():
    stream = ScriptedStream([tokens("ok", finish=None)])
    _, events, _ = run_body([stream])
    assert events[-2]["error"]["code"] == "generation_failed" and stream.cancelled


def test_the_request_timeout_ends_a_stalled_stream():
    streams = [ScriptedStream([tokens("a", finish=None)], hang=True) for _ in range(2)]
    t0 = time.monotonic()
    _, events, _ = run_body(streams, timeout_s=0.3)
    assert time.monotonic() - t0 < 10
    assert events[-2]["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert all(s.cancelled for s in streams)
    one = ScriptedStream([tokens("a", finish=None)], hang=True)
    _, events, _ = run_body([one], timeout_s=0.3)
    assert events[-2]["error"]["code"] == "timeout" and one.cancelled


def test_within_returns_in_time_and_times_out_after():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert await within(loop.time() + 5, asyncio.sleep(0.01, "v")) == "v"
        with pytest.raises(TimeoutError):
            await within(loop.time() + 0.05, asyncio.Event().wait())
        task = asyncio.current_task()
        if hasattr(task, "cancelling"):  # 3.11+: the timeout's cancel was consumed
            assert task.cancelling() == 0
        await asyncio.sleep(0.01)  # not cancelled later either

    asyncio.run(main())


def test_within_lets_an_outside_cancel_through():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(within(loop.time() + 5, asyncio.Event().wait()))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
