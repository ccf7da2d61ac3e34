"""One streaming `/v1/completions` request, timed.

Sent the way vLLM's benchmark sends it: `stream=True`, `ignore_eos=True`, `max_tokens`
= the wanted output length, `stream_options.include_usage` so the server reports the
true token counts. Times come from `time.perf_counter()` on the client:

* TTFT: request sent -> first chunk carrying a token (text, or an empty text that is not
  a bare end marker: a byte-level token may complete no character yet);
* ITL: the gaps between consecutive content chunks (a chunk may carry several tokens
  when the server batches a slow reader; counts below come from `usage`);
* e2e: request sent -> stream closed ([DONE] or end of body).

A request that fails (HTTP error, an `error` object in the stream, broken connection,
timeout) is recorded with `ok=False` and the reason; it never stops the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


@dataclass
class RequestResult:
    request_id: str
    prompt_tokens: int  # what was sent (the reported count, when the server gave one)
    output_tokens_wanted: int
    arrival_s: float  # planned send offset
    send_s: float = 0.0  # actual send offset (client lag = send_s - arrival_s)
    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0  # usage.completion_tokens, else the number of content chunks
    output_text_chars: int = 0

    @property
    def tpot_s(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1): the mean time per output token after the
        first (0 for one-token outputs)."""
        if self.ttft_s is None or self.e2e_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}


def completion_body(
    model: str,
    prompt: list[int] | str,
    output_tokens: int,
    temperature: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_tokens,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }


async def send_completion(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    result: RequestResult,
    t0: float,
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    """Send `body`, stream the answer into `result` (times relative to `t0`)."""
    start = time.perf_counter()
    result.send_s = start - t0
    try:
        await asyncio.wait_for(_stream(client, url, body, result, start, headers), timeout_s)
    except asyncio.TimeoutError:
        result.ok, result.error = False, f"timeout after {timeout_s:g}s"
    except httpx.HTTPError as err:
        result.ok, result.error = False, f"{type(err).__name__}: {err}"
    return result


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    result: RequestResult,
    start: float,
    headers: dict[str, str] | None,
) -> None:
    chunks = 0
    last: float | None = None
    usage_tokens: int | None = None
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        result.status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            result.error = f"HTTP {resp.status_code}: {text[:300]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # SSE comments, blank separators, event names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            try:
                msg = json.loads(data)
            except json.JSONDecodeError:
                result.error = f"bad SSE data: {data[:200]}"
                return
            if "error" in msg:
                result.error = f"stream error: {json.dumps(msg['error'])[:300]}"
                return
            usage = msg.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens"):
                    result.prompt_tokens = int(usage["prompt_tokens"])
            choices = msg.get("choices") or ()
            text = "".join(c.get("text") or "" for c in choices)
            if not choices or (not text and any(c.get("finish_reason") for c in choices)):
                continue  # usage-only chunk, or a bare end marker carrying no token
            chunks += 1
            result.output_text_chars += len(text)
            if last is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if result.ttft_s is None:
        result.error = "no output token in the stream"
        return
    result.ok = True
