"""The ingress's exception handlers: an unexpected failure becomes a 500 in OpenAI's
envelope (and is logged), never a bare traceback. The ingress is real; only its
controller is a stand-in that fails, since the handler is what is under test."""

from __future__ import annotations

import logging
import re

from starlette.testclient import TestClient

from esp_serve.app.ingress import OpenAIIngress, build_api
from tests.support.controller_handle import REPLICA, ScriptedController, tokens


class _BrokenRemote:
    def remote(self, *args, **kwargs):
        raise RuntimeError("controller exploded")


class _BrokenController:
    model_info = _BrokenRemote()
    submit = _BrokenRemote()

    def options(self, **kwargs):
        return self


def test_unexpected_errors_are_500_in_the_envelope(caplog):
    ingress = OpenAIIngress({"server": {"api_keys_env": None}}, _BrokenController())
    client = TestClient(build_api(ingress), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR):
        r = client.post("/v1/completions", json={"model": "builtin", "prompt": "x"})
    assert r.status_code == 500
    err = r.json()["error"]
    # the cause's class and an id to find the details in the log; never the internal text
    assert re.fullmatch(
        r"Internal server error: RuntimeError \(error id (err-[0-9a-f]{16})\)", err["message"]
    )
    assert {k: err[k] for k in ("type", "param", "code")} == {
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    error_id = err["message"].split("error id ")[1].rstrip(")")
    assert "controller exploded" in caplog.text and error_id in caplog.text
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "unhealthy"
    assert r.json()["error"]["message"] == "unhealthy"  # no exception text
    r = client.get("/nowhere")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def _one_token_then_broken(request) -> list:
    """The request is admitted, one token arrives, then its subscription breaks."""
    return [tokens(1, finish=None), ConnectionError("controller replica died")]


def test_a_stream_that_breaks_mid_way_ends_with_an_error_event_and_done():
    controller = ScriptedController(_one_token_then_broken)
    ingress = OpenAIIngress({"server": {"api_keys_env": None}}, controller)
    client = TestClient(build_api(ingress), raise_server_exceptions=False)
    body = {"model": "builtin", "prompt": "x", "max_tokens": 5, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    import json

    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert payloads[0]["choices"][0]["text"] == "h"
    err = payloads[-1]["error"]
    assert err["code"] == "generation_failed" and "ConnectionError" in err["message"]
    assert "request id cmpl-" in err["message"] and "controller replica died" not in err["message"]
    assert controller.cancelled == [(REPLICA, controller.requests[0].request_id)]
    # the same failure without streaming is a 500 in the envelope
    r = client.post("/v1/completions", json={**body, "stream": False})
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
