"""Every error status the app returns, each in OpenAI's envelope, over real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import MAX_MODEL_LEN, OTHER_KEY

pytestmark = pytest.mark.slow

MODEL = "builtin"


def assert_envelope(
    r: httpx.Response, status: int, code: str | None = None, param: str | None = None
) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "n": 0}, "n"),
        ({"model": MODEL, "prompt": "x", "bogus_field": 1}, "bogus_field"),
        ({"model": MODEL}, "prompt"),
        ({"model": MODEL, "prompt": [1, 2, 999]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, None),
        ({"model": MODEL, "prompt": "x", "logprobs": 50}, "logprobs"),
    ],
)
def test_400_invalid_parameters(server, body, param):
    with server.http() as c:
        err = assert_envelope(c.post("/v1/completions", json=body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_400_not_json_and_never_422(server):
    with server.http() as c:
        assert_envelope(
            c.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"}), 400
        )
        assert_envelope(c.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400)
        assert_envelope(c.post("/v1/chat/completions", json=[1, 2]), 400)


def test_400_context_length_exceeded(server):
    with server.http() as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": MAX_MODEL_LEN})
        err = assert_envelope(r, 400, code="context_length_exceeded")
        assert str(MAX_MODEL_LEN) in err["message"]
        long_prompt = list(range(1, 200)) * 6  # 1194 ids > max_model_len
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt})
        assert_envelope(r, 400, code="context_length_exceeded")
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]},
        )
        assert_envelope(r, 400, code="context_length_exceeded")
    # the openai client raises its typed error for it
    with pytest.raises(openai.BadRequestError) as e:
        server.openai().completions.create(model=MODEL, prompt="abc", max_tokens=5000)
    assert e.value.code == "context_length_exceeded"


def test_404_unknown_model_and_route(server):
    with server.http() as c:
        assert_envelope(
            c.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}),
            404,
            code="model_not_found",
            param="model",
        )
        assert_envelope(
            c.post(
                "/v1/chat/completions",
                json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]},
            ),
            404,
            code="model_not_found",
        )
        assert_envelope(c.get("/v1/models/gpt-9"), 404, code="model_not_found")
        assert_envelope(c.get("/v1/nothing-here"), 404)
        assert_envelope(c.get("/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        server.openai().completions.create(model="gpt-9", prompt="x")


def test_401_without_a_valid_key(server):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert_envelope(c.post("/v1/completions", json=body), 401, code="invalid_api_key")
        assert_envelope(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_envelope(c.get("/v1/models", headers={"Authorization": "Basic x"}), 401)
        assert_envelope(c.post("/tokenize", json={"prompt": "x"}), 401)
        assert c.get("/health").status_code == 200  # probes need no key
        ok = c.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert ok.status_code == 200
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_413_body_over_the_limit(server):
    from esp_serve.app.config import ServerSection

    limit = ServerSection().body_limit(MAX_MODEL_LEN)
    with server.http() as c:
        r = c.post(
            "/v1/completions",
            content=b"{" + b" " * (limit + 10) + b"}",
            headers={"content-type": "application/json"},
        )
        err = assert_envelope(r, 413, code="request_too_large")
        assert str(limit) in err["message"]
        # a max-context prompt as token ids is far below the limit and accepted
        ids = [65] * (MAX_MODEL_LEN - 1)
        ok = c.post("/tokenize", json={"prompt": "A" * (MAX_MODEL_LEN - 1)})
        assert ok.status_code == 200
        ok = c.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1})
        assert ok.status_code == 200, ok.text
