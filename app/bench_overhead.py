"""Host cost of the whole server per generated token, against a bare transformers loop.

    python -m esp_serve.app.bench_overhead [--streams 1,32,128] [--tokens 128] [--repeats 3] [--json out.json]

One run, on loopback:
1. The reference: `transformers` greedy `generate` with a KV cache on the checkpoint the
   config serves (the same weights: the built-in model's, a Hugging Face directory or a
   .gguf file; fp32, 1 torch thread), at batch 1 and batch 32:
   wall time per decode step and process CPU time per decoded token (a one-token run,
   the prefill, subtracted). It is measured right
   before each 1-stream and 32-stream point (the server idle meanwhile), not once: on a
   shared VM a core's speed drifts by a third over minutes, and a ratio of two
   measurements minutes apart says more about the VM than about the server.
2. The server: the config's application (serve_config.yaml: SmolLM2-135M-Instruct, 4
   instances, ESP scheduler; `model.path: builtin` for the built-in model) deployed with
   Serve on a local Ray cluster; for each load, N concurrent
   streaming completions of `--tokens` tokens with ignore_eos. Client-side ITL (gaps
   between content chunks; a chunk may carry several tokens) and aggregate tokens/s;
   server-side utime+stime from /proc/PID/stat of every Ray worker, grouped by process
   title into tiers (instances, controller, ingress, Serve proxy, HAProxy, Ray/Serve
   system), read before and after each load; the decode steps of the load by width (how
   many instances each spanned) and how many went ahead of the step before them
   (/v1/esp/status). The config's `controller_options` choose
   the HTTP ingress (serve_config.yaml: HAProxy in front of the ingress replica; without
   the block, Serve's Python proxy).

`--repeats` rounds each run every load once. The client runs in this process and is not
counted. The goals this measures, each ratio against the reference measured just before
the point (per round, and their median): the time per output token at 1 stream (TPOT;
the ITL between chunks is reported too, but a chunk may carry several tokens) <= the
reference's step at batch 1; server CPU per token at 32 streams <= 3x the reference's CPU per token at batch 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TIERS = (  # (tier, substring of the Ray worker's process title), first match wins
    ("instances", "ElasticInstance"),
    ("controller", "ESPController"),
    ("ingress", "OpenAIIngress"),
    ("serve_proxy", "ProxyActor"),  # Serve's Python proxy (HAProxy's fallback under HAProxy)
    ("serve_proxy", "HAProxyManager"),  # the actor that configures HAProxy
    ("haproxy", "haproxy"),  # the HAProxy binary itself, a child of HAProxyManager
    ("ray_system", "ray::"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc
def _parent(pid: str) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants(root: int) -> list[int]:
    """pids of every process under `root` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(_parent(entry), []).append(int(entry))
            except (OSError, ValueError):
                continue
    out: list[int] = []
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def ray_processes() -> dict[int, str]:
    """pid -> tier of every Ray worker process started by this process's own Ray cluster
    (its descendants: other Ray clusters on a shared machine are not counted), by title."""
    out: dict[int, str] = {}
    for pid in descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for tier, needle in TIERS:
            if needle in title:
                out[pid] = tier
                break
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of the stat line


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """pid -> (tier, CPU seconds so far) of every Ray worker process now."""
    return {pid: (tier, cpu_seconds(pid)) for pid, tier in ray_processes().items()}


def cpu_delta_by_tier(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> tuple[dict[str, float], dict[str, int]]:
    """CPU seconds per tier between two snapshots, and processes that exited between them
    per tier. A process in both counts its difference, one started in between all of its
    CPU; one that exited in between counts nothing (its last part is lost): HAProxy
    replaces its process on each reload, so a fixed process list would count the old
    one's total as a negative."""
    totals = {tier: 0.0 for tier, _ in TIERS}
    for pid, (tier, cpu) in after.items():
        totals[tier] += cpu - before[pid][1] if pid in before else cpu
    exited: dict[str, int] = {}
    for pid, (tier, _) in before.items():
        if pid not in after:
            exited[tier] = exited.get(tier, 0) + 1
    return totals, exited


# --------------------------------------------------------------------------- reference
def load_reference_model(path: str) -> Any:
    """transformers' fp32 model of the checkpoint the server serves: the built-in model's
    weights ("builtin"), a Hugging Face directory, or a .gguf file (dequantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    from esp_core.runtime.builtin import save_builtin
    from esp_core.runtime.model_source import BUILTIN, is_gguf

    if path == BUILTIN:
        with tempfile.TemporaryDirectory() as tmp:
            save_builtin(tmp)
            return AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    checkpoint = Path(path)
    if is_gguf(path):
        return AutoModelForCausalLM.from_pretrained(
            str(checkpoint.parent), gguf_file=checkpoint.name, torch_dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(checkpoint), torch_dtype=torch.float32).eval()


class TransformersReference:
    """Greedy `generate` on the served checkpoint (1 torch thread), loaded once so it can
    be measured again right beside each server point."""

    def __init__(self, prompt_len: int, model_path: str = "builtin") -> None:
        import torch

        torch.set_num_threads(1)
        self.model = load_reference_model(model_path)
        self.vocab_size = int(self.model.config.vocab_size)
        # generate's pad id (random ids may equal it: the all-ones mask below says every
        # position is a token, so generate does not guess a padding mask from it)
        pad = self.model.generation_config.pad_token_id
        pad = self.model.generation_config.eos_token_id if pad is None else pad
        self.pad_id = pad[0] if isinstance(pad, list) else pad
        self.prompt_len = prompt_len
        self.gen = torch.Generator().manual_seed(0)
        self.warm_batches: set[int] = set()

    def measure(self, batch: int, tokens: int) -> dict[str, float]:
        """ms per decode step and CPU ms per token decoded, of `generate` runs of `tokens`
        tokens: a run of one token (the prompt's prefill) is subtracted, so a long prompt's
        prefill is not spread over the steps."""
        import torch

        ids = torch.randint(0, min(256, self.vocab_size), (batch, self.prompt_len), generator=self.gen)
        mask = torch.ones_like(ids)

        def run(new_tokens: int) -> tuple[float, float]:
            kwargs = dict(
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                attention_mask=mask,
                pad_token_id=self.pad_id,
            )
            with torch.inference_mode():
                wall0, cpu0 = time.perf_counter(), time.process_time()
                self.model.generate(ids, **kwargs)
                return time.perf_counter() - wall0, time.process_time() - cpu0

        if batch not in self.warm_batches:  # first calls at a batch size pay one-off costs
            run(4)
            self.warm_batches.add(batch)
        first_wall, first_cpu = run(1)
        wall, cpu = run(tokens)
        steps = max(1, tokens - 1)
        return {
            "step_ms": 1e3 * max(0.0, wall - first_wall) / steps,
            "cpu_ms_per_token": 1e3 * max(0.0, cpu - first_cpu) / (steps * batch),
            "prefill_ms": 1e3 * first_wall,
        }


# --------------------------------------------------------------------------- server
def read_config(config_path: str) -> dict[str, Any]:
    """The serve config file (its first application is the one measured)."""
    import yaml

    return yaml.safe_load(Path(config_path).read_text())


def served_path(config_path: str) -> str:
    """The checkpoint the config's application serves (resolved as its instances do)."""
    from esp_serve.app.config import load_config

    return load_config(read_config(config_path)["applications"][0]["args"]).model.resolved_path


def start_server(config_path: str) -> tuple[str, dict[str, Any]]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from esp_serve.app.builder import build_app
    from esp_serve.app.config import with_free_haproxy_side_ports

    doc = read_config(config_path)
    app = doc["applications"][0]
    # its own cluster (address="local"), even where another is running: only its own
    # processes are measured
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as sock:  # a free port: the machine may run other servers
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # the config's controller options too: they choose the HTTP ingress (HAProxy or Serve's
    # proxy); HAProxy's side ports free ones, as the HTTP port
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        controller_options=with_free_haproxy_side_ports(doc.get("controller_options")),
    )
    serve.run(build_app(app["args"]), name=app["name"], route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}", app["args"]


async def wait_healthy(base: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get(f"{base}/health", timeout=5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"server at {base} not healthy after {timeout_s} s")


async def run_load(base: str, model: str, streams: int, tokens: int, prompt_len: int) -> dict[str, Any]:
    """`streams` concurrent completions of `tokens` tokens; client-side timings."""
    import httpx

    from esp_serve.app.bench.client import RequestResult, completion_body, send_completion

    rng = random.Random(streams)
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(limits=limits, timeout=None) as client:
        results = [RequestResult(f"r{i}", prompt_len, tokens, 0.0) for i in range(streams)]
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                send_completion(
                    client,
                    f"{base}/v1/completions",
                    completion_body(model, [rng.randrange(256) for _ in range(prompt_len)], tokens, 0.0),
                    r,
                    t0,
                    600.0,
                )
                for r in results
            )
        )
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    itl = [x for r in ok for x in r.itl_s]
    generated = sum(r.output_tokens for r in ok)
    return {
        "streams": streams,
        "ok": len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated / wall if wall > 0 else 0.0,
        "itl_median_ms": 1e3 * statistics.median(itl) if itl else None,
        # per token: a chunk may carry several tokens (text the detokenizer could only
        # emit once a multi-token character was complete), ITL above is per chunk
        "tpot_median_ms": 1e3 * statistics.median(t for r in ok if (t := r.tpot_s) is not None)
        if ok
        else None,
        "ttft_median_ms": 1e3 * statistics.median(r.ttft_s for r in ok) if ok else None,
    }


# the goals' two ratios: load (streams, also the reference's batch) -> (key, what it divides)
GOALS = {
    1: ("itl_1_stream", "time per token at 1 stream / reference step at batch 1"),
    32: ("cpu_32_streams", "server CPU per token at 32 streams / reference at batch 32"),
}


async def measure(
    base: str,
    loads: list[int],
    tokens: int,
    prompt_len: int,
    repeats: int = 1,
    reference: TransformersReference | None = None,
) -> list[dict[str, Any]]:
    """Each repeat runs every load once; a goal's load gets the reference measured right
    before it, with the server idle (why: the module's docstring)."""
    import httpx

    async with httpx.AsyncClient() as client:
        model = (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
    await run_load(base, model, 4, 16, prompt_len)  # warm-up: first plans, imports, JIT paths
    points = []
    for repeat in range(repeats):
        for n in loads:
            ref = None
            if reference is not None and n in GOALS:
                ref = reference.measure(n, tokens)
            point = await measure_point(base, model, n, tokens, prompt_len)
            point.update(repeat=repeat, reference=ref)
            points.append(point)
            print(json.dumps(point), file=sys.stderr)
    return points


async def measure_point(base: str, model: str, streams: int, tokens: int, prompt_len: int) -> dict[str, Any]:
    """One load: client timings, server CPU per token by tier, decode steps sent."""
    widths_before, lookahead_before = await decode_step_counts(base)
    before = cpu_snapshot()
    point = await run_load(base, model, streams, tokens, prompt_len)
    cpu, point["exited_processes"] = cpu_delta_by_tier(before, cpu_snapshot())
    widths_after, lookahead_after = await decode_step_counts(base)
    # decode steps of the point by width (instances), and how many were sent while the
    # step before them ran
    point["decode_widths"] = {
        w: n - widths_before.get(w, 0) for w, n in sorted(widths_after.items()) if n > widths_before.get(w, 0)
    }
    point["decode_steps"] = sum(point["decode_widths"].values())
    point["lookahead_steps"] = lookahead_after - lookahead_before
    gen = max(1, point["generated_tokens"])
    point["cpu_ms_per_token"] = {t: 1e3 * seconds / gen for t, seconds in cpu.items()}
    point["cpu_ms_per_token"]["server"] = sum(
        v for t, v in point["cpu_ms_per_token"].items() if t != "ray_system"
    )
    return point


async def decode_step_counts(base: str) -> tuple[dict[str, int], int]:
    """(decode steps by width, look-ahead decode steps) the group sent so far
    (/v1/esp/status)."""
    import httpx

    async with httpx.AsyncClient() as client:
        st = (await client.get(f"{base}/v1/esp/status", timeout=30)).json()
    widths = {str(w): int(n) for w, n in st.get("decode_width_counts", {}).items()}
    return widths, int(st.get("decode_lookahead_steps", 0))


def goal_ratios(points: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per repeat, against the reference measured right before the point: the time per
    output token at 1 stream (TPOT: per token, whatever the chunking) / the step at batch
    1, server CPU per token at 32 streams / the reference's at batch 32."""
    out: dict[str, list[float]] = {key: [] for key, _ in GOALS.values()}
    for p in points:
        ref = p.get("reference")
        if ref is None or p["itl_median_ms"] is None or p["streams"] not in GOALS:
            continue
        if p["streams"] == 1:
            ratio = p["tpot_median_ms"] / ref["step_ms"]
        else:
            ratio = p["cpu_ms_per_token"]["server"] / ref["cpu_ms_per_token"]
        out[GOALS[p["streams"]][0]].append(ratio)
    return out


def report(points: list[dict[str, Any]]) -> str:
    lines = [
        "| repeat | streams | reference ms/step (CPU ms/token) | ITL median ms (per token) | tok/s "
        "| server CPU ms/token "
        "| instances | controller | ingress | Serve proxy | HAProxy | Ray system | decode steps (look-ahead) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        c, itl, ref = p["cpu_ms_per_token"], p["itl_median_ms"], p.get("reference")
        ref_cell = f"{ref['step_ms']:.2f} ({ref['cpu_ms_per_token']:.3f})" if ref else "-"
        lines.append(
            f"| {p['repeat']} | {p['streams']} | {ref_cell} | {itl:.1f} ({p['tpot_median_ms']:.1f}) | "
            f"{p['tokens_per_s']:.0f} | "
            f"{c['server']:.2f} | {c['instances']:.2f} | {c['controller']:.2f} | {c['ingress']:.2f} | "
            f"{c['serve_proxy']:.2f} | {c['haproxy']:.2f} | {c['ray_system']:.2f} | "
            f"{p['decode_steps']} ({p['lookahead_steps']}) |"
            if itl is not None
            else f"| {p['repeat']} | {p['streams']} | {ref_cell} | failed: {p['errors']} |"
        )
    ratios_by_goal = goal_ratios(points)
    for key, label in GOALS.values():
        if ratios := ratios_by_goal[key]:
            each = ", ".join(f"{r:.2f}x" for r in ratios)
            lines.append(f"{label}: {each} (median {statistics.median(ratios):.2f}x)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m esp_serve.app.bench_overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--streams", default="1,32,128", help="comma-separated concurrent stream counts")
    p.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds over all loads, each with its own reference"
    )
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    loads = [int(x) for x in args.streams.split(",") if x.strip()]
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    reference = (
        None if args.skip_reference else TransformersReference(args.prompt_len, served_path(args.config))
    )
    base, _ = start_server(args.config)
    try:
        asyncio.run(wait_healthy(base))
        points = asyncio.run(measure(base, loads, args.tokens, args.prompt_len, args.repeats, reference))
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    doc = {
        "command": "python -m esp_serve.app.bench_overhead "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "loadavg": os.getloadavg()},
        "points": points,  # each with the reference measured right before it (or None)
        "goal_ratios": goal_ratios(points),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    print(report(points))
    return 0


if __name__ == "__main__":
    sys.exit(main())
