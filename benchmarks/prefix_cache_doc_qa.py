"""Prefix cache: TTFT of a second question on the same document, against a cold server.

    python benchmarks/prefix_cache_doc_qa.py --doc-tokens 7800 --output 32

Starts the app of the default `serve_config.yaml` itself, on a private Ray cluster, twice:
with the prefix cache on (as configured) it asks document + question 1, then document +
question 2, streamed over HTTP (`/v1/chat/completions`, greedy); then, with
`prefix_cache.enabled: false`, a cold server asks document + question 2 alone. Prints
both TTFTs of the first server, the cold TTFT, `usage.prompt_tokens_details.cached_tokens`
and whether question 2's answer equals the cold one. The document is English text
(numbered paragraphs) of about `--doc-tokens` tokens; the default model's context is
8,192 tokens, so a longer document needs a longer context: `--rope-scaling` (the config's
`model.rope_scaling`) with `--max-model-len`, or a model with a longer context (`--config`).

    python benchmarks/prefix_cache_doc_qa.py --doc-tokens 12000 --max-model-len 16384 \
        --rope-scaling '{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import time
from typing import Any

import httpx
import yaml

PARAGRAPH = (
    "The river rises in the hills north of the town and runs south through farmland, "
    "where it feeds the mills that made the valley rich in the last century. Each spring "
    "the snow melts and the water climbs the stone walls of the old quay. "
)
QUESTIONS = (
    "What feeds the mills of the valley? Answer in one sentence.",
    "In which season does the water climb the walls of the quay? Answer in one sentence.",
)


def app_args(a: argparse.Namespace, cache: bool) -> dict[str, Any]:
    """The config file's app args with this run's overrides."""
    with open(a.config) as f:
        args = copy.deepcopy(yaml.safe_load(f)["applications"][0]["args"])
    args.setdefault("prefix_cache", {})["enabled"] = cache
    if a.rope_scaling is not None:
        args["model"]["rope_scaling"] = json.loads(a.rope_scaling)
    if a.max_model_len is not None:
        args["model"]["max_model_len"] = a.max_model_len
    if a.memory_gib_per_instance is not None:  # a smaller pool where others share the memory
        args["cluster"].pop("memory_fraction", None)
        args["cluster"]["memory_gib_per_instance"] = a.memory_gib_per_instance
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: dict[str, Any], port: int, timeout_s: float = 900) -> str:
    """The app on a Ray cluster of this process's own (shut down by `stop_server`)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from esp_serve.app.builder import build_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="esp", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server did not answer /health within {timeout_s} s")


def stop_server() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def document(c: httpx.Client, model: str, tokens: int) -> str:
    """Numbered paragraphs, as many as make about `tokens` tokens."""
    per = len(c.post("/tokenize", json={"model": model, "prompt": f"{999}. {PARAGRAPH}"}).json()["tokens"])
    return "".join(f"{i}. {PARAGRAPH}" for i in range(1, tokens // per + 1))


def ask(c: httpx.Client, model: str, doc: str, question: str, output: int) -> dict[str, Any]:
    """One streamed chat completion: TTFT, answer, usage."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}],
        "max_tokens": output,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.monotonic()
    ttft, text, usage = None, "", {}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for ch in chunk["choices"]:
                piece = ch["delta"].get("content") or ""
                if piece and ttft is None:
                    ttft = time.monotonic() - t0
                text += piece
            usage = chunk.get("usage") or usage
    return {"ttft_s": ttft, "text": text, "usage": usage}


def session(a: argparse.Namespace, cache: bool, questions: tuple[str, ...]):
    """Start a server, ask the questions in order, return the answers and its status."""
    t0 = time.monotonic()
    base = start_server(app_args(a, cache), free_port())
    print(f"server up in {time.monotonic() - t0:.0f} s (prefix cache {'on' if cache else 'off'})", flush=True)
    try:
        with httpx.Client(base_url=base, timeout=1800) as c:
            model = c.get("/v1/models").json()["data"][0]["id"]
            doc = document(c, model, a.doc_tokens)
            answers = []
            for q in questions:
                answers.append(ask(c, model, doc, q, a.output))
                got = answers[-1]
                print(
                    f"  TTFT {got['ttft_s']:.2f} s, prompt {got['usage']['prompt_tokens']} tokens, cached "
                    f"{got['usage']['prompt_tokens_details']['cached_tokens']}: {got['text']!r}",
                    flush=True,
                )
            status = c.get("/v1/esp/status").json()
        return answers, status
    finally:
        stop_server()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--doc-tokens", type=int, default=7800)
    p.add_argument("--output", type=int, default=32)
    p.add_argument(
        "--memory-gib-per-instance",
        type=float,
        help="cluster.memory_gib_per_instance instead of the config's memory_fraction (a smaller KV pool)",
    )
    p.add_argument("--rope-scaling", help="model.rope_scaling as JSON (extends the model's context)")
    p.add_argument("--max-model-len", type=int, help="model.max_model_len")
    p.add_argument("--json", help="write the measurements here")
    a = p.parse_args()
    load_before = os.getloadavg()[0]
    (first, second), status = session(a, True, QUESTIONS)
    (cold,), _ = session(a, False, QUESTIONS[1:])
    result = {
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "prompt_tokens": second["usage"]["prompt_tokens"],
        "ttft_first_s": first["ttft_s"],
        "ttft_second_s": second["ttft_s"],
        "ttft_cold_second_s": cold["ttft_s"],
        "second_over_first": second["ttft_s"] / first["ttft_s"],
        "cached_tokens": second["usage"]["prompt_tokens_details"]["cached_tokens"],
        "cached_fraction": second["usage"]["prompt_tokens_details"]["cached_tokens"]
        / second["usage"]["prompt_tokens"],
        "same_answer_as_cold": second["text"] == cold["text"],
        "prefix_cache_status": status.get("prefix_cache"),
    }
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
