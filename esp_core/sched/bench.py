"""Scheduler decision-time benchmark: `python -m esp_core.sched.bench [--out FILE.md]`.

For 8, 64 and 256 instances (210K KV slots each, the paper's capacity; A800 /
Llama-2-7B cost model) with a backlog of 512 waiting requests (prompts log-uniform in
100-20K tokens like the facts file's timing of the original, outputs 16-256 tokens):

* cold: the first `schedule()` call, every instance idle, 512 waiting;
* steady: the scheduler driven by a cost-model clock (batches complete after their
  estimated time, sampled tokens are fixed) while the backlog is topped up to 512;
  the time of every `schedule()` call, and its ratio to the shortest decode step it
  planned (the "< 5% of a decode step" target).

Times are process CPU time (the machine is shared; wall time is printed beside it).
"""

from __future__ import annotations

import argparse
import heapq
import platform
import statistics
import time
from datetime import date

import numpy as np

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import BatchResult, NewRequest, PrefillBatch, SampledToken, SamplingParams
from esp_core.sched.scheduler import ESPScheduler


def _request(rng: np.random.Generator, i: int, now: float) -> NewRequest:
    prompt = int(np.exp(rng.uniform(np.log(100), np.log(20_000))))
    out = int(rng.integers(16, 257))
    return NewRequest(f"r{i}", (1,) * prompt, SamplingParams(max_tokens=out, ignore_eos=True), now)


def _batch_time(cost: CostModel, sched: ESPScheduler, batch) -> float:
    tp = sched.tp
    if isinstance(batch, PrefillBatch):
        s1 = sum(len(it.tokens) for it in batch.items)
        s2 = sum(len(it.tokens) ** 2 for it in batch.items)
        return cost.prefill_time(batch.dop, s1, s2, tp)
    masters: dict[int, int] = {}
    for it in batch.items:
        masters[it.master] = masters.get(it.master, 0) + 1
    kv_max = max(int(sched.kv.used[i]) for i in batch.instances)
    return cost.decode_time(max(masters.values()), kv_max, len(batch.instances), tp)


def bench_one(num_instances: int, waiting: int = 512, calls: int = 300, seed: int = 0,
              config: ESPSchedulerConfig | None = None) -> dict:
    cost = CostModel.default_a800()
    sched = ESPScheduler(ClusterSpec(num_instances, 210_000), cost, config or ESPSchedulerConfig())
    rng = np.random.default_rng(seed)
    next_id = 0
    for _ in range(waiting):
        sched.add_request(_request(rng, next_id, 0.0), 0.0)
        next_id += 1
    # cold call
    c0, w0 = time.process_time(), time.perf_counter()
    plan = sched.schedule(0.0)
    cold_cpu, cold_wall = time.process_time() - c0, time.perf_counter() - w0
    events: list = []
    seq = 0
    now = 0.0

    def push(plan):
        nonlocal seq
        for b in plan.batches():
            heapq.heappush(events, (now + _batch_time(cost, sched, b), seq, b))
            seq += 1

    push(plan)
    cpu_times, wall_times, ratios = [], [], []
    for _ in range(calls):
        if not events:
            break
        now, _, batch = heapq.heappop(events)
        is_prefill = isinstance(batch, PrefillBatch)
        sampled = tuple(SampledToken(it.request_id, 7) for it in batch.items
                        if not is_prefill or it.sample)
        sched.update(BatchResult(batch.batch_id, "prefill" if is_prefill else "decode",
                                 batch.instances, sampled), now)
        while len(sched._waiting) < waiting:  # keep the backlog
            sched.add_request(_request(rng, next_id, now), now)
            next_id += 1
        c0, w0 = time.process_time(), time.perf_counter()
        plan = sched.schedule(now)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        cpu_times.append(cpu)
        wall_times.append(wall)
        if plan.decodes:
            step = min(_batch_time(cost, sched, b) for b in plan.decodes)
            ratios.append(cpu / step)
        push(plan)
    ms = lambda xs: 1e3 * np.asarray(xs)  # noqa: E731
    return {
        "instances": num_instances,
        "cold_cpu_ms": 1e3 * cold_cpu,
        "cold_wall_ms": 1e3 * cold_wall,
        "calls": len(cpu_times),
        "mean_cpu_ms": float(ms(cpu_times).mean()),
        "p50_cpu_ms": float(np.percentile(ms(cpu_times), 50)),
        "p99_cpu_ms": float(np.percentile(ms(cpu_times), 99)),
        "max_cpu_ms": float(ms(cpu_times).max()),
        "mean_wall_ms": float(ms(wall_times).mean()),
        "median_ratio_to_decode_step": float(statistics.median(ratios)) if ratios else float("nan"),
        "p99_ratio_to_decode_step": float(np.percentile(ratios, 99)) if ratios else float("nan"),
        "stats": dict(sched.stats),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", default="8,64,256")
    p.add_argument("--waiting", type=int, default=512)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", help="write a markdown table here")
    args = p.parse_args(argv)
    rows = [bench_one(int(n), args.waiting, args.calls) for n in args.instances.split(",")]
    header = ("| instances | cold call (ms) | steady mean | p50 | p99 | max | wall mean | "
              "median / decode step | p99 / decode step |")
    lines = [header, "|" + " --- |" * 9]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['cold_cpu_ms']:.2f} | {r['mean_cpu_ms']:.2f} | "
            f"{r['p50_cpu_ms']:.2f} | {r['p99_cpu_ms']:.2f} | {r['max_cpu_ms']:.2f} | "
            f"{r['mean_wall_ms']:.2f} | {100 * r['median_ratio_to_decode_step']:.1f}% | "
            f"{100 * r['p99_ratio_to_decode_step']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    for r in rows:
        print(f"{r['instances']} instances: {r['calls']} calls, stats {r['stats']}")
    if args.out:
        meta = (f"Measured {date.today().isoformat()} on {platform.node() or 'this VM'} "
                f"({platform.processor() or platform.machine()}, Python {platform.python_version()}): "
                f"`python -m esp_core.sched.bench --out {args.out}`; times are process CPU ms "
                f"per schedule() call.\n\n")
        with open(args.out, "w") as fh:
            fh.write(meta + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
