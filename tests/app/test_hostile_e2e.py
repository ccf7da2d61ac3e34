"""One hostile request of every kind, all at once, against the real app (Ray Serve over
HTTP on loopback): each is answered within 10 s with a 2xx or a 4xx envelope, a probe
request sent meanwhile succeeds, and afterwards the server is healthy and its KV pool free.

Each of these once cost the server seconds to minutes of blocking work or a 500; the
bounds in app/bounds.py (the `limits:` config section) refuse them before any work."""

from __future__ import annotations

import asyncio
import json
import time

MODEL = "builtin"
ANSWER_WITHIN_S = 10.0


def _deep(depth: int) -> bytes:
    return b'{"model": "builtin", "prompt": "x", "logit_bias": ' + b"[" * depth + b"]" * depth + b"}"


def _raw(fields: bytes) -> bytes:
    return b'{"model": "builtin", "prompt": "x", "max_tokens": 2, ' + fields + b"}"


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"

# (name, route, body, expected status)
HOSTILE = [
    ("1M-char stop string", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": "s" * 1_000_000}, 400),
    ("1000 stop strings", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["ab"] * 1000}, 400),
    (
        "the most stop strings allowed",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": 8, "stop": [f"{i:02d}" + "z" * 254 for i in range(16)]},
        200,
    ),
    (
        "client template loops",
        "/v1/chat/completions",
        _chat(chat_template_kwargs={"chat_template": NESTED_LOOPS}),
        400,
    ),
    (
        "client template 2M chars",
        "/v1/chat/completions",
        _chat(chat_template_kwargs={"chat_template": "{{ 'A' * 2000000 }}"}),
        400,
    ),
    (
        "messages in template kwargs",
        "/v1/chat/completions",
        _chat(chat_template_kwargs={"messages": []}),
        400,
    ),
    ("tools in template kwargs", "/v1/chat/completions", _chat(chat_template_kwargs={"tools": [{}]}), 400),
    ("fan-out 20000 x 16", "/v1/completions", {"model": MODEL, "prompt": [[7]] * 20_000, "n": 16}, 400),
    ("100000 invalid prompt items", "/v1/completions", {"model": MODEL, "prompt": [1, "x"] * 50_000}, 400),
    ("repetition_penalty Infinity", "/v1/completions", _raw(b'"repetition_penalty": Infinity'), 400),
    ("repetition_penalty 1e-300", "/v1/completions", _raw(b'"repetition_penalty": 1e-300'), 400),
    ("temperature 1e-40 with logprobs", "/v1/completions", _raw(b'"temperature": 1e-40, "logprobs": 5'), 400),
    (
        "150000 logit_bias entries",
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "logit_bias": {str(i): 1 for i in range(150_000)}},
        400,
    ),
    (
        "logit_bias aliases",
        "/v1/completions",
        _raw(b'"logit_bias": {"50": 100, "050": 100, "+50": 100}'),
        400,
    ),
    ("JSON 100000 deep", "/v1/completions", _deep(100_000), 400),
    ("echo of a lone surrogate", "/v1/completions", _raw(b'"prompt": "\\ud800", "echo": true'), 400),
    (
        "every token masked but one, with logprobs",
        "/v1/chat/completions",
        _chat(logprobs=True, top_logprobs=5, logit_bias={str(i): -100 for i in range(1, 258)}, stream=True),
        200,
    ),
]


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} in a response")

    return json.loads(text, parse_constant=refuse)


async def _send(c, route: str, body) -> tuple[int, str, float]:
    t0 = time.monotonic()
    if isinstance(body, bytes):
        r = await c.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = await c.post(route, json=body)
    return r.status_code, r.text, time.monotonic() - t0


PROBE = {"model": MODEL, "prompt": "probe", "max_tokens": 4, "temperature": 0}


def test_hostile_requests_at_once_each_answered_probe_served(server):
    async def main():
        async with server.async_http() as c:
            idle = (await _send(c, "/v1/completions", PROBE))[2]
            hostile = [asyncio.ensure_future(_send(c, route, body)) for _, route, body, _ in HOSTILE]
            await asyncio.sleep(0.05)  # the probe goes out while the hostile ones are in flight
            probe = await _send(c, "/v1/completions", PROBE)
            return idle, probe, await asyncio.gather(*hostile)

    loop = asyncio.new_event_loop()  # not asyncio.run: it would unset the thread's loop for later tests
    try:
        idle, probe, answers = loop.run_until_complete(main())
    finally:
        loop.close()
    for (name, _, _, expected), (status, text, took) in zip(HOSTILE, answers):
        assert status == expected, (name, status, text[:300])
        assert took < ANSWER_WITHIN_S, (name, took)
        body = _strict_json(
            text.split("\n\n")[-3].removeprefix("data: ") if text.startswith("data:") else text
        )
        if status >= 400:
            assert set(body["error"]) == {"message", "type", "param", "code"}, (name, body)
    masked = [json.loads(e[6:]) for e in answers[-1][1].split("\n\n") if e.startswith("data: {")]
    logprobs = [
        lp["logprob"]
        for ch in masked
        for c in ch["choices"]
        if c["logprobs"]
        for lp in c["logprobs"]["content"]
    ]
    assert logprobs and all(lp == 0.0 or lp < 0 for lp in logprobs)  # finite (JSON-parsed strictly above)
    assert probe[0] == 200 and json.loads(probe[1])["usage"]["completion_tokens"] == 4
    print(f"probe latency: idle {idle:.3f} s, under hostile load {probe[2]:.3f} s")
    assert probe[2] < ANSWER_WITHIN_S
    with server.http() as c:
        assert c.get("/health").status_code == 200
    server.wait_pool_free()
