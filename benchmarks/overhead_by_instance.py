"""`python -m esp_serve.app.bench_overhead` plus where each load's decode ran.

    PYTHONPATH=. python benchmarks/overhead_by_instance.py --config builtin.yaml \
        --streams 1,32,128 --tokens 512 --skip-reference [--json out.json]

Same arguments and output as bench_overhead; after each load (the warm-up too) it prints
to stderr one `BY_INSTANCE {...}` line: the CPU seconds of each instance process during
that load (sorted: one large number means the streams decoded on one instance) and the
scheduler's cumulative counters from /v1/esp/status (`decode_steps` grows by one per
group step, so its growth over a load of N x T tokens is T when all N share one group).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

import esp_serve.app.bench_overhead as bench

COUNTERS = ("packed_prefills", "pauses", "decode_steps", "prefill_batches")
_measured_load = bench.run_load


def _scheduler_stats(doc: Any) -> dict[str, Any]:
    """The first `scheduler_stats` mapping anywhere in the status document."""
    if isinstance(doc, dict):
        if isinstance(doc.get("scheduler_stats"), dict):
            return doc["scheduler_stats"]
        items = list(doc.values())
    elif isinstance(doc, list):
        items = doc
    else:
        return {}
    for item in items:
        found = _scheduler_stats(item)
        if found:
            return found
    return {}


async def run_load_by_instance(
    base: str, model: str, streams: int, tokens: int, prompt_len: int
) -> dict[str, Any]:
    instances = [pid for pid, tier in bench.ray_processes().items() if tier == "instances"]
    before = {pid: bench.cpu_seconds(pid) for pid in instances}
    point = await _measured_load(base, model, streams, tokens, prompt_len)
    cpu_s = sorted(round(bench.cpu_seconds(pid) - before[pid], 2) for pid in instances)
    try:
        async with httpx.AsyncClient() as client:
            status = (await client.get(f"{base}/v1/esp/status", timeout=120)).json()
    except httpx.HTTPError as e:  # extra information: never lose the measurement for it
        status = {"error": repr(e)}
    stats = _scheduler_stats(status)
    line = {"streams": streams, "instance_cpu_s": cpu_s, "stats": {k: stats.get(k) for k in COUNTERS}}
    print("BY_INSTANCE " + json.dumps(line), file=sys.stderr)
    return point


if __name__ == "__main__":
    bench.run_load = run_load_by_instance
    sys.exit(bench.main(sys.argv[1:]))
