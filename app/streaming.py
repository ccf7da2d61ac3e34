"""Running the choices of one request: pumping each request stream (app/group_stream.py) into its `Choice`
(incremental detokenization and stop strings happen there), either to the end
(`run_to_end`, for JSON answers) or as Server-Sent Events (`sse_body`).

Whoever calls these owns the request streams; both functions cancel every stream on
every way out (finished, stop string, timeout, error, client gone), so an admitted
generation never keeps running, holding KV, after its HTTP request is over.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from ray.exceptions import RayActorError

from esp_serve.app.choices import Choice, Delta
from esp_serve.app.errors import APIError, internal_error
from esp_serve.app.event_channel import SubscriptionLost
from esp_serve.app.protocol import TokenEvent
from esp_serve.app.telemetry import RequestSpan

log = logging.getLogger("ray.serve")
T = TypeVar("T")

STREAM_ENDED = "the stream ended before the request finished"
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
    """Prompt tokens served from the prefix cache, counted like `prompt_tokens`: once per
    prompt. The n choices of a prompt share its KV (the first computes it, the others
    read it: no cache hit of the request), so the prompt reused what its least-cached
    choice did."""
    least: dict[int, int] = {}
    for c in choices:
        least[c.prompt_index] = min(least.get(c.prompt_index, c.num_cached_tokens), c.num_cached_tokens)
    return sum(least.values())


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


def _feed(
    choice: Choice, events: Iterable[TokenEvent], rs: RequestSpan | None, out: list[Delta] | None
) -> None:
    """Feed one stream item's events to a choice, appending the deltas worth sending
    (text, logprobs, or the end) to `out`; events after the choice ends are ignored."""
    for ev in events:
        if rs is not None and ev.token_id is not None:
            rs.first_token()  # idempotent: only the first one counts
        delta = choice.step(ev)
        if out is not None and (delta.text or choice.done or delta.lp_end > delta.lp_start):
            out.append(delta)
        if choice.done:
            return


def stream_error(err: Exception) -> str:
    """What a broken stream ends its choice with."""
    # the group's replica stopped (its call, or its event channel, broke): say what
    # happened, not how
    if isinstance(err, (RayActorError, SubscriptionLost)):
        return GROUP_STOPPED
    log.error("generation stream failed: %r", err)
    return type(err).__name__  # the client gets the cause class


def _end_with_error(choice: Choice, error: str) -> Delta:
    choice.finish_reason, choice.error = "error", error
    return choice.delta("", len(choice.logprob_entries))


async def pump(gen: Any, choice: Choice, out: asyncio.Queue | None, rs: RequestSpan | None = None) -> None:
    """Feed one choice from its stream until it finishes; a stop string ends it early
    and cancels the stream (which aborts the request and frees its KV). A broken
    stream (e.g. the controller died) ends the choice with an error."""
    ready: list[Delta] | None = [] if out is not None else None
    try:
        async for events in gen:
            _feed(choice, events, rs, ready)
            if ready:
                for delta in ready:
                    out.put_nowait(delta)  # type: ignore[union-attr]
                ready.clear()
            if choice.done:
                return
        error = STREAM_ENDED
    except asyncio.CancelledError:
        raise
    except Exception as err:  # noqa: BLE001 - logged; the client gets the cause class
        error = stream_error(err)
    finally:
        gen.cancel()
    if not choice.done:
        delta = _end_with_error(choice, error)
        if out is not None:
            out.put_nowait(delta)


class _OneStream:
    """The deltas of a one-choice request, read from its stream in place: no pump task
    and no queue hop per token. `next()` gives every delta of the next stream item."""

    def __init__(self, gen: Any, choice: Choice, rs: RequestSpan) -> None:
        self.gen, self.choice, self.rs = gen, choice, rs

    def more(self) -> bool:
        return not self.choice.done

    async def next(self) -> list[Delta]:
        ready: list[Delta] = []
        try:
            events = await self.gen.__anext__()
        except StopAsyncIteration:
            error = STREAM_ENDED
        except Exception as err:  # noqa: BLE001 - logged; the client gets the cause class
            error = stream_error(err)
        else:
            _feed(self.choice, events, self.rs, ready)
            if self.choice.done:
                self.gen.cancel()  # a stop string: abort the request now
            return ready
        self.gen.cancel()
        return [_end_with_error(self.choice, error)]

    def close(self) -> None:
        pass


class _Pumped:
    """The deltas of several choices: one pump task per choice into one queue; `next()`
    gives every delta ready when it wakes, in arrival order."""

    def __init__(self, gens: list[Any], choices: list[Choice], rs: RequestSpan) -> None:
        self.choices = choices
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.tasks = [asyncio.ensure_future(pump(g, c, self.queue, rs)) for g, c in zip(gens, choices)]

    def more(self) -> bool:
        return not all(c.done for c in self.choices) or not self.queue.empty()

    async def next(self) -> list[Delta]:
        ready = [await self.queue.get()]
        while not self.queue.empty():
            ready.append(self.queue.get_nowait())
        return ready

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


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
    Ends the request's span.

    Every chunk ready at one wake-up goes out as ONE body part (still one `data:` event
    per chunk): each part is a message through Serve's HTTP proxy, so a reader that fell
    behind, or the last token with usage and [DONE], costs one message, not several."""
    source = _OneStream(gens[0], choices[0], rs) if len(gens) == 1 else _Pumped(gens, choices, rs)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        opening = "".join(sse(chunk) for chunk in render(None))  # role, echo
        if opening:
            yield opening
        while source.more():
            try:
                deltas = await within(deadline, source.next())
            except TimeoutError:
                rs.fail("timeout", "the request timed out")
                yield (
                    sse(APIError(504, "the request timed out", type="server_error", code="timeout").body())
                    + DONE
                )
                return
            part, failed = _render(deltas, render, rs, rid)
            if failed or not source.more():
                if not failed:
                    closing = final_chunk()
                    part += sse(closing) if closing is not None else ""
                    _finish_span(rs, choices, prompt_tokens)
                yield part + DONE
                return
            if part:
                yield part
    finally:
        rs.fail("client_disconnected", "the client closed the stream")  # no-op if ended
        source.close()
        cancel_all(gens)


DONE = "data: [DONE]\n\n"


async def within(deadline: float, step: Awaitable[T]) -> T:
    """Await `step` until `deadline` (the loop's clock), else TimeoutError. A timer per
    wait, not a task as `asyncio.wait_for` makes (Python 3.10 has no `asyncio.timeout`):
    the timer cancels this task, and only while it waits here."""
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_at(deadline, expire)
    try:
        return await step
    except asyncio.CancelledError:
        if not expired:
            raise
        uncancel = getattr(task, "uncancel", None)  # 3.11+: this cancel is consumed here
        if uncancel is not None:
            uncancel()
        raise TimeoutError from None
    finally:
        timer.cancel()


def _render(
    deltas: list[Delta], render: Callable[[Delta | None], Iterable[dict[str, Any]]], rs: RequestSpan, rid: str
) -> tuple[str, bool]:
    """The SSE events of some deltas, in order, as one string; a failed choice ends it
    with the error event (and True: the stream ends there)."""
    events = []
    for delta in deltas:
        if delta.finish_reason == "error":
            rs.fail("generation_failed", delta.error or "")
            events.append(sse(generation_failed(delta.error, rid).body()))
            return "".join(events), True
        events.extend(sse(chunk) for chunk in render(delta))
    return "".join(events), False
