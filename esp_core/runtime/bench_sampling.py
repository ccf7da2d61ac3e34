"""Sampling benchmark: ms per `sample()` call for a batch of rows, by sampling setting.

    python -m esp_core.runtime.bench_sampling [--vocab 49152] [--batch 32]
        [--compare OTHER_SAMPLING.py]

`--compare` times another implementation of the same API (a copy of
esp_core/runtime/sampling.py from another commit, e.g. `git show REV:esp_core/runtime/
sampling.py > /tmp/old.py`) in the same process, alternating, so the two columns share
the machine's state. Logits are random normal x 3 (a peaked, LM-like row); one torch
thread; the min over repeats of each call's wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from types import ModuleType

import torch

from esp_core.runtime import sampling
from esp_core.sched.plan import SamplingParams

CASES = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8, "seed": 1},
    "temperature 0.8, top_p 0.9": {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    "temperature 0.8, top_k 50": {"temperature": 0.8, "top_k": 50, "seed": 1},
    "temperature 0.8, logprobs 5": {"temperature": 0.8, "logprobs": 5, "seed": 1},
}


def load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("compared_sampling", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def time_call(module: ModuleType, logits: torch.Tensor, params: SamplingParams, repeats: int) -> float:
    """Min wall ms of `module.sample` on every row of `logits` with `params`."""
    rows = [module.SampleRow(f"r{i}", params, (1, 2, 3), (4, 5), 2) for i in range(logits.shape[0])]
    module.sample(logits, rows)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        module.sample(logits, rows)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152, help="default: SmolLM2's vocabulary")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", default=None, help="another sampling.py to time beside this one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logits = 3.0 * torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0))
    other = load(args.compare) if args.compare else None
    print(f"sample() of {args.batch} rows x {args.vocab} tokens, min of {args.repeats}, ms per call")
    print("| setting | this | compared | compared / this |" if other else "| setting | this |")
    print("| --- | --- | --- | --- |" if other else "| --- | --- |")
    for name, fields in CASES.items():
        params = SamplingParams(max_tokens=100, **fields)  # type: ignore[arg-type]
        if other is None:
            print(f"| {name} | {time_call(sampling, logits, params, args.repeats):.2f} |")
            continue
        theirs = time_call(other, logits, params, args.repeats)
        ours = time_call(sampling, logits, params, args.repeats)
        print(f"| {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
