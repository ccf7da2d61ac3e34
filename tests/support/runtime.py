"""A tiny in-process driver for tests and tools: plans for "prefill these prompts, then
decode k steps", executed on one `InstanceWorker` (instance 0) without a scheduler.

    worker = InstanceWorker(WorkerConfig(kv_slots=4096))
    outs = generate(worker, {"a": [256, 72, 105], "b": [256, 10]}, max_new_tokens=8)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch

from esp_core.runtime.model import CausalLM
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    SampledToken,
    SamplingParams,
    TokenRange,
)
from esp_serve.kernels import api as kernels

_ids = itertools.count(1)


def prefill_item(
    request_id: str,
    start: int,
    end: int,
    instance: int = 0,
    sample: bool = True,
    extra_token_ids: Sequence[int] = (),
) -> PrefillItem:
    """A single-instance chunk [start, end) kept entirely on `instance`."""
    rng = TokenRange(start, end)
    return PrefillItem(
        request_id,
        rng,
        stripe_offset=0,
        keep=(KVKeep(instance, (rng,)),),
        cached_holders=(instance,) if start > 0 else (),
        sample=sample,
        extra_token_ids=tuple(extra_token_ids),
    )


def prefill_plan(
    items: Sequence[PrefillItem], new_requests: Sequence[NewRequest] = (), instance: int = 0
) -> IterationPlan:
    batch = PrefillBatch(next(_ids), (instance,), tuple(items))
    return IterationPlan(next(_ids), new_requests=tuple(new_requests), prefills=(batch,))


def decode_plan(steps: Mapping[str, tuple[int, int]], instance: int = 0) -> IterationPlan:
    """steps: request_id -> (input_token, position)."""
    items = tuple(
        DecodeItem(rid, tok, pos, master=instance, holders=(instance,), new_kv_instance=instance)
        for rid, (tok, pos) in steps.items()
    )
    return IterationPlan(next(_ids), decodes=(DecodeBatch(next(_ids), (instance,), items),))


def release_plan(
    request_ids: Sequence[str], reason: ReleaseReason = ReleaseReason.FINISHED, instance: int = 0
) -> IterationPlan:
    return IterationPlan(next(_ids), releases=tuple(Release(r, (instance,), reason) for r in request_ids))


def run_one(worker: InstanceWorker, plan: IterationPlan) -> BatchResult:
    """Execute a one-batch plan; raise if the batch reported an error."""
    results = worker.execute(plan)
    if len(results) != 1:
        raise AssertionError(f"expected one result, got {results}")
    if results[0].error:
        raise RuntimeError(results[0].error)
    return results[0]


def generate_tokens(
    worker: InstanceWorker,
    prompts: Mapping[str, Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams | Mapping[str, SamplingParams] | None = None,
    release: bool = True,
) -> dict[str, list[SampledToken]]:
    """Prefill all prompts in one batch, then decode them together for max_new_tokens - 1
    steps (no stopping at EOS). Returns the SampledTokens of each request."""

    def params(rid: str) -> SamplingParams:
        if sampling is None:
            return SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
        return sampling[rid] if isinstance(sampling, Mapping) else sampling

    new = [NewRequest(rid, tuple(p), params(rid)) for rid, p in prompts.items()]
    items = [prefill_item(rid, 0, len(p)) for rid, p in prompts.items()]
    res = run_one(worker, prefill_plan(items, new))
    outs: dict[str, list[SampledToken]] = {s.request_id: [s] for s in res.sampled}
    for step in range(max_new_tokens - 1):
        steps = {rid: (outs[rid][-1].token_id, len(prompts[rid]) + step) for rid in prompts}
        res = run_one(worker, decode_plan(steps))
        for s in res.sampled:
            outs[s.request_id].append(s)
    if release:
        worker.execute(release_plan(list(prompts)))
    return outs


def generate(
    worker: InstanceWorker,
    prompts: Mapping[str, Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingParams | Mapping[str, SamplingParams] | None = None,
) -> dict[str, list[int]]:
    """Like `generate_tokens` but returns token ids only (greedy by default)."""
    outs = generate_tokens(worker, prompts, max_new_tokens, sampling)
    return {rid: [s.token_id for s in toks] for rid, toks in outs.items()}


def reference_logits(
    model: CausalLM, token_ids: Sequence[int], positions: Sequence[int] | None = None
) -> torch.Tensor:
    """Logits [T, V] fp32 of one sequence in a single causal pass, no KV pool: the
    reference every cached/chunked/distributed path must reproduce."""
    ids = torch.tensor(list(token_ids), dtype=torch.int64, device=model.device)
    pos = (
        torch.arange(len(ids), dtype=torch.int64, device=model.device)
        if positions is None
        else torch.tensor(list(positions), dtype=torch.int64, device=model.device)
    )
    cu = torch.tensor([0, len(ids)], dtype=torch.int64, device=model.device)

    def attn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return kernels.varlen_attention(q, k, v, pos, pos, cu, cu, scale=model.scale)[0]

    return model.compute_logits(model.forward(ids, pos, attn))
