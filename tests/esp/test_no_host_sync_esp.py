"""Multi-instance steps read nothing back from their tensors on the host (see
tests/runtime/test_no_host_sync.py): a striped ring prefill over 4 processes, a chunk
whose queries attend to cached KV on other instances, and a distributed decode whose
masters, holders and new-KV instances differ, each rank counting its own reads."""

from __future__ import annotations

import pytest

from esp_core.sched.plan import DecodeBatch, IterationPlan, NewRequest, Release, ReleaseReason, SamplingParams
from tests.support.esp import (
    ESPCluster,
    decode_item,
    even_keep,
    next_id,
    prefill_batch,
    prefill_item,
    rank_execute_counting_reads,
    save_tiny_model,
)
from tests.support.host_reads import describe

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _run(cluster: ESPCluster, plan: IterationPlan) -> dict[str, int]:
    """Execute on every rank; fail on a batch error or on any rank's host read; return
    the sampled token of each request."""
    sampled: dict[str, int] = {}
    for rank, (results, reads) in enumerate(
        cluster.group.run(rank_execute_counting_reads, cluster.key, plan)
    ):
        assert not reads, f"rank {rank}:\n{describe(reads)}"
        for batch_id, error, tokens, _ in results:
            assert not error, f"rank {rank}, batch {batch_id}: {error}"
            sampled.update({t.request_id: t.token_id for t in tokens})
    return sampled


def test_ring_prefill_chunk_and_distributed_decode_read_nothing_back(dist_group, tmp_path):
    cluster = ESPCluster(dist_group, str(save_tiny_model(tmp_path / "m", seed=5)), 256)
    prompts = {"r0": tuple(range(3, 23)), "r1": tuple(range(40, 49))}
    new = tuple(NewRequest(rid, p, GREEDY) for rid, p in prompts.items())
    first = prefill_batch(
        (0, 1, 2, 3),
        [
            prefill_item("r0", 0, 12, 2, even_keep(0, 12, (0, 1)), sample=False),
            prefill_item("r1", 0, 9, 1, even_keep(0, 9, (1, 2, 3))),
        ],
    )
    out = _run(cluster, IterationPlan(next_id(), new_requests=new, prefills=(first,)))
    # the rest of r0, attending to its first chunk's KV on instances 0 and 1
    chunk = prefill_batch(
        (3, 1, 0), [prefill_item("r0", 12, 20, 1, even_keep(12, 20, (3,)), cached_holders=(0, 1))]
    )
    out.update(_run(cluster, IterationPlan(next_id(), prefills=(chunk,))))
    for step in range(2):
        items = (
            decode_item("r0", out["r0"], 20 + step, 2, (0, 1, 3) + ((2,) if step else ()), 2),
            decode_item("r1", out["r1"], 9 + step, 0, (1, 2, 3) + ((0,) if step else ()), 0),
        )
        out = _run(cluster, IterationPlan(next_id(), decodes=(DecodeBatch(next_id(), (0, 1, 2, 3), items),)))
        assert set(out) == {"r0", "r1"}
    releases = tuple(Release(rid, (0, 1, 2, 3), ReleaseReason.FINISHED) for rid in prompts)
    _run(cluster, IterationPlan(next_id(), releases=releases))
    for free, total, holding, states in cluster.pool_states():
        assert free == total and not holding and not states
