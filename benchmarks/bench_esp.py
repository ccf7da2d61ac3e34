"""CPU benchmark of ESP execution on the built-in model: ring prefill of one long prompt
at P = 1, 2 and decode step latency at P = 1, 2 with long requests' KV spread over both.

    PYTHONPATH=. python benchmarks/bench_esp.py [--prompt 16384] [--decode-context 16384]

Two processes, one torch thread each, joined by gloo on 127.0.0.1 (tests/support/dist.py: DistGroup),
in the same run. P = 1 runs the same ring code on a ring of one instance (no transfers),
so the speed-up isolates what the second instance buys. For each rank the script reports
wall time, process CPU time, and the time blocked waiting for transfers (`CommStats.wait_s`:
communication not hidden behind compute). Results are printed as a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tests.support.dist import DistGroup


def _setup(ctx, kv_slots: int, tile: int) -> None:
    from esp_core.runtime import ring_attention
    from esp_core.runtime.comm import P2PComm
    from esp_core.runtime.config import WorkerConfig
    from esp_core.runtime.worker import InstanceWorker

    ring_attention.DEFAULT_TILE = tile
    if "worker" not in ctx.state:
        w = InstanceWorker(WorkerConfig(kv_slots=kv_slots, num_threads=1), ctx.rank, ctx.world_size)
        w.comm = P2PComm.from_world(timeout_s=ctx.timeout_s)
        ctx.state["worker"] = w


def _reset(w) -> None:
    for rid in w.pool.requests():
        w.pool.free(rid)
    w.states.clear()
    w.comm.stats.reset()


def _prefill(ctx, P: int, length: int):
    from esp_core.runtime.esp_prefill import prefill_esp
    from esp_core.runtime.request_state import RequestState
    from esp_core.sched.plan import NewRequest, SamplingParams
    from tests.support.esp import even_keep, prefill_batch, prefill_item

    w = ctx.state["worker"]
    _reset(w)
    if ctx.rank >= P:
        return None
    g = torch.Generator().manual_seed(1)
    prompt = (256, *torch.randint(0, 256, (length - 1,), generator=g).tolist())
    w.states["p"] = RequestState.from_new(NewRequest("p", prompt, SamplingParams(temperature=0.0)))
    ring = tuple(range(P))
    batch = prefill_batch(ring, [prefill_item("p", 0, length, 0, even_keep(0, length, ring))])
    t0, c0 = time.perf_counter(), time.process_time()
    sampled = prefill_esp(w.model, w.pool, w.states, batch, ctx.rank, w.comm)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = w.comm.stats
    out = dict(
        wall_s=wall,
        cpu_s=cpu,
        comm_wait_s=stats.wait_s,
        bytes_sent=stats.bytes_sent,
        kept=w.pool.num_tokens_of("p"),
        sampled=[s.token_id for s in sampled],
    )
    _reset(w)
    return out


def _decode(ctx, P: int, num_requests: int, context: int, steps: int, local_path: bool):
    """Fill KV of `num_requests` requests of `context` tokens split evenly over P
    instances (random K/V: only timing matters), then time `steps` decode steps with
    masters spread round-robin and each new token stored on its master."""
    from esp_core.runtime.esp_decode import decode_esp
    from esp_core.runtime.local_exec import decode_local
    from esp_core.runtime.request_state import RequestState
    from esp_core.sched.plan import DecodeBatch, DecodeItem, NewRequest, SamplingParams

    w = ctx.state["worker"]
    _reset(w)
    if ctx.rank >= P:
        return None
    g = torch.Generator().manual_seed(2)
    rids = [f"d{i}" for i in range(num_requests)]
    for rid in rids:
        prompt = tuple(torch.randint(0, 256, (context,), generator=g).tolist())
        w.states[rid] = RequestState.from_new(NewRequest(rid, prompt, SamplingParams(temperature=0.0)))
        lo, hi = context * ctx.rank // P, context * (ctx.rank + 1) // P
        slots = w.pool.allocate(rid, range(lo, hi))
        w.pool.kv[:, slots] = torch.randn(
            w.pool.kv.shape[0], len(slots), *w.pool.kv.shape[2:], generator=g
        ).to(w.pool.kv.dtype)
    times, waits, cpus = [], [], []
    for step in range(steps):
        items = tuple(
            DecodeItem(rid, 65 + step, context + step, i % P, tuple(range(P)), i % P)
            for i, rid in enumerate(rids)
        )
        batch = DecodeBatch(step, tuple(range(P)), items)
        w.comm.stats.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        if local_path:
            decode_local(w.model, w.pool, w.states, batch, ctx.rank)
        else:
            decode_esp(w.model, w.pool, w.states, batch, ctx.rank, w.comm)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        waits.append(w.comm.stats.wait_s)
    _reset(w)
    return dict(step_s=times, cpu_s=cpus, comm_wait_s=waits)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=16384)
    ap.add_argument("--decode-requests", type=int, default=4)
    ap.add_argument("--decode-context", type=int, default=16384)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512, help="ring attention tile edge (tokens)")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    args = ap.parse_args(argv)
    kv_slots = max(args.prompt, args.decode_requests * args.decode_context) + 1024
    report: dict = {"load_avg_before": os.getloadavg(), "args": vars(args)}
    with DistGroup(2, threads_per_rank=1, timeout_s=1200) as group:
        group.run(_setup, kv_slots, args.tile, timeout_s=300)
        for P in () if args.skip_prefill else (1, 2):
            runs = [group.run(_prefill, P, args.prompt, timeout_s=1200) for _ in range(args.repeats)]
            best = min(runs, key=lambda rs: max(r["wall_s"] for r in rs if r))
            report[f"prefill_P{P}"] = [r for r in best if r]
        for P, local in () if args.skip_decode else ((1, True), (1, False), (2, False)):
            res = group.run(
                _decode,
                P,
                args.decode_requests,
                args.decode_context,
                args.decode_steps,
                local,
                timeout_s=1200,
            )
            per_step = [max(r["step_s"][s] for r in res if r) for s in range(args.decode_steps)]
            waits = [max(r["comm_wait_s"][s] for r in res if r) for s in range(args.decode_steps)]
            cpus = [max(r["cpu_s"][s] for r in res if r) for s in range(args.decode_steps)]
            key = f"decode_P{P}" + ("_local" if local else "")
            report[key] = dict(
                median_step_s=statistics.median(per_step[1:]),
                median_cpu_s=statistics.median(cpus[1:]),
                median_comm_wait_s=statistics.median(waits[1:]),
            )
    report["load_avg_after"] = os.getloadavg()
    print("| metric | P=1 | P=2 |\n|---|---|---|")
    if not args.skip_prefill:
        p1 = max(r["wall_s"] for r in report["prefill_P1"])
        p2 = max(r["wall_s"] for r in report["prefill_P2"])
        c1 = max(r["cpu_s"] for r in report["prefill_P1"])
        c2 = max(r["cpu_s"] for r in report["prefill_P2"])
        comm_share = max(r["comm_wait_s"] / r["wall_s"] for r in report["prefill_P2"])
        report["summary"] = dict(
            prefill_speedup_wall=p1 / p2, prefill_speedup_cpu=c1 / c2, prefill_comm_share_P2=comm_share
        )
        print(f"| prefill {args.prompt} tokens, wall s (slowest rank) | {p1:.2f} | {p2:.2f} |")
        print(f"| prefill, process CPU s (slowest rank) | {c1:.2f} | {c2:.2f} |")
        print(f"| prefill, time blocked on transfers | - | {comm_share:.1%} |")
        print(f"| prefill speed-up, wall / CPU time | - | {p1 / p2:.2f}x / {c1 / c2:.2f}x |")
    if not args.skip_decode:
        d = {k: report[k] for k in ("decode_P1_local", "decode_P1", "decode_P2")}
        ctx = f"{args.decode_requests} x {args.decode_context}"
        print(
            f"| decode step ({ctx} KV), wall ms: P=1 local path / ring-of-one | "
            f"{d['decode_P1_local']['median_step_s'] * 1e3:.1f} / "
            f"{d['decode_P1']['median_step_s'] * 1e3:.1f} | "
            f"{d['decode_P2']['median_step_s'] * 1e3:.1f} |"
        )
        print(
            f"| decode step, process CPU ms (slowest rank) | "
            f"{d['decode_P1_local']['median_cpu_s'] * 1e3:.1f} / "
            f"{d['decode_P1']['median_cpu_s'] * 1e3:.1f} | "
            f"{d['decode_P2']['median_cpu_s'] * 1e3:.1f} |"
        )
        print(
            f"| decode, time blocked on transfers, ms | - | "
            f"{d['decode_P2']['median_comm_wait_s'] * 1e3:.1f} |"
        )
    print(f"load average before {report['load_avg_before']}, after {report['load_avg_after']}")
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
