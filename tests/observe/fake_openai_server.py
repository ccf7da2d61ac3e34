"""A minimal OpenAI-compatible streaming server with controlled delays: a test fixture
of the benchmark CLIENT (it checks the client's measurements), not the product.

Tokens are bytes (like the built-in model's tokenizer): /tokenize returns the UTF-8
bytes of the prompt (after a BOS id 256 if `bos` and special tokens are asked for; text
prompts of completions then count it too), /detokenize decodes them. /v1/completions
streams `max_tokens` tokens of "a" after `ttft_s`, one every `itl_s`, then a usage chunk
and [DONE]. Prompt lengths listed in `fail_prompt_lens` get HTTP 500; in
`stall_prompt_lens` the stream stalls after the first token (for client timeouts).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"


@dataclass
class Behaviour:
    ttft_s: float = 0.2
    itl_s: float = 0.05
    fail_prompt_lens: set[int] = field(default_factory=set)
    stall_prompt_lens: set[int] = field(default_factory=set)
    bos: bool = False  # add token 256 to text prompts, as the built-in tokenizer does
    received: list[dict] = field(default_factory=list)  # request bodies, in arrival order
    arrivals: list[float] = field(default_factory=list)  # perf_counter at arrival
    auth: list[str | None] = field(default_factory=list)  # Authorization header, any route


def build_app(b: Behaviour) -> Starlette:
    async def models(request: Request):
        b.auth.append(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def tokenize(request: Request):
        body = await request.json()
        special = b.bos and body.get("add_special_tokens", True)
        ids = [256] * special + list(body["prompt"].encode())
        return JSONResponse({"count": len(ids), "max_model_len": 1 << 20, "tokens": ids, "token_strs": None})

    async def detokenize(request: Request):
        body = await request.json()
        data = bytes(t for t in body["tokens"] if t < 256)
        return JSONResponse({"prompt": data.decode(errors="replace")})

    async def completions(request: Request):
        body = await request.json()
        b.auth.append(request.headers.get("authorization"))
        b.arrivals.append(time.perf_counter())
        b.received.append(body)
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.encode()) + b.bos
        if n_prompt in b.fail_prompt_lens:
            return JSONResponse(
                {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
                status_code=500,
            )
        n_out = int(body["max_tokens"])

        async def gen():
            head = {"id": "cmpl-x", "object": "text_completion", "model": MODEL}
            await asyncio.sleep(b.ttft_s)
            for i in range(n_out):
                if i:
                    await asyncio.sleep(b.itl_s)
                if i == 1 and n_prompt in b.stall_prompt_lens:
                    await asyncio.sleep(3600)
                done = i == n_out - 1
                yield (
                    "data: "
                    + json.dumps(
                        {
                            **head,
                            "choices": [
                                {"index": 0, "text": "a", "finish_reason": "length" if done else None}
                            ],
                            "usage": None,
                        }
                    )
                    + "\n\n"
                )
            yield (
                "data: "
                + json.dumps(
                    {
                        **head,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": n_prompt,
                            "completion_tokens": n_out,
                            "total_tokens": n_prompt + n_out,
                        },
                    }
                )
                + "\n\n"
            )
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ]
    )


class ServerThread:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, behaviour: Behaviour) -> None:
        config = uvicorn.Config(
            build_app(behaviour),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
