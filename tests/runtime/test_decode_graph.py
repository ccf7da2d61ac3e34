"""The padded-bucket decode step (esp_core/runtime/decode_graph.py) computes what the
unpadded step computes. On CUDA it is captured as graphs (scripts/gpu_check.sh compares
graph and eager decode there); here the same padded path runs eagerly, so its padding
(scratch KV slot, empty slot lists, dropped rows) is checked on CPU, for batch sizes on
and across the bucket edges."""

from __future__ import annotations

import pytest
import torch

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.decode_graph import DecodeGraphs, batch_bucket, context_bucket
from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.local_exec import decode_forward
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import NewRequest, SamplingParams
from tests.support.host_reads import describe, host_reads
from tests.support.runtime import decode_plan, prefill_item, prefill_plan, release_plan, run_one

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
SIZES = [1, 2, 3, 4, 5, 8, 9, 16, 17]  # on and across the edges of buckets 1..32


def _worker(max_batch: int | None) -> InstanceWorker:
    """A CPU worker; with max_batch, decoding through padded buckets (a pool with a scratch slot)."""
    worker = InstanceWorker(WorkerConfig(kv_slots=4096))
    if max_batch is not None:
        a, m = worker.model.arch, worker.model
        worker.pool = KVPool(
            a.num_layers, 4096, a.num_kv_heads, a.head_dim, m.dtype, m.device, scratch_slots=1
        )
        worker.decode_graphs = DecodeGraphs(m, worker.pool, max_batch=max_batch)
    return worker


def _prompts(n: int) -> dict[str, tuple[int, ...]]:
    return {f"r{i}": tuple([256, *((b"padded decode " * 5)[: 3 + 7 * i % 50])]) for i in range(n)}


def _prefill(worker: InstanceWorker, prompts: dict[str, tuple[int, ...]]) -> dict[str, int]:
    news = [NewRequest(rid, p, GREEDY) for rid, p in prompts.items()]
    items = [prefill_item(rid, 0, len(p)) for rid, p in prompts.items()]
    return {t.request_id: t.token_id for t in run_one(worker, prefill_plan(items, news)).sampled}


def test_buckets():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 4, 5, 33, 64, 65)] == [1, 2, 4, 4, 8, 64, 64, None]
    assert [context_bucket(n) for n in (1, 512, 513, 1 << 16, (1 << 16) + 1)] == [
        512,
        512,
        1024,
        1 << 16,
        None,
    ]


def test_a_pool_without_scratch_slot_is_refused():
    worker = InstanceWorker(WorkerConfig(kv_slots=64))
    with pytest.raises(ValueError, match="scratch slot"):
        DecodeGraphs(worker.model, worker.pool)
    assert worker.decode_graphs is None  # ignored on CPU: the unpadded step runs


@pytest.fixture(scope="module")
def prefilled():
    """A padded worker holding max(SIZES) prefilled requests, and their first tokens."""
    worker = _worker(max_batch=64)
    prompts = _prompts(max(SIZES))
    return worker, prompts, _prefill(worker, prompts)


@pytest.mark.parametrize("size", SIZES)
def test_padded_step_equals_unpadded_step(prefilled, size):
    """Same inputs, same pool: hidden states and logits of the real rows agree (to fp32
    rounding: the row count changes how the CPU matmuls block their sums; bit for bit
    where n is a bucket), greedy tokens are equal, and the padding rows wrote nowhere but
    the scratch slot."""
    worker, prompts, first = prefilled
    pool, model = worker.pool, worker.model
    rids = list(prompts)[:size]
    positions = [len(prompts[r]) for r in rids]
    new_slots = torch.cat([pool.allocate(r, [p]) for r, p in zip(rids, positions)])
    lists = [pool.slots_of(r) for r in rids]
    tokens = [first[r] for r in rids]
    pool.kv[:, new_slots] = 0.0  # reused slots may hold this very K/V from a previous size
    before = pool.kv[:, : pool.num_total_slots].clone()
    with host_reads() as reads:
        padded = worker.decode_graphs.hidden(tokens, positions, new_slots, lists)
    assert not reads, describe(reads)
    written = pool.kv[:, : pool.num_total_slots].clone()
    eager = decode_forward(model, pool, tokens, positions, new_slots, lists)
    # the same K/V up to rounding: a matmul over B rows may block its sums differently from n
    torch.testing.assert_close(pool.kv[:, : pool.num_total_slots], written, rtol=1e-5, atol=1e-5)
    changed = (written != before).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(new_slots.tolist()), "padding rows must write only the scratch slot"
    assert padded.shape == eager.shape == (size, model.arch.hidden_size)
    if batch_bucket(size, 64) == size:
        assert torch.equal(padded, eager)
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    lp, le = model.compute_logits(padded), model.compute_logits(eager)
    torch.testing.assert_close(lp, le, rtol=1e-5, atol=1e-5)
    assert torch.equal(lp.argmax(-1), le.argmax(-1))
    for r, p in zip(rids, positions):  # the next size decodes the same position again
        pool.free_positions(r, [p])


def test_decode_through_buckets_matches_plain_decode_over_steps():
    """Whole steps through the worker: a padded worker (buckets up to 4, so a batch of 5
    falls back to the eager step) and a plain one sample the same greedy tokens while the
    batch shrinks across bucket edges."""
    prompts = _prompts(5)
    padded, plain = _worker(max_batch=4), _worker(max_batch=None)
    tokens = {"padded": _prefill(padded, prompts), "plain": _prefill(plain, prompts)}
    assert tokens["padded"] == tokens["plain"]
    pos = {r: len(p) for r, p in prompts.items()}
    for live in (5, 4, 3, 2, 1):  # 5 (eager fallback), 4, 3 (bucket 4), 2, 1
        rids = list(prompts)[:live]
        for name, worker in (("padded", padded), ("plain", plain)):
            plan = decode_plan({r: (tokens[name][r], pos[r]) for r in rids})
            out = run_one(worker, plan).sampled
            tokens[name].update({t.request_id: t.token_id for t in out})
        assert {r: tokens["padded"][r] for r in rids} == {r: tokens["plain"][r] for r in rids}, live
        pos.update({r: pos[r] + 1 for r in rids})
    for worker in (padded, plain):
        worker.execute(release_plan(list(prompts)))
        assert worker.kv_free_slots() == worker.kv_total_slots()
