"""Bounds on the work one request may ask for, checked on the raw body before anything
expensive (pydantic validation, tokenization, chat templates, admission) sees it.

Each check costs O(body) at most and refuses with a 400 naming the `limits.*` key. The
limits themselves live in the config tree (`LimitsSection`, app/config.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from esp_serve.app.config import LimitsSection
from esp_serve.app.errors import APIError, bad_request, limit_exceeded

# A JSON string literal (escapes included): removed before counting brackets, since
# brackets inside strings do not nest anything.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_INNERMOST = re.compile(rb"[\[{][\]}]")
_BRACKETS = re.compile(rb"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

# chat_template_kwargs a client may send: variables documented templates read. Anything
# else (messages, add_generation_prompt, tools, ...) would override what the server
# renders or bypass its checks.
TEMPLATE_KWARGS = frozenset({"enable_thinking", "thinking", "reasoning_effort", "chat_template"})
_MAX_TEMPLATE_VALUE_CHARS = 64


def json_deeper_than(body: bytes, limit: int) -> bool:
    """Does a JSON text nest [ and { deeper than `limit` (or leave them unbalanced)?
    Each pass removes the innermost bracket pairs at C speed, so a balanced text of
    depth d is empty after d passes: at most `limit` + 1 passes, no recursion."""
    brackets = b"".join(_BRACKETS.findall(_STRING.sub(b"", body)))
    for _ in range(limit):
        if not brackets:
            return False
        shorter = _INNERMOST.sub(b"", brackets)
        if len(shorter) == len(brackets):
            return True  # unbalanced: the parser would recurse into it
        brackets = shorter
    return bool(brackets)


def parse_body(body: bytes, limits: LimitsSection) -> dict[str, Any]:
    """The JSON object of a request body, refusing deep nesting (before the parser's
    recursion could fail), non-finite numbers and lone surrogates (text that cannot be
    UTF-8 would fail later, when the answer is written)."""
    if json_deeper_than(body, limits.max_json_depth):
        raise limit_exceeded("the JSON nesting depth", "max_json_depth", limits.max_json_depth)
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object")
    try:  # only a body with a surrogate escape can hold a lone one: skip the walk otherwise
        if _SURROGATE_ESCAPE.search(body):
            json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the body contains a lone surrogate (\\ud800-\\udfff): not valid Unicode") from None
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _count(data: dict[str, Any], field: str) -> int:
    value = data.get(field)
    return len(value) if isinstance(value, (list, dict)) else 0


def check_work(data: dict[str, Any], limits: LimitsSection) -> None:
    """Counts and lengths of a completions/chat body within the limits (raw values: a
    wrongly typed field is left for validation to describe)."""
    _check_stops(data.get("stop"), limits)
    if _count(data, "stop_token_ids") > limits.max_stop_token_ids:
        raise limit_exceeded(
            "the number of stop_token_ids", "max_stop_token_ids", limits.max_stop_token_ids, "stop_token_ids"
        )
    if _count(data, "logit_bias") > limits.max_logit_bias:
        raise limit_exceeded(
            "the number of logit_bias entries", "max_logit_bias", limits.max_logit_bias, "logit_bias"
        )
    prompts = _num_prompts(data)
    if prompts > limits.max_prompts:
        raise limit_exceeded("the number of prompts", "max_prompts", limits.max_prompts, "prompt")
    n = data.get("n")
    if type(n) is int and n > 0 and prompts * n > limits.max_choices:
        raise limit_exceeded(f"prompts x n ({prompts} x {n})", "max_choices", limits.max_choices, "n")
    _check_messages(data.get("messages"), limits)
    _check_template_kwargs(data.get("chat_template_kwargs"), limits)


def _num_prompts(data: dict[str, Any]) -> int:
    prompt = data.get("prompt")
    if not isinstance(prompt, list) or not prompt or type(prompt[0]) is int:
        return 1  # one text, or one prompt of token ids
    return len(prompt)


def _check_stops(stop: Any, limits: LimitsSection) -> None:
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if len(stops) > limits.max_stop_strings:
        raise limit_exceeded(
            "the number of stop strings", "max_stop_strings", limits.max_stop_strings, "stop"
        )
    for s in stops:
        if isinstance(s, str) and len(s) > limits.max_stop_string_chars:
            raise limit_exceeded(
                f"a stop string of {len(s)} characters",
                "max_stop_string_chars",
                limits.max_stop_string_chars,
                "stop",
            )


def _check_messages(messages: Any, limits: LimitsSection) -> None:
    if not isinstance(messages, list):
        return
    if len(messages) > limits.max_messages:
        raise limit_exceeded("the number of messages", "max_messages", limits.max_messages, "messages")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and len(content) > limits.max_content_parts:
            raise limit_exceeded(
                "the number of content parts",
                "max_content_parts",
                limits.max_content_parts,
                f"messages.{i}.content",
            )


def _check_template_kwargs(kwargs: Any, limits: LimitsSection) -> None:
    if not isinstance(kwargs, dict):
        return
    for key, value in kwargs.items():
        param = f"chat_template_kwargs.{key}"
        if key not in TEMPLATE_KWARGS:
            raise bad_request(
                f"chat_template_kwargs may hold only {sorted(TEMPLATE_KWARGS)}; {key!r} is not allowed",
                param=param,
            )
        if key == "chat_template":
            if not limits.allow_client_chat_template:
                raise APIError(
                    400,
                    "this server does not render client-supplied chat templates "
                    "(limits.allow_client_chat_template)",
                    param=param,
                    code="chat_template_not_allowed",
                )
            if not isinstance(value, str):
                raise bad_request("chat_template must be a string", param=param)
        elif not (
            value is None
            or type(value) in (bool, int)
            or (isinstance(value, str) and len(value) <= _MAX_TEMPLATE_VALUE_CHARS)
        ):
            raise bad_request(
                f"{key} must be a boolean, an integer or a short string (<= {_MAX_TEMPLATE_VALUE_CHARS} chars)",
                param=param,
            )
