"""Scheduler decision-time benchmark: `python -m esp_core.sched.bench [--out FILE.md]`.

For 8, 64 and 256 instances (210K KV slots each, the paper's capacity; A800 /
Llama-2-7B cost model) with a backlog of 512 waiting requests (prompts log-uniform in
100-20K tokens like the facts file's timing of the original, outputs 16-256 tokens):

* cold: the first `schedule()` call, every instance idle, 512 waiting;
* steady: the scheduler driven by a cost-model clock (batches complete after their
  estimated time, sampled tokens are fixed) while the backlog is topped up to 512;
  the time of every `schedule()` call, and its ratio to a decode step (the "< 5% of a
  decode step" target): the shortest cost-model decode step among the decode batches
  running when the call is made and those it plans -- the steps a slow call can delay.
  Calls with no decode batch running or planned delay no decode step and have no ratio.

Times are process CPU time (the machine is shared; wall time is printed beside it),
including the garbage collections that happen to run inside a call (their share is
reported: they are triggered by whichever allocation crosses the threshold, here often
the benchmark's own new requests). The CLI applies the controller process's GC setting
(`--gc server`, app/gc_tuning.py: the heap alive at startup frozen, automatic
collection paused inside each call as around the controller's decide-and-dispatch,
gc_deferral.py); each scenario starts from a collected heap.

`--digest` prints a hash of every plan of the same scenario (policies esp, esp chunked,
esp chunked at 4K-token chunks, loongserve) instead of timing it: a refactoring that
keeps the digests equal changed no decision on this workload.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import hashlib
import heapq
import itertools
import os
import pickle
import platform
import statistics
import time
from collections import Counter
from datetime import date
from typing import Any

import numpy as np

from esp_core.sched.batching import plan_batches
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.gc_deferral import deferred_collections
from esp_core.sched.interface import ClusterSpec, RequestEvent
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    IterationPlan,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    SampledToken,
    SamplingParams,
)
from esp_core.sched.scheduler import ESPScheduler


def _request(rng: np.random.Generator, i: int, now: float) -> NewRequest:
    prompt = int(np.exp(rng.uniform(np.log(100), np.log(20_000))))
    out = int(rng.integers(16, 257))
    return NewRequest(f"r{i}", (1,) * prompt, SamplingParams(max_tokens=out, ignore_eos=True), now)


class CostModelClock:
    """Drives a scheduler without instances: a batch completes after its cost-model
    time with token 7 sampled for each request, and the waiting backlog is topped up
    to `waiting` after every completion (seeded requests, so runs are reproducible)."""

    def __init__(self, sched: ESPScheduler, cost: CostModel, waiting: int, seed: int) -> None:
        self.sched, self.cost, self.waiting = sched, cost, waiting
        self.rng = np.random.default_rng(seed)
        self.now = 0.0
        self.decode_steps: dict[int, float] = {}  # running decode batch -> its step time
        self._events: list[tuple[float, int, PrefillBatch | DecodeBatch]] = []
        self._seq = itertools.count()
        self._next_id = itertools.count()
        self.top_up()

    def top_up(self) -> None:
        while self.sched.num_waiting() < self.waiting:
            self.sched.add_request(_request(self.rng, next(self._next_id), self.now), self.now)

    def push(self, plan: IterationPlan) -> None:
        for b in plan.batches():
            t = self.batch_time(b)
            if isinstance(b, DecodeBatch):
                self.decode_steps[b.batch_id] = t
            heapq.heappush(self._events, (self.now + t, next(self._seq), b))

    def complete_next(self) -> list[RequestEvent] | None:
        """Complete the next batch (None when nothing runs) and top up the backlog."""
        if not self._events:
            return None
        self.now, _, batch = heapq.heappop(self._events)
        self.decode_steps.pop(batch.batch_id, None)
        is_prefill = isinstance(batch, PrefillBatch)
        sampled = tuple(
            SampledToken(it.request_id, 7)
            for it in batch.items
            if not isinstance(it, PrefillItem) or it.sample
        )
        kind = "prefill" if is_prefill else "decode"
        events = self.sched.update(BatchResult(batch.batch_id, kind, batch.instances, sampled), self.now)
        self.top_up()
        return events

    def batch_time(self, batch: PrefillBatch | DecodeBatch) -> float:
        tp = self.sched.tp
        if isinstance(batch, PrefillBatch):
            s1 = sum(len(it.tokens) for it in batch.items)
            s2 = sum(len(it.tokens) ** 2 for it in batch.items)
            return self.cost.prefill_time(batch.dop, s1, s2, tp)
        masters = Counter(it.master for it in batch.items)
        kv_max = max(int(self.sched.kv.used[i]) for i in batch.instances)
        return self.cost.decode_time(max(masters.values()), kv_max, len(batch.instances), tp)


class _GCTimer:
    """A gc callback adding up the CPU time of collections: `seconds` (reset it to start
    over) and `total` (every collection since it was made)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.process_time()
        else:
            spent = time.process_time() - self._start
            self.seconds += spent
            self.total += spent


def bench_one(
    num_instances: int,
    waiting: int = 512,
    calls: int = 300,
    seed: int = 0,
    config: ESPSchedulerConfig | None = None,
    defer_gc: bool = True,
) -> dict:
    """`defer_gc`: automatic collection paused inside each call, as the controller does
    around deciding and dispatching a plan (gc_deferral.py); the collection that was due
    runs right after the call (counted in `gc_all_ms_per_call`, not in the call)."""
    # start from a clean heap: the previous scenario's garbage (thousands of request
    # states when runs go 8 -> 64 -> 256 in one process) is not this one's collection
    gc.collect()
    cost = CostModel.default_a800()
    sched = ESPScheduler(ClusterSpec(num_instances, 210_000), cost, config or ESPSchedulerConfig())
    clock = CostModelClock(sched, cost, waiting, seed)
    c0, w0 = time.process_time(), time.perf_counter()
    plan = sched.schedule(0.0)  # the cold call
    cold_cpu, cold_wall = time.process_time() - c0, time.perf_counter() - w0
    clock.push(plan)
    cpu_times, wall_times, ratios, gc_times = [], [], [], []
    gc_timer = _GCTimer()
    gc.callbacks.append(gc_timer)
    try:
        for _ in range(calls):
            if clock.complete_next() is None:
                break
            running_steps = list(clock.decode_steps.values())  # decode batches running now
            gc_timer.seconds = 0.0
            # read before the block ends: a deferred collection runs on leaving it
            with deferred_collections() if defer_gc else contextlib.nullcontext():
                c0, w0 = time.process_time(), time.perf_counter()
                plan = sched.schedule(clock.now)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                gc_in_call = gc_timer.seconds
            cpu_times.append(cpu)
            wall_times.append(wall)
            gc_times.append(gc_in_call)
            clock.push(plan)  # records the planned decode steps
            steps = running_steps + [clock.decode_steps[b.batch_id] for b in plan.decodes]
            if steps:
                ratios.append(cpu / min(steps))
    finally:
        gc.callbacks.remove(gc_timer)
    row = _summary(num_instances, cold_cpu, cold_wall, cpu_times, wall_times, gc_times, ratios, sched)
    row["gc_all_ms_per_call"] = 1e3 * gc_timer.total / max(len(cpu_times), 1)
    return row


def _summary(num_instances, cold_cpu, cold_wall, cpu_times, wall_times, gc_times, ratios, sched) -> dict:
    cpu_ms, wall_ms = 1e3 * np.asarray(cpu_times), 1e3 * np.asarray(wall_times)
    nan = float("nan")
    return {
        "instances": num_instances,
        "cold_cpu_ms": 1e3 * cold_cpu,
        "cold_wall_ms": 1e3 * cold_wall,
        "calls": len(cpu_times),
        "mean_cpu_ms": float(cpu_ms.mean()),
        "p50_cpu_ms": float(np.percentile(cpu_ms, 50)),
        "p99_cpu_ms": float(np.percentile(cpu_ms, 99)),
        "max_cpu_ms": float(cpu_ms.max()),
        "mean_wall_ms": float(wall_ms.mean()),
        "gc_share": float(sum(gc_times) / max(sum(cpu_times), 1e-12)),
        "calls_with_decode": len(ratios),
        "median_ratio_to_decode_step": float(statistics.median(ratios)) if ratios else nan,
        "p99_ratio_to_decode_step": float(np.percentile(ratios, 99)) if ratios else nan,
        "max_ratio_to_decode_step": float(max(ratios)) if ratios else nan,
        "stats": dict(sched.stats),
    }


def _replay(
    num_instances: int,
    calls: int,
    waiting: int,
    seed: int,
    before=None,
    after=None,
    config: ESPSchedulerConfig | None = None,
) -> None:
    """The steady scenario with `before(k, sched, now)` called before each call k and
    `after(k, plan)` after it."""
    cost = CostModel.default_a800()
    sched = ESPScheduler(ClusterSpec(num_instances, 210_000), cost, config or ESPSchedulerConfig())
    clock = CostModelClock(sched, cost, waiting, seed)
    clock.push(sched.schedule(0.0))
    for k in range(calls):
        if clock.complete_next() is None:
            break
        if before is not None:
            before(k, sched, clock.now)
        plan = sched.schedule(clock.now)
        if after is not None:
            after(k, plan)
        clock.push(plan)


def bench_largest_rounds(
    num_instances: int,
    rounds: int = 8,
    repeats: int = 15,
    waiting: int = 512,
    calls: int = 300,
    seed: int = 0,
    config: ESPSchedulerConfig | None = None,
) -> dict:
    """The steady calls that plan the most prefill requests (the slow tail), each run
    `repeats` times from a pickled copy of the scheduler taken just before it, min CPU
    time, collection off. The same calls for any code that plans the same (equal
    digests), and the min filters out other jobs on a shared machine: a before/after
    measure steadier than the p99 of one run."""
    sizes: dict[int, int] = {}

    def count(k: int, plan: IterationPlan) -> None:
        sizes[k] = sum(len(b.items) for b in plan.prefills)

    _replay(num_instances, calls, waiting, seed, after=count, config=config)
    chosen = set(sorted(sizes, key=lambda k: (-sizes[k], k))[:rounds])
    best: dict[int, float] = {}

    def measure(k: int, sched: ESPScheduler, now: float) -> None:
        if k not in chosen:
            return
        blob, times = pickle.dumps(sched), []
        for _ in range(repeats):
            copy = pickle.loads(blob)
            c0 = time.process_time()
            copy.schedule(now)
            times.append(time.process_time() - c0)
        best[k] = min(times)

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _replay(num_instances, max(chosen) + 1, waiting, seed, before=measure, config=config)
    finally:
        if was_enabled:
            gc.enable()
    return {
        "instances": num_instances,
        "requests_per_round": [sizes[k] for k in sorted(chosen)],
        "min_ms_per_round": [1e3 * best[k] for k in sorted(chosen)],
        "sum_min_ms": 1e3 * sum(best.values()),
    }


DIGEST_POLICIES = {
    "esp": ESPSchedulerConfig(),
    "esp-chunked": ESPSchedulerConfig(chunked_prefill=True),
    "esp-chunked4k": ESPSchedulerConfig(chunked_prefill=True, chunk_tokens=4096, long_request_max_wait_s=0.5),
    "loongserve": ESPSchedulerConfig.loongserve("mixed"),
}


def plan_digest(num_instances: int, config: ESPSchedulerConfig, waiting: int = 512, calls: int = 400) -> str:
    """A hash of every plan, every event and the final counters of the benchmark's
    scenario (no timing): equal digests before and after a change mean it changed no
    decision on this workload."""
    h = hashlib.sha256()
    cost = CostModel.default_a800()
    sched = ESPScheduler(ClusterSpec(num_instances, 210_000), cost, config)
    clock = CostModelClock(sched, cost, waiting, seed=0)
    plan = sched.schedule(0.0)
    h.update(repr(plan).encode())
    clock.push(plan)
    for _ in range(calls):
        events = clock.complete_next()
        if events is None:
            break
        h.update(repr(events).encode())
        plan = sched.schedule(clock.now)
        h.update(repr(plan).encode())
        clock.push(plan)
    h.update(repr(sorted(sched.stats.items())).encode())
    return h.hexdigest()[:16]


def print_digests(instances: list[int]) -> None:
    digests = {}
    for name, config in DIGEST_POLICIES.items():
        for n in instances:
            digests[f"{name}@{n}"] = plan_digest(n, config)
            print(f"{name}@{n} {digests[f'{name}@{n}']}", flush=True)
    print("ALL", hashlib.sha256(repr(sorted(digests.items())).encode()).hexdigest()[:16])


NOTES_MARKER = "<!-- notes: kept when the file is regenerated -->"

# the original's C++ batching DP on these machines (facts file): requests x instances -> ms
ORIGINAL_DP_MS = {(64, 8): 0.25, (128, 32): 4.1, (512, 8): 16.6, (512, 64): 147.0, (512, 256): 418.0}


def bench_dp(repeats: int = 5, seed: int = 0) -> list[dict]:
    """`plan_batches` alone on the facts file's cases (random 100-20K tokens, 210K slots
    per instance), min CPU time of `repeats`, next to the original's C++ DP."""
    cost = CostModel.default_a800()
    rng = np.random.default_rng(seed)
    rows = []
    for (n, k), orig in ORIGINAL_DP_MS.items():
        lengths = rng.integers(100, 20_001, n)
        free = np.full(k, 210_000)
        coeffs = cost.prefill_coeff_arrays(k)
        best = float("inf")
        for _ in range(repeats):
            c0 = time.process_time()
            plan_batches(lengths, free, coeffs)
            best = min(best, time.process_time() - c0)
        rows.append({"requests": n, "instances": k, "ours_ms": 1e3 * best, "original_ms": orig})
    return rows


def _table(rows: list[dict], dp_rows: list[dict]) -> str:
    header = (
        "| instances | cold call (ms) | steady mean | p50 | p99 | max | wall mean | GC share | "
        "all GC per call | median / decode step | p99 / decode step | max / decode step |"
    )
    lines = [header, "|" + " --- |" * 12]
    for r in rows:
        lines.append(
            f"| {r['instances']} | {r['cold_cpu_ms']:.2f} | {r['mean_cpu_ms']:.2f} | "
            f"{r['p50_cpu_ms']:.2f} | {r['p99_cpu_ms']:.2f} | {r['max_cpu_ms']:.2f} | "
            f"{r['mean_wall_ms']:.2f} | {100 * r['gc_share']:.0f}% | {r['gc_all_ms_per_call']:.2f} | "
            f"{100 * r['median_ratio_to_decode_step']:.1f}% | "
            f"{100 * r['p99_ratio_to_decode_step']:.1f}% | "
            f"{100 * r['max_ratio_to_decode_step']:.1f}% |"
        )
    lines += [
        "",
        "Batching DP alone (`plan_batches` with the scheduler's defaults: at most "
        "min(64, 4K) request groups, instances exact), min of 5, vs the original's C++ DP "
        "(facts file). Not the same algorithm: the original is exact up to its pruning "
        "heuristic; ours bounds the request groups and the groups one batch spans, which "
        "against the exhaustive DP loses 0% on the random cases of "
        "tests/sched/test_batching.py and <0.5% at 64 x 8, 128 x 32 and 512 x 64; at "
        "512 x 256, 0.2% against the best plan found offline (every request its own group, "
        "a batch up to 16 requests). 512 x 8 does not fit (5.1M tokens, 1.7M slots): "
        "answered from the totals.",
        "",
        "| requests x instances | ours (ms) | original C++ (ms) |",
        "| --- | --- | --- |",
    ]
    for r in dp_rows:
        lines.append(f"| {r['requests']} x {r['instances']} | {r['ours_ms']:.2f} | {r['original_ms']:.2f} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    cpu = platform.processor() or platform.machine()
    cpu += f", {os.cpu_count()} cores"
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            cpu = f"{names[0]}, {len(names)} cores"
    except OSError:
        pass
    return cpu


def _verdicts(rows: list[dict]) -> tuple[str, str]:
    """The 64-instance target (<= 10 ms per call) and the < 5%-of-a-decode-step goal."""
    r64 = next((r for r in rows if r["instances"] == 64), None)
    if r64 is None:
        verdict = "not measured"
    else:
        if r64["p99_cpu_ms"] <= 10:
            met = "met"
        elif r64["mean_cpu_ms"] <= 10:
            met = "met on average, p99 over"
        else:
            met = "missed"
        verdict = f"mean {r64['mean_cpu_ms']:.1f} ms, p99 {r64['p99_cpu_ms']:.1f} ms -- {met}"
    goal = ", ".join(
        f"{r['instances']}: {'met' if r['p99_ratio_to_decode_step'] <= 0.05 else 'not met'} "
        f"(p99 {100 * r['p99_ratio_to_decode_step']:.1f}%, max "
        f"{100 * r['max_ratio_to_decode_step']:.1f}%)"
        for r in rows
    )
    return verdict, goal


def _write_doc(args: argparse.Namespace, rows: list[dict], table: str) -> None:
    cpu = _cpu_name()
    verdict, goal = _verdicts(rows)
    meta = f"""# Scheduler decision time

Measured {date.today().isoformat()} on the shared development VM ({cpu}, no GPU,
Python {platform.python_version()}, numpy {np.__version__}) with
`python -m esp_core.sched.bench --out {args.out}{"" if args.gc == "server" else " --gc default"}{"".join(f" --set {x}" for x in args.set)}`. Times are **process CPU time** of one
`ESPScheduler.schedule()` call (the VM is shared by several jobs, so wall time -- also
shown -- is noisy), garbage collections that run inside a call included (*GC share*:
their part of the total; a collection is triggered by whichever allocation crosses the
threshold, here often the benchmark's own new requests). GC setting: {"the controller process, app/gc_tuning.py: heap alive at startup frozen, default thresholds, automatic collection paused inside each call (the collection that was due runs right after it: *all GC per call*, ms, counts every collection of the run)" if args.gc == "server" else "Python's defaults, nothing frozen, nothing paused"}.

Scenario: N instances with 210K KV slots each (the paper's capacity), the shipped
A800 / Llama-2-7B cost profile, policy `esp` with default config, a backlog kept at
{args.waiting} waiting requests (prompts log-uniform 100-20K tokens, outputs 16-256).
*cold*: the first call (all instances idle, the big prefill round). *steady*: {args.calls}
calls driven by a cost-model clock (batches finish after their estimated time).
*/ decode step*: the call's CPU time over the shortest decode step it can delay: the
cost-model time of the shortest step among the decode batches running when the call
is made and those it plans (calls with neither -- no decode anywhere -- have no
ratio). The shortest step of the model is ~12.5 ms (one request, little KV), so 5% is
about 0.6 ms.
Target <= 10 ms per call at 64 instances: {verdict}.
Target every call under 5% of a decode step (p99 as the measure, max shown): {goal}.

"""
    notes = ""
    try:
        with open(args.out) as fh:
            old = fh.read()
        if NOTES_MARKER in old:  # hand-written notes below the marker are kept
            notes = old[old.index(NOTES_MARKER) :]
    except OSError:
        pass
    with open(args.out, "w") as fh:
        fh.write(meta + table + "\n" + ("\n" + notes if notes else ""))


def _overrides(items: list[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings -> keyword arguments; values are Python literals (numbers,
    True/False, None), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[name.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[name.strip()] = raw
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--instances", default="8,64,256")
    p.add_argument("--waiting", type=int, default=512)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--out", help="write a markdown table here")
    p.add_argument(
        "--gc",
        choices=("server", "default"),
        default="server",
        help="server (default): the controller's setting, app/gc_tuning.py -- "
        "the heap alive at startup frozen, default thresholds, automatic collection "
        "paused inside each call; default: Python's defaults, nothing frozen or paused",
    )
    p.add_argument(
        "--digest",
        action="store_true",
        help="print plan digests of the scenario per policy and instance count (no timing): "
        "a change that keeps them equal changed no decision on this workload",
    )
    p.add_argument(
        "--largest-rounds",
        action="store_true",
        help="min-of-15 CPU time of the 8 calls planning the most prefill requests, "
        "replayed from pickled schedulers (a before/after measure for shared machines)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="time a scheduler config with this ESPSchedulerConfig field changed (repeatable; "
        "e.g. max_prefill_requests=16); --digest always hashes its fixed policies",
    )
    args = p.parse_args(argv)
    instances = [int(n) for n in args.instances.split(",")]
    config = ESPSchedulerConfig(**_overrides(args.set))
    if args.digest:
        print_digests(instances)
        return 0
    if args.largest_rounds:
        for n in instances:
            r = bench_largest_rounds(n, waiting=args.waiting, calls=args.calls, config=config)
            ms = ", ".join(f"{t:.2f}" for t in r["min_ms_per_round"])
            print(f"{n} instances: sum {r['sum_min_ms']:.2f} ms; requests {r['requests_per_round']}; ms {ms}")
        return 0
    if args.gc == "server":  # what app/gc_tuning.freeze_startup_heap does (no app import)
        gc.collect()
        gc.freeze()
    rows = [
        bench_one(n, args.waiting, args.calls, config=config, defer_gc=args.gc == "server") for n in instances
    ]
    table = _table(rows, bench_dp())
    print(table)
    for r in rows:
        print(f"{r['instances']} instances: {r['calls']} calls, stats {r['stats']}")
    if args.out:
        _write_doc(args, rows, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
