"""TTFT and inter-token latency of one streamed completion at a time, by prompt length.

    python benchmarks/ttft_by_prompt_len.py --base-url http://127.0.0.1:8000 \
        --lengths 1024,4096,8000 --output 32 --repeat 2

Prompts are English text (a paragraph repeated, cut to the exact token count with the
server's /tokenize), each request alone on the server (no queueing in the numbers). Also
prints the answer to one chat question, as a check that the model speaks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

PARAGRAPH = (
    "The river rises in the hills north of the town and runs south through farmland, "
    "where it feeds the mills that made the valley rich in the last century. Each spring "
    "the snow melts and the water climbs the stone walls of the old quay. "
)


def prompt_of(c: httpx.Client, model: str, tokens: int) -> list[int]:
    text = PARAGRAPH * (tokens // 40 + 2)
    ids = c.post("/tokenize", json={"model": model, "prompt": text}).json()["tokens"]
    return ids[:tokens]


def one(c: httpx.Client, model: str, ids: list[int], output: int) -> tuple[float, list[float]]:
    body = {"model": model, "prompt": ids, "max_tokens": output, "temperature": 0, "ignore_eos": True}
    t0 = time.monotonic()
    stamps: list[float] = []
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                stamps.append(time.monotonic() - t0)
    return stamps[0], [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--lengths", default="1024,4096,8000")
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    with httpx.Client(base_url=a.base_url, timeout=600) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        chat = c.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 32,
                "temperature": 0,
            },
        ).json()
        print(f"model {model}: {chat['choices'][0]['message']['content']!r}")
        print("| prompt tokens | TTFT mean (ms) | TTFT runs (ms) | ITL mean (ms) |")
        print("| ---: | ---: | --- | ---: |")
        for n in (int(x) for x in a.lengths.split(",")):
            ids = prompt_of(c, model, n)
            runs = [one(c, model, ids, a.output) for _ in range(a.repeat)]
            ttfts = [r[0] * 1000 for r in runs]
            itl = statistics.mean(g * 1000 for r in runs for g in r[1])
            shown = " / ".join(f"{t:.0f}" for t in ttfts)
            print(f"| {len(ids)} | {statistics.mean(ttfts):.0f} | {shown} | {itl:.1f} |")


if __name__ == "__main__":
    main()
