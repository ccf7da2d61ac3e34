"""Fuzzing the generation routes of the real app (Ray Serve over HTTP on loopback) with
request bodies drawn from the request schemas, well-formed or not: every answer is a 2xx
with valid JSON (no NaN, no error event mid-stream) or a 4xx in OpenAI's envelope, within a
time bound; the server stays healthy and its KV pool ends free.

Bounded: a fixed number of examples, no shrinking-time surprises (deadline per example),
and at most 4 output tokens per choice so the model's speed never decides the outcome."""

from __future__ import annotations

import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "builtin"
ANSWER_WITHIN_S = 10.0

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_any_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
_text = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "\U0001f600x", "e\u0301"]))
_hostile_float = st.sampled_from([1e-40, 1e-300, 1e300, -5.0, 0.0])


def _opt(strategy):
    return st.one_of(st.just(None), strategy)


# Plausible values of each field (mostly valid); a draw then replaces up to two fields
# with hostile values or any JSON at all, so both generation and every refusal are reached.
_sampling = {
    "max_tokens": st.integers(1, 4),
    "temperature": _opt(st.sampled_from([0.0, 0.5, 1.0, 1.5])),
    "top_p": _opt(st.floats(0.05, 1.0)),
    "top_k": _opt(st.integers(-1, 300)),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stop": _opt(st.one_of(_text, st.lists(_text, max_size=3))),
    "presence_penalty": _opt(st.floats(-2, 2)),
    "frequency_penalty": _opt(st.floats(-2, 2)),
    "repetition_penalty": _opt(st.floats(0.5, 2)),
    "logit_bias": _opt(st.dictionaries(st.integers(0, 257).map(str), st.floats(-100, 100), max_size=5)),
    "seed": _opt(st.integers(0, 2**63)),
    "stop_token_ids": _opt(st.lists(st.integers(0, 257), max_size=4)),
    "min_tokens": _opt(st.integers(0, 1)),
    "ignore_eos": _opt(st.booleans()),
}
_completion_only = {
    "prompt": st.one_of(
        _text.filter(bool),
        st.lists(st.integers(0, 257), min_size=1, max_size=30),
        st.lists(_text.filter(bool), min_size=1, max_size=4),
        st.lists(st.lists(st.integers(0, 257), min_size=1, max_size=8), min_size=1, max_size=4),
    ),
    "logprobs": _opt(st.integers(0, 5)),
    "echo": _opt(st.booleans()),
}
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": _opt(_text)}
)
_chat_only = {
    "messages": st.lists(_message, min_size=1, max_size=4),
    "logprobs": _opt(st.booleans()),
    "chat_template_kwargs": _opt(st.fixed_dictionaries({"enable_thinking": st.booleans()})),
}
_hostile = {
    "prompt": st.sampled_from([[[5]] * 2000, [1, "x", 2.5] * 1000, "", [], [-1], [10**9]]),
    "messages": st.sampled_from([[], [{"role": "robot"}], [{"role": "user", "content": [{"type": "img"}]}]]),
    "max_tokens": st.sampled_from([0, -1, 10**12, "ten"]),
    "n": st.sampled_from([0, 17, 10**6]),
    "stop": st.sampled_from([["x"] * 100, "s" * 5000, [""]]),
    "logit_bias": st.sampled_from([{"050": 1, "50": 1}, {" 5": 100}, {"5": 1e300}, {"x": 1}]),
    "repetition_penalty": _hostile_float,
    "temperature": _hostile_float,
    "top_p": _hostile_float,
    "chat_template_kwargs": st.sampled_from(
        [
            {"messages": []},
            {"tools": []},
            {"chat_template": "{{ 'A' * 9 }}"},
            {"add_generation_prompt": False},
        ]
    ),
}


@st.composite
def _body(draw, fields: dict) -> dict:
    body = {"model": MODEL}
    body.update({k: v for k, v in draw(st.fixed_dictionaries(fields)).items() if v is not None})
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        body[name] = draw(st.one_of(_hostile.get(name, _any_json), _any_json))
    if draw(st.booleans()) and draw(st.booleans()):
        body[draw(st.text(min_size=1, max_size=6))] = draw(_any_json)  # an unknown field
    return body


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} in a response")

    return json.loads(text, parse_constant=refuse)


def _check(client, path: str, body: dict) -> int:
    t0 = time.monotonic()
    raw = json.dumps(body).encode()  # ASCII escapes: lone surrogates travel as \ud800
    headers = {"content-type": "application/json"}
    with client.stream("POST", path, content=raw, headers=headers, timeout=ANSWER_WITHIN_S) as r:
        text = r.read().decode()
    took = time.monotonic() - t0
    assert took < ANSWER_WITHIN_S, (took, body)
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, text, body)
    if r.status_code >= 400:
        err = _strict_json(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (text, body)
        return r.status_code
    if not body.get("stream"):
        assert _strict_json(text)["choices"], body
        return r.status_code
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", (text, body)
    for e in events[:-1]:
        chunk = _strict_json(e.removeprefix("data: "))
        assert "error" not in chunk, (chunk, body)
    return r.status_code


_SETTINGS = settings(
    max_examples=60,
    deadline=None,  # the bound is ANSWER_WITHIN_S per request, checked in _check
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


def test_fuzz_completions(server):
    with server.http() as client:

        @_SETTINGS
        @given(_body({**_sampling, **_completion_only}))
        def run(body):
            statuses.append(_check(client, "/v1/completions", body))

        statuses: list[int] = []
        run()
        assert client.get("/health").status_code == 200
        # the draws reach generation as well as every kind of refusal
        assert any(s == 200 for s in statuses) and any(s == 400 for s in statuses), statuses
    server.wait_pool_free()


def test_fuzz_chat_completions(server):
    with server.http() as client:

        @_SETTINGS
        @given(_body({**_sampling, **_chat_only}))
        def run(body):
            statuses.append(_check(client, "/v1/chat/completions", body))

        statuses: list[int] = []
        run()
        assert client.get("/health").status_code == 200
        # the draws reach generation as well as every kind of refusal
        assert any(s == 200 for s in statuses) and any(s == 400 for s in statuses), statuses
    server.wait_pool_free()
