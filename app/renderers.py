"""The two OpenAI answer shapes of one generation request: /v1/completions and
/v1/chat/completions. The request pipeline (app/ingress.py) runs the choices; a renderer
only says what the JSON body or each SSE chunk looks like.

`opening()` gives the chunks a stream starts with, `chunk(delta)` the choice entry of one
streamed step, `final()` the choice entries of a JSON answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from esp_serve.app.choices import Choice, Delta
from esp_serve.app.openai_models import ChatCompletionRequest, CompletionRequest
from esp_serve.app.requests import SubRequest


class CompletionRenderer:
    operation = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, req: CompletionRequest, tokenizer: Any, subs: list[SubRequest]) -> None:
        self.req = req
        self.want_logprobs = req.logprobs is not None
        self.object = "text_completion"
        echo = [""] * (max((s.prompt_index for s in subs), default=-1) + 1)
        if req.echo:
            echo = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts()]
        # the echoed prompt text of each choice (by choice index)
        self.echo = {s.index: echo[s.prompt_index] for s in subs}

    def opening(self, choices: list[Choice]) -> Iterable[dict[str, Any]]:
        if not self.req.echo:
            return []
        return [
            {"index": c.index, "text": self.echo[c.index], "logprobs": None, "finish_reason": None}
            for c in choices
        ]

    def chunk(self, d: Delta) -> dict[str, Any]:
        c = d.choice
        return {
            "index": c.index,
            "text": d.text,
            "logprobs": c.completion_logprobs(d.lp_start, d.lp_end, len(self.echo[c.index])),
            "finish_reason": d.finish_reason,
        }

    def final(self, c: Choice) -> dict[str, Any]:
        return {
            "index": c.index,
            "text": self.echo[c.index] + c.text,
            "logprobs": c.completion_logprobs(0, None, len(self.echo[c.index])),
            "finish_reason": c.finish_reason,
        }


class ChatRenderer:
    operation = "chat"
    id_prefix = "chatcmpl"

    def __init__(self, req: ChatCompletionRequest, tokenizer: Any, subs: list[SubRequest]) -> None:
        self.want_logprobs = req.logprobs
        self.object = "chat.completion.chunk" if req.stream else "chat.completion"

    def opening(self, choices: list[Choice]) -> Iterable[dict[str, Any]]:
        # every choice opens with the assistant role
        return [
            {
                "index": c.index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for c in choices
        ]

    def chunk(self, d: Delta) -> dict[str, Any]:
        return {
            "index": d.choice.index,
            "delta": {"content": d.text} if d.text else {},
            "logprobs": d.choice.chat_logprobs(d.lp_start, d.lp_end),
            "finish_reason": d.finish_reason,
        }

    def final(self, c: Choice) -> dict[str, Any]:
        return {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": c.chat_logprobs(),
            "finish_reason": c.finish_reason,
        }
