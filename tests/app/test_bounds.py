"""Bounds on one request's work (app/bounds.py, `limits:` in the config), checked by the
real ingress app over ASGI. The controller is a scripted stand-in that admits every
request and answers a few tokens: what is under test is what the ingress refuses, how
fast, and what it sends on to the controller."""

from __future__ import annotations

import json
import time

import pytest
from starlette.testclient import TestClient

from esp_core.tokenizer import load_tokenizer
from esp_serve.app.bounds import json_deeper_than
from esp_serve.app.ingress import OpenAIIngress, build_api
from tests.support.controller_handle import ScriptedController, tokens

MODEL = "builtin"
# Each refusal is cheap (milliseconds on an idle machine); the bound asserted is the one a
# client is promised, generous enough for a loaded shared CI machine.
ANSWER_WITHIN_S = 10.0


class _Stream:
    """Only records `cancel()` (for the SSE response's own cleanup)."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _two_tokens(request) -> list:
    return [tokens(2)]


def _client(limits: dict | None = None) -> tuple[TestClient, ScriptedController]:
    controller = ScriptedController(_two_tokens)
    config = {"server": {"api_keys_env": None}, "limits": limits or {}}
    return TestClient(build_api(OpenAIIngress(config, controller)), raise_server_exceptions=False), controller


@pytest.fixture(scope="module")
def client():
    c, _ = _client()
    return c


def _post(client, body, path="/v1/completions", **kw):
    t0 = time.monotonic()
    r = client.post(path, json=body, **kw) if not isinstance(body, bytes) else client.post(path, content=body)
    return r, time.monotonic() - t0


def _refused(r, key: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if key is not None:
        assert f"limits.{key}" in err["message"] and err["code"] == "limit_exceeded", err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_json_depth_scan():
    assert not json_deeper_than(b'{"a": [1, 2, {"b": "[[[[[[[["}]}', 3)
    assert json_deeper_than(b'{"a": [1, 2, {"b": [[]]}]}', 4)
    assert not json_deeper_than(b'{"a": [1, 2, {"b": [[]]}]}', 5)
    assert json_deeper_than(b"[" * 100_000, 64)  # unbalanced: never handed to the parser
    assert not json_deeper_than(b'"\\"[[[["', 1)  # brackets in strings (escaped quote) nest nothing


def test_deep_json_is_a_400_not_a_recursion_error(client):
    body = b'{"model": "builtin", "prompt": "x", "logit_bias": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r, took = _post(client, body)
    _refused(r, "max_json_depth")
    assert took < ANSWER_WITHIN_S


def test_stop_strings_bounded_in_count_and_length(client):
    _refused(
        _post(client, {"model": MODEL, "prompt": "x", "stop": ["a"] * 17})[0], "max_stop_strings", "stop"
    )
    r, took = _post(client, {"model": MODEL, "prompt": "x", "stop": "s" * 1_000_000})
    _refused(r, "max_stop_string_chars", "stop")
    assert took < ANSWER_WITHIN_S
    r, _ = _post(client, {"model": MODEL, "prompt": "x", "stop": ["s" * 256] * 16, "max_tokens": 2})
    assert r.status_code == 200, r.text  # the defaults themselves are accepted


def test_fan_out_bounded_before_any_work(client):
    r, took = _post(client, {"model": MODEL, "prompt": [[5]] * 20_000, "n": 16})
    _refused(r, "max_prompts", "prompt")
    assert took < ANSWER_WITHIN_S
    _refused(_post(client, {"model": MODEL, "prompt": ["x"] * 100, "n": 16})[0], "max_choices", "n")
    c, controller = _client({"max_choices": 8})
    _refused(_post(c, {"model": MODEL, "prompt": ["a", "b", "c"], "n": 3})[0], "max_choices")
    r, _ = _post(c, {"model": MODEL, "prompt": ["a", "b"], "n": 4, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 8 and len(controller.requests) == 8


def test_a_validation_error_costs_one_description(client):
    r, took = _post(client, {"model": MODEL, "prompt": [1, "x", 2.5] * 100_000})
    err = _refused(r)
    assert took < ANSWER_WITHIN_S and len(err["message"]) < 300, (took, err["message"])
    r, took = _post(client, {"model": MODEL, "prompt": "x", "stop_token_ids": ["a"] * 200})
    err = _refused(r)
    assert "more problems" in err["message"] and len(err["message"]) < 300


def test_logit_bias_keys_canonical_and_bounded(client):
    for key in ("050", "+50", " 50", "50 ", "5e1", "-1", "1" * 40):
        r, _ = _post(client, {"model": MODEL, "prompt": "x", "logit_bias": {"50": 100, key: 100}})
        _refused(r, param="logit_bias")
    r, took = _post(
        client, {"model": MODEL, "prompt": "x", "logit_bias": {str(i): 1 for i in range(150_000)}}
    )
    _refused(r, "max_logit_bias", "logit_bias")
    assert took < ANSWER_WITHIN_S
    c, controller = _client()
    r, _ = _post(c, {"model": MODEL, "prompt": "x", "max_tokens": 2, "logit_bias": {"50": 100, "7": -3}})
    assert r.status_code == 200, r.text
    assert controller.requests[0].sampling.logit_bias == ((7, -3.0), (50, 100.0))


@pytest.mark.parametrize(
    "raw",
    [
        b'"repetition_penalty": Infinity',
        b'"repetition_penalty": 1e-300',
        b'"repetition_penalty": 1e300',
        b'"temperature": 1e-40',
        b'"temperature": NaN',
        b'"top_p": -Infinity',
        b'"presence_penalty": 1e999',
        b'"logit_bias": {"5": Infinity}',
        b'"logit_bias": {"5": 101}',
        b'"min_p": 0.5',
        b'"top_k": 100000',
    ],
)
def test_sampling_values_refused_not_clamped(client, raw):
    body = b'{"model": "builtin", "prompt": "x", ' + raw + b"}"
    _refused(_post(client, body)[0])


def test_sane_sampling_values_pass_through(client):
    c, controller = _client()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 0.01, "repetition_penalty": 10}
    r, _ = _post(c, {**body, "top_p": 0.5, "top_k": 3, "presence_penalty": -2, "frequency_penalty": 2})
    assert r.status_code == 200, r.text
    s = controller.requests[0].sampling
    assert (s.temperature, s.repetition_penalty, s.top_p, s.top_k) == (0.01, 10, 0.5, 3)


def test_lone_surrogates_refused_up_front(client):
    r, _ = _post(client, b'{"model": "builtin", "prompt": "\\ud800", "echo": true}')
    assert "surrogate" in _refused(r)["message"]
    chat = b'{"model": "builtin", "messages": [{"role": "user", "content": "a\\udfffb"}]}'
    _refused(_post(client, chat, "/v1/chat/completions")[0])
    # a proper pair is one character, served
    r, _ = _post(client, b'{"model": "builtin", "prompt": "\\ud83d\\ude00", "max_tokens": 2, "echo": true}')
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("\U0001f600")


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def test_messages_bounded(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 5000}
    _refused(_post(client, body, "/v1/chat/completions")[0], "max_messages", "messages")
    parts = [{"type": "text", "text": "x"}] * 2000
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}]}
    _refused(_post(client, body, "/v1/chat/completions")[0], "max_content_parts", "messages.0.content")


@pytest.mark.parametrize(
    "kwargs",
    [{"messages": []}, {"add_generation_prompt": False}, {"tools": [{"type": "function"}]}, {"x": 1}],
)
def test_template_kwargs_only_documented_ones(client, kwargs):
    r, _ = _post(client, _chat(chat_template_kwargs=kwargs), "/v1/chat/completions")
    key = next(iter(kwargs))
    assert "not allowed" in _refused(r, param=f"chat_template_kwargs.{key}")["message"]


def test_documented_template_kwargs_pass(client):
    r, _ = _post(client, _chat(chat_template_kwargs={"enable_thinking": False}), "/v1/chat/completions")
    assert r.status_code == 200, r.text


def test_client_templates_off_by_default(client):
    r, _ = _post(client, _chat(chat_template_kwargs={"chat_template": "{{ 'x' }}"}), "/v1/chat/completions")
    assert _refused(r)["code"] == "chat_template_not_allowed"


def test_client_templates_when_allowed_are_bounded():
    c, controller = _client({"allow_client_chat_template": True, "chat_template_timeout_s": 1.0})
    own = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    r, _ = _post(c, _chat(chat_template_kwargs={"chat_template": own}), "/v1/chat/completions")
    assert r.status_code == 200, r.text
    assert load_tokenizer(MODEL).decode(controller.requests[0].prompt_token_ids) == "<hi>"
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    r, took = _post(c, _chat(chat_template_kwargs={"chat_template": loops}), "/v1/chat/completions")
    assert "limits.chat_template_timeout_s" in _refused(r)["message"]
    assert took < ANSWER_WITHIN_S
    big = "{{ 'A' * 2000000 }}"
    r, took = _post(c, _chat(chat_template_kwargs={"chat_template": big}), "/v1/chat/completions")
    assert "repetition too large" in _refused(r)["message"] and took < ANSWER_WITHIN_S
    doubling = (
        "{% set ns = namespace(s='A') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    )
    r, took = _post(
        c, _chat(chat_template_kwargs={"chat_template": doubling + "{{ ns.s }}"}), "/v1/chat/completions"
    )
    _refused(r)
    assert took < ANSWER_WITHIN_S


def test_health_and_models_leak_nothing(client):
    card = client.get("/v1/models").json()["data"][0]
    assert card["root"] == MODEL and "/" not in json.dumps(card)


def test_admitted_requests_end_or_are_cancelled_when_the_client_is_done():
    c, controller = _client()
    r, _ = _post(c, {"model": MODEL, "prompt": "x", "max_tokens": 2, "n": 3})
    assert r.status_code == 200
    assert len(controller.requests) == 3 and controller.cancelled == []  # all 3 finished
    # requests that never end by themselves: the stop string ends each choice, and the
    # ingress cancels its request on the replica that admitted it
    controller.script = lambda request: [tokens(3, finish=None)]
    body = {"model": MODEL, "prompt": "x", "n": 2, "stream": True, "stop": ["hh"]}
    with c.stream("POST", "/v1/completions", json=body) as r:
        r.read()
    assert sorted(rid for _, rid in controller.cancelled) == sorted(
        q.request_id for q in controller.requests[3:]
    )


def test_streams_cancelled_even_if_the_sse_body_never_starts():
    """A client gone before the first byte: the body generator never runs (so its own
    cleanup never does), yet the admitted generations are cancelled."""
    import asyncio

    from esp_serve.app.ingress import _SSE

    stream = _Stream()
    started = []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        raise OSError("the client is gone")

    from starlette.requests import ClientDisconnect

    loop = asyncio.new_event_loop()  # not asyncio.run: it would unset the thread's loop for later tests
    try:
        with pytest.raises(ClientDisconnect):
            loop.run_until_complete(
                _SSE(body(), [stream])({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
            )
    finally:
        loop.close()
    assert not started and stream.cancelled
