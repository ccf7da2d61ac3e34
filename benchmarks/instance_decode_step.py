"""Host CPU of one instance's decode step, in process: what an `ElasticInstance` pays per
engine step without Ray around it.

    PYTHONPATH=. python benchmarks/instance_decode_step.py [--batch 1,8,32] [--steps 300]
        [--prompt-len 32] [--model builtin | smollm2-135m-instruct | PATH]

For each batch size B: an `InstanceWorker` on the model (fp32, 1 torch thread; the
built-in one by default) prefills B random prompts of `--prompt-len` tokens, then runs
`--steps` greedy decode steps of all B requests (a long prompt: the decode attention
over a long context). Each step's plan is pickled in and its results pickled out, as
`ElasticInstance.execute` does; the process CPU time of unpickle + execute + pickle is
summed over the steps after a warm-up of 20 (`cpu_ms_per_step`), and its median over
those steps (`cpu_ms_median`: on a machine shared with other jobs the mean follows their
load, the median much less). `tokens` is a checksum of the last tokens: two versions of
the code must print the same one.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import time

import torch

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.model_source import resolve_model_path
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import DecodeBatch, DecodeItem, IterationPlan, NewRequest, SamplingParams
from tests.support.runtime import prefill_item, prefill_plan

WARMUP = 20


def run(batch: int, steps: int, prompt_len: int = 32, model: str = "builtin") -> dict[str, float]:
    worker = InstanceWorker(
        WorkerConfig(model=model, kv_slots=prompt_len * batch + batch * (steps + WARMUP) + 64, num_threads=1)
    )
    rng = random.Random(0)
    prompts = {f"r{i}": [rng.randrange(256) for _ in range(prompt_len)] for i in range(batch)}
    params = SamplingParams(max_tokens=steps + WARMUP + 1, temperature=0.0, ignore_eos=True)
    new = [NewRequest(rid, tuple(p), params) for rid, p in prompts.items()]
    (first,) = worker.execute(prefill_plan([prefill_item(rid, 0, prompt_len) for rid in prompts], new))
    last = {s.request_id: s.token_id for s in first.sampled}
    cpu = 0.0
    per_step: list[float] = []
    wall = time.perf_counter()
    for step in range(WARMUP + steps):
        if step == WARMUP:
            cpu, per_step, wall = 0.0, [], time.perf_counter()
        items = tuple(
            DecodeItem(rid, last[rid], prompt_len + step, master=0, holders=(0,), new_kv_instance=0)
            for rid in prompts
        )
        plan = pickle.dumps(IterationPlan(step, decodes=(DecodeBatch(step, (0,), items),)))
        start = time.process_time()
        out = pickle.dumps(worker.execute(pickle.loads(plan)), protocol=pickle.HIGHEST_PROTOCOL)
        per_step.append(time.process_time() - start)
        cpu += per_step[-1]
        for s in pickle.loads(out)[0].sampled:
            last[s.request_id] = s.token_id
    wall = time.perf_counter() - wall
    return {
        "batch": batch,
        "cpu_ms_per_step": 1e3 * cpu / steps,
        "cpu_ms_median": 1e3 * statistics.median(per_step),
        "cpu_ms_per_token": 1e3 * cpu / steps / batch,
        "wall_ms_per_step": 1e3 * wall / steps,
        "tokens": sum(last.values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--model", default="builtin", help='"builtin", a packaged model name or a checkpoint path')
    args = p.parse_args()
    torch.set_num_threads(1)
    model = resolve_model_path(args.model)  # a packaged model's name -> its file
    for b in (int(x) for x in args.batch.split(",")):
        print(json.dumps(run(b, args.steps, args.prompt_len, model)), flush=True)


if __name__ == "__main__":
    main()
