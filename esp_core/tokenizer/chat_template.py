"""Chat templates: HF-compatible jinja2 rendering in a sandbox.

Templates come from model directories, i.e. from strangers: they are rendered in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation of our objects), with the
same globals, filters and options HF transformers gives them so that Hub templates render
identically: trim_blocks/lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`,
a non-escaping `tojson`, and a `{% generation %}` block tag that renders its body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from esp_core.tokenizer.errors import ChatTemplateError


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes '<' '>' '&' ''' which chat prompts must not contain.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF marks assistant spans with it); we only
    render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() without underscore names (no path to dunder attributes)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _Namespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


# The largest string or list `*` may build in a template (a repeated separator is fine; a
# megabyte prompt made of one character is an attack, not a chat format).
MAX_REPEAT_ITEMS = 1 << 16


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with `*` and `**` bounded: `'A' * 10**9` would allocate
    gigabytes in one step; `range` is bounded by jinja's sandbox already."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("exponent too large in a chat template")
            return left**right
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                if len(seq) * max(times, 0) > MAX_REPEAT_ITEMS:
                    raise jinja2.exceptions.SecurityError("repetition too large in a chat template")
        return left * right


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types only, so a template never reaches
    methods of rich objects (pydantic models are dumped first)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _plain(dump())
    return f"<{type(value).__name__}>"


# Names a message's reasoning arrives under; templates read the first (Qwen3, DeepSeek) or
# "thinking" (gpt-oss). Like transformers 5, every copy gets the value of the first set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


# Marker appended to the final message for continue_final_message (HF's trick): render,
# then cut the prompt right after the final message's content.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplate:
    """A compiled chat template. `render(messages, add_generation_prompt, **vars) -> str`."""

    def __init__(self, source: str):
        if not isinstance(source, str) or not source:
            raise ChatTemplateError("chat template must be a non-empty string")
        self.source = source
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        **variables: Any,
    ) -> str:
        chat = _plain(list(messages))
        for message in chat:
            if not isinstance(message, dict):
                raise ChatTemplateError(f"chat messages must be dicts, got {message!r}")
        chat = [_alias_reasoning(m) for m in chat]
        final_content = None
        if continue_final_message:
            if not chat or not isinstance(chat[-1].get("content"), str):
                raise ChatTemplateError("continue_final_message needs a final message with text content")
            final_content = chat[-1]["content"]
            chat[-1]["content"] = final_content + _CONTINUE_TAG
        try:
            text = self._template.render(
                messages=chat,
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **_plain(variables),
            )
        except jinja2.exceptions.TemplateError as exc:  # raise_exception, sandbox, undefined
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        except Exception as exc:  # template bugs (e.g. indexing None) must not look like ours
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        if final_content is not None:
            cut = text.rfind(_CONTINUE_TAG.strip())
            if cut < 0:
                raise ChatTemplateError("the chat template dropped the final message's content")
            if text[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                text = text[:cut]
            else:  # the template trimmed trailing spacing of the content
                text = text[:cut].rstrip()
        return text
