"""Command line of the simulator.

    python -m esp_core.sim run   --workload sharegpt --policy vllm --rate 5 --num-requests 200
    python -m esp_core.sim sweep --workload mixed --policy esp --num-requests 100 \
        --json out.json --plot out.png
    python -m esp_core.sim plot a.json b.json --out fig.png
    python -m esp_core.sim trace --workload l-eval --rate 1 --num-requests 100 --out t.jsonl

`run` prints a summary and writes `--json` (summary, stats, per-request records);
`sweep` finds the max throughput at the workload's SLO (see sweep.py) and writes the
sweep JSON (`max_throughput_req_s`, `points`, ...). Same arguments and seed -> same
JSON (wall-clock numbers go to stderr only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from esp_core.sim.metrics import SLO, SLO_PRESETS
from esp_core.sim.policies import POLICIES, LayoutConfig, build_scheduler, cluster_for
from esp_core.sim.prefix_workloads import (
    DEFAULT_BLOCK_TOKENS,
    MOONCAKE_BLOCK_TOKENS,
    PREFIX_WORKLOADS,
    generate_prefix_workload,
    is_mooncake_trace,
    read_mooncake_trace,
)
from esp_core.sim.sweep import duration_source, prescan_start_rate, run_once, sweep
from esp_core.sim.workloads import WORKLOADS, RequestSpec, generate, read_trace, with_rate, write_trace

DEFAULT_PROFILE = "a800-llama2-7b"

# First rate of an automatic sweep: about a third of the paper's LoongServe max throughput.
START_RATES = {
    "sharegpt": 8.0,
    "l-eval": 0.6,
    "lv-eval": 0.05,
    "mixed": 0.15,
    "zipf-1.0": 0.3,
    "zipf-1.2": 0.8,
    "zipf-1.4": 2.0,
    "docqa": 0.6,
    "multiturn": 4.0,
}
# `--workload` choices: the paper's datasets and the shared-prefix ones (prefix_workloads.py:
# docqa = 4 questions per L-Eval-length document, multiturn = 4-turn ShareGPT-like chats)
ALL_WORKLOADS = WORKLOADS + PREFIX_WORKLOADS

# `sweep`'s defaults: each dataset's paper protocol (the artifact's windows). Each rate runs
# ~rate x duration_s seconds of Poisson arrivals (at least num_requests, at most
# max_requests). ShareGPT's 92 ms/token SLO is crossed only in overload, where the mean
# latency grows with the window, so its window must be the artifact's; a cheap prescan with
# short windows finds where the policy stops keeping up and the long search starts below it.
# `--quick` replaces all of this with a fixed count of --num-requests per rate.
PAPER_PROTOCOL: dict[str, dict[str, float]] = {
    "sharegpt": dict(
        duration=1000, max_requests=20_000, prescan_duration=100, num_requests=200, growth=1.12, refine=1
    ),
    "default": dict(duration=1000, max_requests=20_000, num_requests=50, growth=1.6, refine=2),
}
QUICK = dict(num_requests=200, growth=1.6, refine=2, max_requests=20_000)


def _load_cost_model(profile: str):
    from esp_core.sched.cost_model import CostModel

    return CostModel.from_profile(profile)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=ALL_WORKLOADS, default="sharegpt")
    p.add_argument("--policy", choices=POLICIES, default="esp")
    p.add_argument(
        "--block-tokens",
        type=int,
        help=f"prefix-cache block (tokens per block hash): default {MOONCAKE_BLOCK_TOKENS} for a "
        f"Mooncake trace, else {DEFAULT_BLOCK_TOKENS}",
    )
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the group (default 8)")
    p.add_argument("--instances", type=int, help="instances (default: the policy's layout)")
    p.add_argument("--tp", type=int, help="TP degree per instance (default: the policy's)")
    p.add_argument("--kv-tokens-per-gpu", type=int, default=105_000)
    p.add_argument("--sp", type=int, help="static-sp ring size (default: all instances)")
    p.add_argument(
        "--chunk-size",
        type=int,
        help="chunked-prefill chunk (chunked-prefill; esp: the scheduler's chunk_tokens)",
    )
    p.add_argument(
        "--esp-chunked",
        choices=("on", "off"),
        help="ESP scheduler's chunked prefill (default: on for esp, off for loongserve)",
    )
    p.add_argument(
        "--esp-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="esp/loongserve: override an ESPSchedulerConfig field (repeatable; "
        "ablations), e.g. short_reserved_instances=0",
    )
    p.add_argument(
        "--num-requests", type=int, help="requests (run, short-long: default 200; sweep: see --quick)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile", default=DEFAULT_PROFILE, help="cost profile: a path or a name in esp_core/profiles"
    )
    p.add_argument(
        "--trace",
        help="JSONL trace: ours (arrival_s, prompt_tokens, output_tokens[, block_hashes]) or "
        "Mooncake's (timestamp, input_length, output_length, hash_ids)",
    )
    p.add_argument("--burst-cv", type=float, help="bursty (gamma) arrivals with this CV")
    p.add_argument("--slo", help="override SLO: per_token,input,output in ms")
    p.add_argument("--json", dest="json_out", help="write results as JSON here")
    p.add_argument("--no-validate", action="store_true", help="skip plan validation (faster)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m esp_core.sim", description="ESP cluster simulator")
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="simulate one request rate")
    _add_common(run)
    run.add_argument(
        "--rate", type=float, help="req/s (default: the trace's own timing, else the workload's start rate)"
    )
    run.add_argument("--records", action="store_true", help="include per-request records")
    sw = sub.add_parser("sweep", help="sweep rates, find the max throughput at the SLO")
    _add_common(sw)
    sw.add_argument("--rates", help="comma-separated rates (default: automatic search)")
    sw.add_argument("--rate", type=float, help="first rate of the automatic search")
    sw.add_argument(
        "--quick",
        action="store_true",
        help="a fixed --num-requests (default 200) per rate instead of the dataset's paper protocol",
    )
    sw.add_argument("--growth", type=float, help="rate growth per search step (protocol default)")
    sw.add_argument("--max-points", type=int, default=10)
    sw.add_argument("--refine", type=int, help="bisection steps after the crossing (protocol default)")
    sw.add_argument(
        "--duration",
        type=float,
        help="~rate x DURATION requests per rate (at least --num-requests, at most "
        "--max-requests); default: the paper protocol's 1000 s",
    )
    sw.add_argument("--max-requests", type=int)
    sw.add_argument(
        "--prescan-duration",
        type=float,
        help="first sweep with windows of this many seconds (cheap) and start "
        "the --duration sweep just below its stable rate (see sweep.py); ShareGPT's default: 100",
    )
    sw.add_argument("--plot", help="write a Figure-10-style PNG here")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    sl = sub.add_parser("short-long", help="short requests' TTFT with vs without 5%% long ones")
    _add_common(sl)
    sl.add_argument("--rate", type=float, default=1.0)
    sl.add_argument("--long-frac", type=float, default=0.05)
    pl = sub.add_parser("plot", help="plot sweep JSONs together")
    pl.add_argument("inputs", nargs="+")
    pl.add_argument("--out", required=True)
    pl.add_argument("--title")
    tb = sub.add_parser("table", help="markdown tables of sweep JSONs vs the paper")
    tb.add_argument("inputs", nargs="+")
    tr = sub.add_parser("trace", help="write a synthetic workload as a JSONL trace")
    tr.add_argument("--workload", choices=ALL_WORKLOADS, default="sharegpt")
    tr.add_argument("--block-tokens", type=int, default=DEFAULT_BLOCK_TOKENS)
    tr.add_argument("--rate", type=float, required=True)
    tr.add_argument("--num-requests", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--burst-cv", type=float)
    tr.add_argument("--out", required=True)
    return ap


def _slo(args) -> SLO:
    if args.slo:
        a, b, c = (float(x) for x in args.slo.split(","))
        return SLO(a, b, c)
    return SLO_PRESETS[args.workload]


def _esp_overrides(items) -> tuple[tuple[str, object], ...]:
    """`FIELD=VALUE` strings -> (field, value); values are Python literals (numbers,
    True/False, None), else strings."""
    import ast

    out = []
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--esp-set expects FIELD=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.append((name.strip(), value))
    return tuple(out)


def _layout(args) -> LayoutConfig:
    return LayoutConfig(
        gpus=args.gpus,
        instances=args.instances,
        tp=args.tp,
        kv_tokens_per_gpu=args.kv_tokens_per_gpu,
        sp=args.sp,
        chunk_size=args.chunk_size,
        esp_overrides=_esp_overrides(getattr(args, "esp_set", [])),
        block_tokens=_block_tokens(args),
    )


def _block_tokens(args) -> int:
    if args.block_tokens:
        return args.block_tokens
    if getattr(args, "trace", None) and is_mooncake_trace(args.trace):
        return MOONCAKE_BLOCK_TOKENS
    return DEFAULT_BLOCK_TOKENS


def _load_trace(args) -> list[RequestSpec]:
    if is_mooncake_trace(args.trace):
        return read_mooncake_trace(args.trace, block_tokens=_block_tokens(args))
    return read_trace(args.trace)


def _generate(args, count: int, rate: float) -> list[RequestSpec]:
    """`count` requests of `args.workload` at `rate` (shared-prefix workloads with their
    default settings and `--block-tokens`)."""
    if args.workload not in PREFIX_WORKLOADS:
        return generate(args.workload, count, rate, args.seed, args.burst_cv)
    if args.burst_cv:
        raise SystemExit(f"--burst-cv is not supported for {args.workload}")
    return generate_prefix_workload(args.workload, count, rate, args.seed, _block_tokens(args))


def _factory(args, cost_model):
    layout = _layout(args)
    cluster = cluster_for(args.policy, layout)
    chunked = None if args.esp_chunked is None else args.esp_chunked == "on"

    def make():
        return build_scheduler(args.policy, cluster, cost_model, args.workload, layout, chunked)

    config = {
        "policy": args.policy,
        "workload": args.workload,
        "instances": cluster.num_instances,
        "tp": cluster.tp_per_instance,
        "kv_slots_per_instance": cluster.kv_slots_per_instance,
        "profile": args.profile,
        "trace": args.trace,
        "burst_cv": args.burst_cv,
    }
    if args.policy == "static-sp":
        config["sp"] = args.sp or cluster.num_instances
    if args.policy == "vllm-apc" or args.workload in PREFIX_WORKLOADS:
        config["block_tokens"] = layout.block_tokens
    if args.policy == "chunked-prefill":
        from esp_core.sim.baselines import chunk_size_for

        config["chunk_size"] = args.chunk_size or chunk_size_for(args.workload)
    if args.policy in ("esp", "loongserve"):
        config["esp_chunked"] = args.esp_chunked
        if layout.esp_overrides:
            config["esp_overrides"] = dict(layout.esp_overrides)
    return make, config


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def apply_sweep_protocol(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the sweep arguments left unset from the dataset's paper protocol (or --quick)."""
    if args.quick:
        defaults: dict[str, float | None] = dict(QUICK, duration=None, prescan_duration=None)
    elif args.trace:  # a trace has its own timing: only the search settings apply
        defaults = dict(QUICK)
    else:
        defaults = dict(PAPER_PROTOCOL.get(args.workload, PAPER_PROTOCOL["default"]))
        defaults.setdefault("prescan_duration", None)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("num_requests", "max_requests", "refine"):
        if getattr(args, key) is not None:
            setattr(args, key, int(getattr(args, key)))
    return args


def cmd_run(args) -> int:
    args.num_requests = args.num_requests or 200
    cost_model = _load_cost_model(args.profile)
    make, config = _factory(args, cost_model)
    if args.trace:
        requests = _load_trace(args)
        rate = args.rate
        if rate is not None:
            requests = with_rate(requests, rate, args.seed)
    else:
        rate = args.rate or START_RATES[args.workload]
        requests = _generate(args, args.num_requests, rate)
    t0 = time.perf_counter()
    out = run_once(make, cost_model, requests, _slo(args), rate, validate=not args.no_validate)
    wall = time.perf_counter() - t0
    point = out.point()
    print(
        f"{args.policy} on {args.workload}: {len(requests)} requests"
        + (f" at {rate:g} req/s" if rate else "")
        + f"; per-token {point['per_token_latency_ms']:.3g} ms, input "
        f"{point['input_latency_ms']:.3g} ms, output {point['output_latency_ms']:.3g} ms, "
        f"TTFT p99 {point['ttft_p99_ms']:.4g} ms, TPOT p99 {point['tpot_p99_ms']:.3g} ms, "
        f"SLO attainment {point['slo_attainment']:.2f}, goodput "
        f"{point['goodput_req_s']:.3g} req/s, sustained {point['sustained_req_s']:.3g} "
        f"req/s, rejected {point['rejected']}, prefix hit rate {point['prefix_hit_rate']:.3f}"
    )
    print(
        f"simulated {out.result.end_s:.1f} s in {wall:.1f} s wall, scheduler "
        f"{1e3 * out.result.scheduler_wall_s / max(1, out.result.schedule_calls):.3f} ms/call",
        file=sys.stderr,
    )
    data = {
        "config": config,
        "summary": out.summary.to_dict(),
        "point": point,
        "stats": out.result.stats.to_dict(),
    }
    if args.records:
        data["requests"] = [r.to_dict() for r in out.result.records]
    _write_json(args.json_out, data)
    return 0


def cmd_sweep(args) -> int:
    apply_sweep_protocol(args)
    cost_model = _load_cost_model(args.profile)
    make, config = _factory(args, cost_model)
    count = args.max_requests if args.duration else args.num_requests
    if args.trace:
        requests = _load_trace(args)
    else:
        requests = _generate(args, count, 1.0)
    source = requests
    if args.duration:
        source = duration_source(requests, args.duration, args.num_requests, args.seed)
        config["duration_s"] = args.duration
    rates = [float(x) for x in args.rates.split(",")] if args.rates else None
    t0 = time.perf_counter()
    start = args.rate or START_RATES[args.workload]
    validate = not args.no_validate
    if args.prescan_duration and not rates:
        if not args.duration:
            raise SystemExit("--prescan-duration needs --duration")
        pre = sweep(
            make,
            cost_model,
            duration_source(requests, args.prescan_duration, args.num_requests, args.seed),
            _slo(args),
            policy=args.policy,
            workload=args.workload,
            seed=args.seed,
            start_rate=start,
            progress=not args.quiet,
            validate=validate,
        )
        start = prescan_start_rate(pre, start)
        config["prescan"] = {
            "duration_s": args.prescan_duration,
            "stable_req_s": pre.max_throughput_stable(),
            "max_throughput_req_s": pre.max_throughput(),
            "start_rate": start,
        }
    res = sweep(
        make,
        cost_model,
        source,
        _slo(args),
        policy=args.policy,
        workload=args.workload,
        seed=args.seed,
        rates=rates,
        start_rate=start,
        growth=args.growth,
        max_points=args.max_points,
        refine=args.refine,
        progress=not args.quiet,
        config=config,
        validate=validate,
    )
    data = res.to_json()
    mt, ms = data["max_throughput_req_s"], data["max_throughput_stable_req_s"]
    print(
        f"{args.policy} on {args.workload}: max throughput "
        + (f"{mt:.4g} req/s" if mt is not None else "n/a")
        + (f" (stable: {ms:.4g})" if ms is not None else "")
        + (f" -- {data['note']}" if data["note"] else "")
    )
    for p in data["points"]:
        print(
            f"  rate {p['rate']:8.4g}  n {p['num_requests']:6d}  "
            f"per-token {p['per_token_latency_ms']:9.4g} ms  "
            f"input {p['input_latency_ms']:9.4g}  output {p['output_latency_ms']:8.4g}  "
            f"goodput {p['goodput_req_s']:.3g}  sustained {p['sustained_req_s']:.3g}  "
            f"drain {p['drain_ratio']:.3g}  hit {p['prefix_hit_rate']:.3f}"
        )
    print(f"sweep took {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    _write_json(args.json_out, data)
    if args.plot:
        from esp_core.sim.plots import plot_sweeps

        plot_sweeps([data], args.plot)
    return 0


def cmd_short_long(args) -> int:
    args.num_requests = args.num_requests or 200
    from esp_core.sim.experiments import run_short_long

    cost_model = _load_cost_model(args.profile)
    make, config = _factory(args, cost_model)
    t0 = time.perf_counter()
    res = run_short_long(
        make,
        cost_model,
        policy=args.policy,
        n=args.num_requests,
        rate=args.rate,
        long_frac=args.long_frac,
        seed=args.seed,
    )
    d = res.to_json()
    d["config"] = config
    print(
        f"{args.policy}: {res.num_requests} requests at {args.rate:g} req/s, "
        f"{res.num_long} long; short-request TTFT p50 {d['short_ttft_ms_with_long']['p50']:.4g}"
        f" ms (alone {d['short_ttft_ms_alone']['p50']:.4g}), p99 "
        f"{d['short_ttft_ms_with_long']['p99']:.4g} ms (alone "
        f"{d['short_ttft_ms_alone']['p99']:.4g}): p50 x{res.p50_ratio:.2f}, "
        f"p99 x{res.p99_ratio:.2f}"
    )
    print(f"took {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
    _write_json(args.json_out, d)
    return 0


def cmd_plot(args) -> int:
    from esp_core.sim.plots import plot_sweeps

    sweeps = [json.loads(Path(p).read_text()) for p in args.inputs]
    plot_sweeps(sweeps, args.out, args.title)
    return 0


def cmd_table(args) -> int:
    from esp_core.sim.paper import comparison_table, esp_vs_loongserve, load_sweeps

    sweeps = load_sweeps(args.inputs)
    print(comparison_table(sweeps, ("loongserve", "vllm", "chunked-prefill", "pd-disagg", "static-sp")))
    print()
    print(esp_vs_loongserve(sweeps))
    return 0


def cmd_trace(args) -> int:
    write_trace(args.out, _generate(args, args.num_requests, args.rate))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "run": cmd_run,
        "sweep": cmd_sweep,
        "short-long": cmd_short_long,
        "plot": cmd_plot,
        "table": cmd_table,
        "trace": cmd_trace,
    }
    return commands[args.cmd](args)
