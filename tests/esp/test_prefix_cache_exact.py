"""Prefix-cache hits are exact: the real ESPScheduler with its prefix cache, its plans
executed by InstanceWorkers on 4 gloo ranks, gives a request that reuses an earlier
request's KV the outputs (logprobs within TOL, greedy tokens where the margin allows) of
a cold single instance running it alone -- which tests/esp/test_esp_execution.py and
tests/runtime/test_hf_reference.py tie to `transformers`.

Scenarios: the reused prefix on one instance; spread over several (the hit's remaining
tokens run as a ring prefill over its holders); a prefix ending inside a block (only the
whole blocks are reused); a second turn whose prompt repeats the first turn's prompt and
answer (the hit reaches into the answer's blocks); three concurrent readers of one
document holding its KV once (the pools hold each shared slot once and are empty once
the entries go); a request that shares the prefix of one still decoding (both answer
as cold). Blocks are 16 tokens here (256 in the
server): the same code at a size tiny models and pools can afford.
"""

from __future__ import annotations

import pytest

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import IterationPlan, KVAdoption, NewRequest, Release, ReleaseReason
from esp_core.sched.plan_check import check_plan, snapshot
from esp_core.sched.prefix_cache import block_hash_chain
from esp_core.sched.scheduler import ESPScheduler
from tests.esp.test_esp_execution import assert_matches, make_prompts, model_dirs, params
from tests.support.esp import ESPCluster
from tests.support.runtime import generate_tokens

pytestmark = pytest.mark.slow
__all__ = ["model_dirs"]  # the module-scoped checkpoint fixture, shared

BLOCK = 16
N_OUT = 8


class CachedGroup:
    """The scheduler with a prefix cache driving the 4-rank cluster, request by request."""

    def __init__(self, dist_group, model: str, slots: int, chunk_tokens: int) -> None:
        cfg = ESPSchedulerConfig(
            chunked_prefill=True,
            chunk_tokens=chunk_tokens,
            headroom_tokens=0,
            prefix_cache=True,
            prefix_block_tokens=BLOCK,
        )
        self.sched = ESPScheduler(ClusterSpec(4, slots), CostModel.default_a800(), cfg)
        self.cluster = ESPCluster(dist_group, model, slots)
        self.outputs: dict[str, list[int]] = {}
        self.adoptions: list[KVAdoption] = []
        self.cached: dict[str, int] = {}
        self.now = 0.0

    def serve(self, rid: str, prompt: list[int]) -> list:
        """Run one request to its end (earlier ones are done: their KV is cached)."""
        return self.serve_together({rid: prompt})[rid]

    def add(self, prompts: dict[str, list[int]]) -> None:
        for rid, prompt in prompts.items():
            hashes = block_hash_chain(prompt, BLOCK)
            self.sched.add_request(NewRequest(rid, tuple(prompt), params(N_OUT), self.now, hashes), self.now)
            self.outputs[rid] = []

    def serve_together(
        self, prompts: dict[str, list[int]], later: dict[str, list[int]] | None = None, after: int = 0
    ) -> dict[str, list]:
        """Run requests that arrive at once to their ends; `later` ones arrive once every
        first one has `after` outputs (they are decoding)."""
        self.add(prompts)
        later = dict(later or {})
        got: dict[str, list] = {rid: [] for rid in [*prompts, *later]}
        for _ in range(200):
            if later and all(len(self.outputs[rid]) >= after for rid in prompts):
                self.add(later)
                later = {}
            if not self.sched.has_unfinished():
                break
            before = snapshot(self.sched)
            plan = self.sched.schedule(self.now)
            check_plan(plan, before, allow_shared_instances=True)
            self.adoptions.extend(plan.adoptions)
            results = self.cluster.execute_batches(plan, narrowed=True)  # as decided
            self.now += 0.01
            for res in results:
                assert res.error is None, res.error
                for ev in self.sched.update(res, self.now):
                    self.cached[ev.request_id] = ev.num_cached_tokens
                    if ev.token is not None:
                        got[ev.request_id].append(ev.token)
                        self.outputs[ev.request_id].append(ev.token.token_id)
            self.sched.check_invariants()
        assert all(len(g) == N_OUT for g in got.values()) and not self.sched.has_unfinished()
        return got


@pytest.fixture(scope="module")
def ref_worker(model_dirs):
    return InstanceWorker(WorkerConfig(model=model_dirs["gqa"], kv_slots=1024, num_threads=1))


def cold(ref_worker, prompt):
    return generate_tokens(ref_worker, {"cold": prompt}, N_OUT, sampling=params(N_OUT))["cold"]


def assert_cold_equal(got, ref_worker, prompt, what):
    for j, (tok, want) in enumerate(zip(got, cold(ref_worker, prompt), strict=True)):
        assert_matches(tok, want, f"{what} output {j}")


@pytest.fixture
def group_factory(dist_group, model_dirs):
    made: list[CachedGroup] = []

    def make(slots: int, chunk_tokens: int) -> CachedGroup:
        made.append(CachedGroup(dist_group, model_dirs["gqa"], slots, chunk_tokens))
        return made[-1]

    yield make
    for g in made:
        g.cluster.reset()


def test_hit_on_one_instance_and_partial_block(group_factory, ref_worker):
    g = group_factory(slots=512, chunk_tokens=128)  # whole-prompt prefills, KV kept on one instance
    doc = make_prompts([70], seed=5)["r0"]
    q1, q2, q3 = doc + [7, 8, 9], doc + [11, 12, 13, 14], doc[:40] + [99] * 9
    g.serve("q1", q1)
    assert_cold_equal(g.serve("q2", q2), ref_worker, q2, "q2")
    ad = g.adoptions[-1]
    assert (ad.src_rid, ad.keep_len) == ("q1", 64) and g.cached["q2"] == 64
    # q3 shares 40 tokens with q2's prompt: the 2 whole blocks (32 tokens) are reused
    assert_cold_equal(g.serve("q3", q3), ref_worker, q3, "q3")
    ad = g.adoptions[-1]
    assert (ad.src_rid, ad.keep_len) == ("q2", 32) and len(g.adoptions) == 2
    assert all(len(a.instances) == len(a.kept) == 1 for a in g.adoptions), g.adoptions


def test_hit_spread_over_several_instances_runs_a_ring(group_factory, ref_worker):
    g = group_factory(slots=48, chunk_tokens=40)  # a 120-token prompt needs 3+ instances
    doc = make_prompts([112], seed=9)["r0"]
    q1, q2 = doc + [1, 2, 3, 4, 5], doc + [6, 7, 8]
    g.serve("q1", q1)
    prefills_before = g.sched.stats["prefill_batches"]
    assert_cold_equal(g.serve("q2", q2), ref_worker, q2, "q2")
    (ad,) = g.adoptions
    assert ad.keep_len == 112 and len(ad.kept) >= 2, ad
    assert g.sched.stats["prefill_batches"] == prefills_before + 1  # one chunk: 3 tokens


def test_second_turn_reuses_the_first_answer(group_factory, ref_worker):
    g = group_factory(slots=512, chunk_tokens=64)
    turn1 = make_prompts([30], seed=11)["r0"]
    g.serve("t1", turn1)
    turn2 = turn1 + g.outputs["t1"] + [42, 43, 44, 45, 46]
    assert_cold_equal(g.serve("t2", turn2), ref_worker, turn2, "t2")
    (ad,) = g.adoptions
    # t1's KV covers prompt + answer but its last token: 37 positions, 2 whole blocks,
    # the second of them ending inside the answer (hashed from t1's outputs at its finish)
    assert ad.keep_len == 32 > len(turn1)


def test_concurrent_readers_share_the_prefix_and_answer_as_cold(group_factory, ref_worker):
    g = group_factory(slots=400, chunk_tokens=40)
    doc = make_prompts([100], seed=13)["r0"]
    g.serve("q0", doc + [1, 2])
    qs = {"qa": doc + [3, 4, 5], "qb": doc + [6], "qc": doc[:70] + [7, 8]}
    got = g.serve_together(qs)
    for rid, prompt in qs.items():
        assert_cold_equal(got[rid], ref_worker, prompt, rid)
    shares = [(a.dst_rid, a.keep_len) for a in g.adoptions if a.share]
    (adopted,) = [(a.dst_rid, a.keep_len) for a in g.adoptions if not a.share]
    assert sorted([*shares, adopted]) == [("qa", 96), ("qb", 96), ("qc", 64)]
    assert len(shares) == 2  # qc, then qa share the entry's slots, then qb adopts it
    assert_pools_hold_the_shared_kv_once_then_empty(g)


def assert_pools_hold_the_shared_kv_once_then_empty(g: CachedGroup) -> None:
    """Each rank's pool holds what the scheduler counts there (shared slots once, less
    than the entries' KV summed); releasing every entry empties every pool."""
    kv = g.sched.state.kv
    states = g.cluster.pool_states()  # (checks each pool's reference counts)
    used = [total - free for free, total, _, _ in states]
    assert used == [int(u) for u in kv.used]
    assert sum(used) < sum(kv.tokens_of(rid) for rid in kv.requests())  # something is shared
    entries = [e.rid for e in g.sched.state.prefix_cache.entries()]
    releases = tuple(Release(rid, kv.holders(rid), ReleaseReason.FINISHED) for rid in entries)
    g.cluster.execute_batches(IterationPlan(plan_id=10_000, releases=releases))
    assert all(free == total for free, total, _, _ in g.cluster.pool_states())


def test_share_of_a_request_still_decoding_leaves_both_exact(group_factory, ref_worker):
    g = group_factory(slots=512, chunk_tokens=128)  # whole-prompt prefills, KV kept on one instance
    doc = make_prompts([70], seed=17)["r0"]
    q1, q2 = doc + [1, 2], doc + [3, 4, 5]
    got = g.serve_together({"q1": q1}, later={"q2": q2}, after=2)
    (ad,) = g.adoptions
    assert (ad.src_rid, ad.dst_rid, ad.share, ad.keep_len) == ("q1", "q2", True, 64)
    assert g.cached["q2"] == 64
    assert_cold_equal(got["q2"], ref_worker, q2, "q2 (shared from a live request)")
    assert_cold_equal(got["q1"], ref_worker, q1, "q1 (the source, read while it decoded)")


def _cascade_layouts(g: CachedGroup) -> int:
    return sum(s["layouts"] for s in g.cluster.cascade_stats())


@pytest.mark.parametrize(
    ("slots", "chunk_tokens", "doc_len"),
    [(512, 128, 70), (48, 40, 112)],
    ids=["one-instance", "spread-over-instances"],
)
def test_readers_decoding_together_read_the_document_once_and_answer_as_cold(
    group_factory, ref_worker, slots, chunk_tokens, doc_len
):
    """Three readers of one document decode in the same steps: each step's attention
    reads the shared slots once for all of them (kernels/cascade.py; with the document
    spread over several instances, on every holder through the exchange), and every
    reader answers as it would cold."""
    g = group_factory(slots=slots, chunk_tokens=chunk_tokens)
    doc = make_prompts([doc_len], seed=23)["r0"]
    g.serve("q0", doc + [1, 2])
    before = _cascade_layouts(g)
    qs = {"qa": doc + [3, 4, 5], "qb": doc + [6, 7], "qc": doc + [8]}
    got = g.serve_together(qs)
    assert sum(a.share for a in g.adoptions) >= 1  # readers refer to the same slots
    assert _cascade_layouts(g) > before  # ... and read them once in some steps
    for rid, prompt in qs.items():
        assert_cold_equal(got[rid], ref_worker, prompt, rid)
