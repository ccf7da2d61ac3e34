"""Serving benchmark: drive an OpenAI-compatible endpoint with Poisson arrivals and measure
TTFT, TPOT, ITL, e2e latency, per-token / input / output latency and goodput.

    python -m esp_serve.app.bench_serving --base-url http://127.0.0.1:8000 \\
        --workload synthetic --prompt-len 32:512 --output-len 4:16 --num-requests 50 \\
        --rates 0.5,1,2 --goodput ttft:2000 tpot:200 --json out.json --plot out.png

Workloads: `--trace FILE.jsonl` (arrival_s, prompt_tokens, output_tokens; its arrival
times are used unless --rate/--rates re-time it), `--workload synthetic` (uniform lengths
in --prompt-len / --output-len), or the simulator's dataset-like generators
(`--workload sharegpt|l-eval|lv-eval|mixed|zipf-1.0|...`, from esp_core.sim.workloads;
`--max-prompt-len` caps them for small models). Every rate of a sweep offers the same
requests, re-timed (rate `inf` sends all at once).

Requests follow vLLM's benchmark conventions: `/v1/completions`, `stream=True`,
`ignore_eos=True`, `max_tokens` = the wanted output length, prompts of an exact token
length made with the server's `/tokenize` and `/detokenize` (see app/bench/prompts.py),
so it also runs against vLLM. Only loopback targets are accepted. Runs are bounded:
`--num-requests` (<= 100000), `--request-timeout`, `--max-duration` per rate.

Output: a JSON document {"config", "workload", "points": [summary per rate]} (see
app/bench/stats.py for the fields), optional per-request records, optional PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from esp_serve.app.bench import workload as wl
from esp_serve.app.bench.client import RequestResult, completion_body, send_completion
from esp_serve.app.bench.prompts import PromptBuilder
from esp_serve.app.bench.stats import parse_slos, summarize


def check_loopback(base_url: str) -> str:
    """The base URL without a trailing slash; ValueError unless it names this machine."""
    url = urlparse(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--base-url must be http(s)://HOST:PORT, got {base_url!r}")
    host = url.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a DNS name: not resolved, not trusted
        if not loopback:
            raise ValueError(f"only loopback targets are allowed (127.0.0.0/8, ::1, localhost), got {host!r}")
    return base_url.rstrip("/")


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not (r > 0) for r in rates):
        raise ValueError(f"rates must be positive numbers or inf, got {text!r}")
    return rates


def parse_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    return (int(lo), int(hi)) if sep else (int(lo), int(lo))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m esp_serve.app.bench_serving", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument(
        "--api-key",
        default=None,
        help="sent as Authorization: Bearer KEY (default: $OPENAI_API_KEY, so the "
        "key need not appear in the process list)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", default=None, help="JSONL trace file")
    src.add_argument(
        "--workload", default=wl.SYNTHETIC, help="synthetic, or a simulator workload (sharegpt, l-eval, ...)"
    )
    p.add_argument("--num-requests", type=int, default=50)
    p.add_argument("--prompt-len", type=parse_range, default=(32, 512), help="LO:HI tokens")
    p.add_argument("--output-len", type=parse_range, default=(4, 16), help="LO:HI tokens")
    p.add_argument("--max-prompt-len", type=int, default=None, help="cap prompt lengths")
    p.add_argument("--max-output-len", type=int, default=None, help="cap output lengths")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, default=None, help="req/s (inf = all at once)")
    rate.add_argument("--rates", type=parse_rates, default=None, help="sweep: a,b,c req/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-mode", choices=("token-ids", "text"), default="token-ids")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight (default: unbounded)",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-duration", type=float, default=3600.0, help="seconds per rate")
    p.add_argument(
        "--goodput",
        nargs="*",
        default=[],
        help="SLOs KEY:MS, KEY in ttft tpot itl e2el per_token input output",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="latency-vs-rate PNG (with several rates)")
    p.add_argument("--save-requests", action="store_true", help="include every request's record in the JSON")
    p.add_argument("--quiet", action="store_true")
    return p


def load_requests(args: argparse.Namespace) -> list[wl.RequestSpec]:
    n = args.num_requests
    if not 1 <= n <= wl.MAX_REQUESTS:
        raise ValueError(f"--num-requests must be in 1..{wl.MAX_REQUESTS}")
    if args.trace:
        reqs = wl.read_trace(args.trace, limit=n)
    elif args.workload == wl.SYNTHETIC:
        reqs = wl.synthetic(n, args.prompt_len, args.output_len, args.seed)
    else:
        reqs = wl.dataset_workload(args.workload, n, args.seed)
    return wl.clip_lengths(reqs, args.max_prompt_len, args.max_output_len)


async def discover_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(base_url + "/v1/models", timeout=30)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("/v1/models lists no model; pass --model")
    return str(data[0]["id"])


async def run_once(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    base_url: str,
    model: str,
    builder: PromptBuilder,
    requests: Sequence[wl.RequestSpec],
    headers: dict[str, str] | None,
) -> list[RequestResult]:
    """Send `requests` at their arrival offsets; wait for all (bounded by --max-duration)."""
    # Build every prompt before the clock starts, so prompt building never delays sends.
    bodies, results = [], []
    for i, spec in enumerate(requests):
        prompt, count = await builder.build(i, spec.prompt_tokens)
        bodies.append(completion_body(model, prompt, spec.output_tokens, args.temperature))
        results.append(RequestResult(spec.request_id, count, spec.output_tokens, spec.arrival_s))
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    url = base_url + args.endpoint
    t0 = time.perf_counter()

    async def one(body: dict[str, Any], result: RequestResult) -> None:
        if sem is None:
            await send_completion(client, url, body, result, t0, args.request_timeout, headers)
            return
        async with sem:
            await send_completion(client, url, body, result, t0, args.request_timeout, headers)

    tasks = []
    for body, result in zip(bodies, results):
        delay = t0 + result.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, result)))
    remaining = max(0.0, args.max_duration - (time.perf_counter() - t0))
    done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task, result in zip(tasks, results):
        if task in pending and result.error is None:
            result.ok, result.error = False, f"cut off by --max-duration {args.max_duration:g}s"
        elif task.done() and not task.cancelled() and task.exception() is not None:
            result.ok, result.error = False, f"client error: {task.exception()!r}"
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base_url = check_loopback(args.base_url)
    slos = parse_slos(args.goodput)
    requests = load_requests(args)
    rates: list[float | None] = args.rates or ([args.rate] if args.rate else [None])
    if rates == [None] and not args.trace:
        rates = [math.inf]  # generated workloads have no times of their own
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    limits = httpx.Limits(max_connections=args.max_concurrency or 1000, max_keepalive_connections=64)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    points, records = [], []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        model = args.model or await discover_model(client, base_url)
        builder = PromptBuilder(client, base_url, model, args.prompt_mode)
        await builder.prepare()
        for rate in rates:
            reqs = requests if rate is None else wl.with_rate(requests, rate, args.seed)
            results = await run_once(client, args, base_url, model, builder, reqs, headers)
            summary = summarize(results, slos, rate_label(rate))
            points.append(summary)
            if args.save_requests:
                records.append({"rate": rate_label(rate), "requests": [r.to_dict() for r in results]})
            if not args.quiet:
                print(format_point(summary), file=sys.stderr, flush=True)
    out: dict[str, Any] = {
        "config": {k: json_safe(v) for k, v in vars(args).items() if k != "api_key"},
        "model": model,
        "base_url": base_url,
        "workload": wl.describe(requests),
        "points": points,
    }
    if args.save_requests:
        out["requests"] = records
    return out


def rate_label(rate: float | None) -> float | str | None:
    """Rates as JSON can hold them: inf becomes the string "inf"."""
    return "inf" if rate is not None and math.isinf(rate) else rate


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def format_point(s: dict[str, Any]) -> str:
    def f(d: dict[str, Any], k: str) -> str:
        v = d.get(k)
        return "n/a" if v is None else f"{v:.1f}"

    line = (
        f"rate={s['rate']} done={s['completed']}/{s['num_requests']} "
        f"ttft mean/p99={f(s['ttft_ms'], 'mean')}/{f(s['ttft_ms'], 'p99')}ms "
        f"tpot mean/p99={f(s['tpot_ms'], 'mean')}/{f(s['tpot_ms'], 'p99')}ms "
        f"itl p99={f(s['itl_ms'], 'p99')}ms e2e mean={f(s['e2el_ms'], 'mean')}ms"
    )
    if s.get("goodput_req_s") is not None:
        line += f" goodput={s['goodput_req_s']:.3f}req/s ({s['slo_attainment']:.0%})"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except (ValueError, RuntimeError, OSError, httpx.HTTPError) as err:
        print(f"bench_serving: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    if args.plot:
        from esp_serve.app.bench.plot import plot_sweep

        plot_sweep(
            result["points"],
            args.plot,
            title=f"{result['model']} ({result['workload'].get('num_requests')} req/rate)",
        )
    return 0 if all(p["failed"] == 0 for p in result["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
