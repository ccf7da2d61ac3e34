"""One response choice being generated: incremental detokenization, stop strings,
logprobs and counts, turned into OpenAI's shapes (completions and chat).

Fed with the controller's `TokenEvent`s; returns the text that is safe to send now (a
partial UTF-8 character or a possible stop-string prefix is held back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from esp_core.tokenizer import IncrementalDetokenizer, StopStringMatcher
from esp_serve.app.protocol import TokenEvent

# The logprob a response shows for a token whose logprob is not a finite number (-inf when
# the token was masked out): clients expect a number, and JSON has no infinities or NaN.
FLOOR_LOGPROB = -9999.0


def finite(value: float | None) -> float | None:
    if value is None or math.isfinite(value):
        return value
    return FLOOR_LOGPROB


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text for logprobs, and its bytes. A token that is not valid UTF-8 on its own
    (part of a multi-byte character) is shown as `bytes:\\xNN` like OpenAI does."""
    raw = tokenizer.token_bytes(token_id, skip_special_tokens=False)
    if raw is None:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return text, list(text.encode())
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


@dataclass(frozen=True)
class Delta:
    """What one step of a choice produced, frozen when it happened (the stream writer may
    run behind the choice, so it must not read the choice's later state)."""

    choice: Choice
    text: str
    lp_start: int  # logprob entries [lp_start, lp_end) belong to this delta
    lp_end: int
    finish_reason: str | None
    error: str | None


@dataclass
class Choice:
    index: int
    tokenizer: Any
    prompt_ids: tuple[int, ...]
    stops: list[str]
    skip_special_tokens: bool = True
    want_logprobs: bool = False
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: "token_id:N"
    prompt_index: int = 0  # which prompt of the request (the n choices of one share it)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # (token id, logprob, top logprobs, offset in `text` of the text emitted so far)
    logprob_entries: list[tuple[int, float | None, tuple, int]] = field(default_factory=list)
    _detok: Any = None
    _matcher: Any = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_ids)
        self._detok = IncrementalDetokenizer(
            self.tokenizer, prompt_ids=self.prompt_ids, skip_special_tokens=self.skip_special_tokens
        )
        self._matcher = StopStringMatcher(self.stops) if self.stops else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def step(self, ev: TokenEvent) -> Delta:
        """`feed` one event and describe what it produced."""
        before = len(self.logprob_entries)
        text, _ = self.feed(ev)
        return self.delta(text, before)

    def delta(self, text: str, lp_start: int) -> Delta:
        return Delta(self, text, lp_start, len(self.logprob_entries), self.finish_reason, self.error)

    def feed(self, ev: TokenEvent) -> tuple[str, int]:
        """Consume one event; returns (text safe to emit, number of new logprob entries).
        Sets `finish_reason` when the choice ends (a stop string counts as "stop")."""
        if self.done:
            return "", 0
        out = ""
        new_lp = 0
        self.num_cached_tokens = max(self.num_cached_tokens, ev.num_cached_tokens)
        if ev.token_id is not None:
            self.num_output_tokens = max(self.num_output_tokens + 1, ev.num_output_tokens)
            if self.want_logprobs:
                self.logprob_entries.append(
                    (ev.token_id, ev.logprob, ev.top_logprobs, len(self.text) + len(out))
                )
                new_lp = 1
            out += self._emit(self._detok.add(ev.token_id))
        if ev.finish_reason is not None and not self.done:
            out += self._emit(self._detok.flush())
            if not self.done:
                out += self._flush_matcher()
                self.finish_reason = ev.finish_reason
                self.error = ev.error
        self.text += out
        return out, new_lp

    def _emit(self, delta: str) -> str:
        if self.done or not delta:
            return ""
        if self._matcher is None:
            return delta
        safe, stopped = self._matcher.feed(delta)
        if stopped:
            self.finish_reason = "stop"
        return safe

    def _flush_matcher(self) -> str:
        return self._matcher.flush() if self._matcher is not None else ""

    # ------------------------------------------------------------------ OpenAI shapes

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        text, raw = token_text(self.tokenizer, token_id)
        return (f"token_id:{token_id}", raw) if self.tokens_as_ids else (text, raw)

    def completion_logprobs(
        self, start: int = 0, end: int | None = None, base_offset: int = 0
    ) -> dict[str, Any] | None:
        """`choices[].logprobs` of /v1/completions for entries [start:end]. `text_offset`
        of a token is where the text emitted before it ends (a token completing a
        multi-byte character shares the offset of the tokens it completes), plus
        `base_offset` (the echoed prompt)."""
        if not self.want_logprobs:
            return None
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, lp, top, offset in self.logprob_entries[start:end]:
            tokens.append(self._token(token_id)[0])
            token_lps.append(finite(lp))
            tops.append({self._token(t.token_id)[0]: finite(t.logprob) for t in top})
            offsets.append(base_offset + offset)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, start: int = 0, end: int | None = None) -> dict[str, Any] | None:
        """`choices[].logprobs` of /v1/chat/completions for entries [start:end]."""
        if not self.want_logprobs:
            return None
        content = []
        for token_id, lp, top, _ in self.logprob_entries[start:end]:
            text, raw = self._token(token_id)
            content.append(
                {
                    "token": text,
                    "logprob": finite(lp),
                    "bytes": raw,
                    "top_logprobs": [
                        dict(zip(("token", "bytes"), self._token(t.token_id)), logprob=finite(t.logprob))
                        for t in top
                    ],
                }
            )
        return {"content": content, "refusal": None}
