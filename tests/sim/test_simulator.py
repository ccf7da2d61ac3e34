"""The simulated executor: timing of shared instances, validation, determinism."""

import json

import pytest

from esp_core.sched.interface import ClusterSpec, FinishReason, RequestEvent
from esp_core.sched.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    TokenRange,
)
from esp_core.sim.kv_ledger import PlanError
from esp_core.sim.policies import LayoutConfig, build_scheduler, cluster_for
from esp_core.sim.simulator import SimulationStuck, Simulator
from esp_core.sim.workloads import RequestSpec, generate


class Scripted:
    """A scheduler that plays fixed plans, one per schedule() call, and finishes each
    request after its first token; records when each result came back."""

    def __init__(self, cluster, plans):
        self.cluster = cluster
        self.plans = list(plans)
        self.results = []
        self.waiting = set()

    def add_request(self, request, now):
        self.waiting.add(request.request_id)

    def abort_request(self, request_id, now):
        return []

    def schedule(self, now):
        if self.plans and self.waiting:
            return self.plans.pop(0)
        return IterationPlan(99)

    def update(self, result, now):
        self.results.append((result.batch_id, now, result.elapsed_s))
        out = []
        for s in result.sampled:
            self.waiting.discard(s.request_id)
            out.append(RequestEvent(s.request_id, token=s, finish_reason=FinishReason.LENGTH))
        return out

    def has_unfinished(self):
        return bool(self.waiting) or bool(self.plans)

    def kv_free_slots(self):
        return [0] * self.cluster.num_instances

    def cached_kv_per_instance(self):
        return [0] * self.cluster.num_instances

    def prefix_cache_stats(self):
        return {"enabled": False}


def prefill(bid, rid, n, ring, keep_on):
    return PrefillBatch(
        bid, ring, (PrefillItem(rid, TokenRange(0, n), 0, (KVKeep(keep_on, (TokenRange(0, n),)),)),)
    )


def release_all(rid, insts):
    return Release(rid, insts, ReleaseReason.FINISHED)


def test_batches_sharing_an_instance_run_back_to_back(cost_model):
    cluster = ClusterSpec(3, 10_000, 1)
    # a on ring (0, 1); b on (1, 2) in the same plan: b starts when a ends on instance 1.
    plan = IterationPlan(0, prefills=(prefill(1, "a", 1000, (0, 1), 0), prefill(2, "b", 3000, (1, 2), 2)))
    cleanup = IterationPlan(1, releases=(release_all("a", (0,)), release_all("b", (2,))))
    sched = Scripted(cluster, [plan, cleanup])
    reqs = [RequestSpec("a", 0.0, 1000, 1), RequestSpec("b", 0.0, 3000, 1)]
    Simulator(sched, cost_model).run(reqs)
    ta = cost_model.prefill_time(2, 1000, 1000**2, 1)
    tb = cost_model.prefill_time(2, 3000, 3000**2, 1)
    done = {bid: t for bid, t, _ in sched.results}
    assert done[1] == pytest.approx(ta)
    assert done[2] == pytest.approx(ta + tb)


def test_over_commit_and_busy_instances_are_refused(cost_model):
    cluster = ClusterSpec(2, 500, 1)
    plan = IterationPlan(0, prefills=(prefill(1, "a", 600, (0, 1), 0),))
    with pytest.raises(PlanError, match="over-committed"):
        Simulator(Scripted(cluster, [plan]), cost_model).run([RequestSpec("a", 0, 600, 1)])
    # second plan reuses instance 0 while the first prefill still runs there
    p1 = IterationPlan(0, prefills=(prefill(1, "a", 400, (0,), 0),))
    p2 = IterationPlan(1, prefills=(prefill(2, "b", 10, (0, 1), 1),))
    reqs = [RequestSpec("a", 0.0, 400, 1), RequestSpec("b", 1e-4, 10, 1)]
    with pytest.raises(PlanError, match="busy"):
        Simulator(Scripted(cluster, [p1, p2]), cost_model).run(reqs)


def test_keep_ranges_and_holders_are_checked(cost_model):
    cluster = ClusterSpec(2, 5000, 1)
    gap = PrefillBatch(
        1,
        (0, 1),
        (
            PrefillItem(
                "a", TokenRange(0, 10), 0, (KVKeep(0, (TokenRange(0, 4),)), KVKeep(1, (TokenRange(5, 10),)))
            ),
        ),
    )
    with pytest.raises(PlanError, match="partition"):
        Simulator(Scripted(cluster, [IterationPlan(0, prefills=(gap,))]), cost_model).run(
            [RequestSpec("a", 0, 10, 1)]
        )
    # decode claiming holders where the request has no KV
    bad = DecodeBatch(1, (0, 1), (DecodeItem("a", 5, 10, 0, (1,), 0),))
    with pytest.raises(PlanError):
        Simulator(Scripted(cluster, [IterationPlan(0, decodes=(bad,))]), cost_model).run(
            [RequestSpec("a", 0, 10, 2)]
        )


def test_stuck_scheduler_is_reported(cost_model):
    sched = Scripted(ClusterSpec(1, 100, 1), [])
    sched.plans = []
    sched.has_unfinished = lambda: True
    with pytest.raises(SimulationStuck):
        Simulator(sched, cost_model).run([RequestSpec("a", 0, 10, 1)])


def _run_json(policy, workload, cost_model, seed):
    cluster = cluster_for(policy, LayoutConfig())
    sched = build_scheduler(policy, cluster, cost_model, workload)
    res = Simulator(sched, cost_model).run(generate(workload, 40, 4.0, seed=seed))
    return json.dumps(res.to_dict(), sort_keys=True)


def test_same_seed_same_result(cost_model):
    a = _run_json("chunked-prefill", "sharegpt", cost_model, 11)
    assert a == _run_json("chunked-prefill", "sharegpt", cost_model, 11)
    assert a != _run_json("chunked-prefill", "sharegpt", cost_model, 12)


def test_fused_splitfuse_iteration_is_cheaper_than_back_to_back(cost_model):
    """A fused chunk + decode forward costs less than running them one after the other,
    and no less than either alone."""
    from esp_core.sim.kv_ledger import KVLedger
    from esp_core.sim.timing import BatchTimer, Topology

    timer = BatchTimer(cost_model, Topology(tp=8))
    ledger = KVLedger(1, 10**6)
    items = []
    for k in range(64):
        ledger.add(f"d{k}", 0, 1000, "setup")
        items.append(DecodeItem(f"d{k}", 1, 1000, 0, (0,), 0))
    dec = DecodeBatch(2, (0,), tuple(items))
    pre = prefill(1, "p", 2048, (0,), 0)
    fused = timer.fused(pre, dec, ledger)
    apart = timer.prefill(pre) + timer.decode(dec, ledger)
    assert max(timer.prefill(pre), timer.decode(dec, ledger)) <= fused < apart


def test_decode_reads_a_shared_document_once_per_step(cost_model):
    """Readers sharing a document's slots (`KVAdoption(share=True)`) read it once per
    decode step (the executors' shared-prefix attention); each its own tokens apart.
    Without cascade timing every reader reads the document."""
    from esp_core.sched.plan import KVAdoption
    from esp_core.sim.kv_ledger import KVLedger
    from esp_core.sim.timing import BatchTimer, Topology

    ledger = KVLedger(2, 10**6)
    ledger.add("src", 0, 20_000, "setup")  # the document, on instance 0
    for r in ("r1", "r2", "r3"):
        ledger.adopt(KVAdoption("src", r, 20_000, (0,), (KVKeep(0, (TokenRange(0, 20_000),)),), share=True))
        ledger.add(r, 0, 50, "setup")  # its question
    ledger.add("other", 1, 3_000, "setup")
    items = [DecodeItem(r, 1, 20_050, 0, (0,), 0) for r in ("r1", "r2", "r3")]
    batch = DecodeBatch(1, (0, 1), (*items, DecodeItem("other", 1, 3_000, 1, (1,), 1)))
    cascade = BatchTimer(cost_model, Topology(tp=2))
    per_reader = BatchTimer(cost_model, Topology(tp=2), cascade=False)
    # instance 0: the document once + 3 questions + 3 new tokens
    assert cascade.decode_shape(batch, ledger) == (3, 20_000 + 3 * 50 + 3)
    assert per_reader.decode_shape(batch, ledger) == (3, 3 * 20_050 + 3)
    assert cascade.decode(batch, ledger) < per_reader.decode(batch, ledger)
    # one reader alone reads what it would without cascade
    alone = DecodeBatch(2, (0,), (items[0],))
    assert cascade.decode_shape(alone, ledger) == per_reader.decode_shape(alone, ledger)


def test_vllm_apc_cache_blocks_are_read_once_per_step(cost_model):
    """A baseline with its own block cache: blocks several decoding requests reference
    count once (vLLM's cascade attention), each request's other tokens apart."""
    from esp_core.sim.kv_ledger import KVLedger
    from esp_core.sim.timing import BatchTimer, Topology

    class Blocks:
        block_tokens = 100

        def decode_cache_blocks(self, rid):
            return {"a": (1, 2, 3), "b": (1, 2, 3), "c": (1, 2)}[rid]

    ledger = KVLedger(1, 10**6)
    ledger.add("a", 0, 330, "setup")  # computed the document: its blocks are its own KV
    for r, n in (("b", 20), ("c", 40)):
        ledger.add(r, 0, n, "setup")
        ledger.add_shared(r, 0, 100 * len(Blocks().decode_cache_blocks(r)))  # its hit
    items = tuple(DecodeItem(r, 1, 0, 0, (0,), 0) for r in "abc")
    timer = BatchTimer(cost_model, Topology(tp=8), cache_blocks=Blocks())
    # 3 distinct blocks + own tokens past them (30 + 20 + 40) + 3 new tokens
    assert timer.decode_shape(DecodeBatch(1, (0,), items), ledger) == (3, 300 + 90 + 3)


def test_a_chunk_attends_at_the_pace_of_its_fullest_holder(cost_model):
    """A chunk's attention to its cached prefix runs on the holders in parallel: an
    uneven split is charged as if every holder held the fullest one's tokens; an even one
    (up to a token each) as the cost model's even split."""
    from esp_core.sim.kv_ledger import KVLedger
    from esp_core.sim.timing import BatchTimer, Topology

    timer = BatchTimer(cost_model, Topology(tp=2))
    keeps = (KVKeep(0, (TokenRange(30_001, 31_001),)), KVKeep(1, (TokenRange(31_001, 32_001),)))
    chunk = PrefillBatch(
        1,
        (0, 1),
        (PrefillItem("p", TokenRange(30_001, 32_001), 0, keeps, (0, 1), False),),
    )
    even, uneven = KVLedger(2, 10**6), KVLedger(2, 10**6)
    even.add("p", 0, 15_001, "setup")
    even.add("p", 1, 15_000, "setup")
    uneven.add("p", 0, 25_001, "setup")
    uneven.add("p", 1, 5_000, "setup")
    t_even = timer.prefill(chunk, timer.fullest_holders(chunk, even))
    assert t_even == timer.prefill(chunk)  # the cost model's even split
    t_uneven = timer.prefill(chunk, timer.fullest_holders(chunk, uneven))
    pairs = 2_000 * (2 * 25_001 - 30_001)  # the extra (query, key) pairs the fullest bounds
    assert t_uneven - t_even == pytest.approx(pairs / 2 * cost_model.chunk_cross_coeff(2))
