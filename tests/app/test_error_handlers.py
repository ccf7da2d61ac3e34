"""The ingress's exception handlers: an unexpected failure becomes a 500 in OpenAI's
envelope (and is logged), never a bare traceback. The ingress is real; only its
controller is a stand-in that fails, since the handler is what is under test."""

from __future__ import annotations

import logging

from starlette.testclient import TestClient

from app.ingress import OpenAIIngress, build_api


class _BrokenRemote:
    def remote(self, *args, **kwargs):
        raise RuntimeError("controller exploded")


class _BrokenController:
    model_info = _BrokenRemote()
    generate = _BrokenRemote()

    def options(self, **kwargs):
        return self


def test_unexpected_errors_are_500_in_the_envelope(caplog):
    ingress = OpenAIIngress({"server": {"api_keys_env": None}}, _BrokenController())
    client = TestClient(build_api(ingress), raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR):
        r = client.post("/v1/completions", json={"model": "builtin", "prompt": "x"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "Internal server error: RuntimeError",
                                  "type": "server_error", "param": None,
                                  "code": "internal_error"}}
    assert "controller exploded" in caplog.text
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["error"]["code"] == "unhealthy"
    r = client.get("/nowhere")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
