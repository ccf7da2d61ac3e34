"""Running the choices of one request: pumping each controller stream into its `Choice`
(incremental detokenization and stop strings happen there), either to the end
(`run_to_end`, for JSON answers) or as Server-Sent Events (`sse_body`).

Whoever calls these owns the controller streams; both functions cancel every stream on
every way out (finished, stop string, timeout, error, client gone), so an admitted
generation never keeps running, holding KV, after its HTTP request is over.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from ray.exceptions import RayActorError

from esp_serve.app.choices import Choice, Delta
from esp_serve.app.errors import APIError, internal_error
from esp_serve.app.telemetry import RequestSpan

log = logging.getLogger("ray.serve")

GROUP_STOPPED = (
    "the ESP group serving this request stopped (redeploy, scale-down or a "
    "failure) before it finished: retry it"
)


def dumps(obj: Any) -> str:
    """JSON text of a response body; never NaN/Infinity (invalid JSON)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def cached_tokens(choices: Iterable[Choice]) -> int:
    return sum(c.num_cached_tokens for c in choices)


class StreamUsage:
    """`stream_options` usage reporting of one streamed response (completions and chat):
    the per-chunk `usage` field and the final usage-only chunk."""

    def __init__(self, opts: Any, head: dict[str, Any], prompt_tokens: int, choices: list[Choice]) -> None:
        self.opts, self.head, self.prompt_tokens, self.choices = opts, head, prompt_tokens, choices

    def _now(self) -> dict[str, Any]:
        return usage(
            self.prompt_tokens, sum(c.num_output_tokens for c in self.choices), cached_tokens(self.choices)
        )

    def field(self) -> dict[str, Any]:
        """What every chunk carries: nothing, `usage: null`, or running usage."""
        if self.opts is None or not self.opts.include_usage:
            return {}
        return {"usage": self._now() if self.opts.continuous_usage_stats else None}

    def final_chunk(self) -> dict[str, Any] | None:
        """The closing usage chunk, or None when not asked for."""
        if self.opts is None or not self.opts.include_usage:
            return None
        return {**self.head, "choices": [], "usage": self._now()}


async def pump(gen: Any, choice: Choice, out: asyncio.Queue | None, rs: RequestSpan | None = None) -> None:
    """Feed one choice from its stream until it finishes; a stop string ends it early
    and cancels the stream (which aborts the request and frees its KV). A broken
    stream (e.g. the controller died) ends the choice with an error."""
    try:
        async for events in gen:
            for ev in events:
                if rs is not None and ev.token_id is not None:
                    rs.first_token()  # idempotent: only the first one counts
                delta = choice.step(ev)
                if out is not None and (delta.text or choice.done or delta.lp_end > delta.lp_start):
                    out.put_nowait(delta)
                if choice.done:
                    return
        error = "the stream ended before the request finished"
    except asyncio.CancelledError:
        raise
    except RayActorError:  # the group's replica stopped: say what happened, not how
        error = GROUP_STOPPED
    except Exception as err:  # noqa: BLE001 - logged; the client gets the cause class
        log.error("generation stream failed: %r", err)
        error = type(err).__name__
    finally:
        gen.cancel()
    if not choice.done:
        choice.finish_reason, choice.error = "error", error
        if out is not None:
            out.put_nowait(choice.delta("", len(choice.logprob_entries)))


def cancel_all(gens: Iterable[Any]) -> None:
    for g in gens:
        g.cancel()


def _finish_span(rs: RequestSpan, choices: list[Choice], prompt_tokens: int) -> None:
    rs.finish(
        [c.finish_reason or "" for c in choices],
        input_tokens=prompt_tokens,
        output_tokens=sum(c.num_output_tokens for c in choices),
    )


def generation_failed(error: str | None, rid: str) -> APIError:
    """The 500 of a failed generation: the cause's class and the request id (to find the
    details in the log), never the internal text."""
    log.error("request %s: generation failed: %s", rid, error)
    if error == GROUP_STOPPED:
        cause = error
    else:
        cause = (error or "unknown").partition(":")[0].strip()[:80]
    return internal_error(f"generation failed ({cause}); request id {rid}", code="generation_failed")


async def run_to_end(
    gens: list[Any], choices: list[Choice], rs: RequestSpan, prompt_tokens: int, timeout_s: float, rid: str
) -> None:
    """Run every choice to its end (non-streaming); a failure or the timeout raises.
    Ends the request's span, as `sse_body` does for streams."""
    tasks = [asyncio.ensure_future(pump(g, c, None, rs)) for g, c in zip(gens, choices)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(
            504, "the request timed out (server.request_timeout_s)", type="server_error", code="timeout"
        ) from None
    finally:
        for t in tasks:
            t.cancel()
        cancel_all(gens)
    failed = [c for c in choices if c.finish_reason == "error"]
    if failed:
        raise generation_failed(failed[0].error, rid)
    _finish_span(rs, choices, prompt_tokens)


async def sse_body(
    gens: list[Any],
    choices: list[Choice],
    render: Callable[[Delta | None], Iterable[dict[str, Any]]],
    final_chunk: Callable[[], dict[str, Any] | None],
    rs: RequestSpan,
    prompt_tokens: int,
    timeout_s: float,
    rid: str,
) -> AsyncIterator[str]:
    """SSE body: `render(None)` opening chunks, chunks as tokens arrive from any choice,
    then usage and [DONE]. Closing it (client disconnect) cancels every choice's stream.
    Ends the request's span."""
    out: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(pump(g, c, out, rs)) for g, c in zip(gens, choices)]
    deadline = time.monotonic() + timeout_s
    try:
        for chunk in render(None):  # opening chunks (role, echo)
            yield sse(chunk)
        while not all(c.done for c in choices) or not out.empty():
            try:
                delta: Delta = await asyncio.wait_for(out.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                rs.fail("timeout", "the request timed out")
                yield sse(APIError(504, "the request timed out", type="server_error", code="timeout").body())
                break
            if delta.finish_reason == "error":
                rs.fail("generation_failed", delta.error or "")
                yield sse(generation_failed(delta.error, rid).body())
                break
            for chunk in render(delta):
                yield sse(chunk)
        else:
            closing = final_chunk()
            if closing is not None:
                yield sse(closing)
            _finish_span(rs, choices, prompt_tokens)
        yield "data: [DONE]\n\n"
    finally:
        rs.fail("client_disconnected", "the client closed the stream")  # no-op if ended
        for t in tasks:
            t.cancel()
        cancel_all(gens)
