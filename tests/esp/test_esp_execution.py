"""ESP execution of real plans across 1-4 instances == single-instance execution.

Tiny random Llama models (MHA and GQA), fp32, peaked logits. The reference runs the same
requests on one InstanceWorker in this process (whole-prompt prefill, then decode). The
ESP run is teacher-forced with the reference's tokens, so every sampled position can be
compared: the full log-softmax vector (logprobs of all V tokens) within TOL, and the greedy
token identical wherever the reference's top-2 margin exceeds TOL.

After every test, every instance's KV pool is fully free and holds no request state.
"""

from __future__ import annotations

import random

import pytest

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import (
    DecodeBatch,
    IterationPlan,
    KVKeep,
    Migration,
    NewRequest,
    Release,
    ReleaseReason,
    SamplingParams,
    TokenRange,
)
from tests.support.esp import (
    ESPCluster,
    decode_item,
    even_keep,
    next_id,
    prefill_batch,
    prefill_item,
    save_tiny_model,
)
from tests.support.runtime import generate_tokens

pytestmark = pytest.mark.slow

TOL = 1e-4  # max |logprob difference| over the whole vocabulary, fp32
VOCAB = 258
WORLD = 4
KV_SLOTS = 512
MODELS = {"mha": dict(num_heads=4, num_kv_heads=4), "gqa": dict(num_heads=4, num_kv_heads=2)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("esp_models")
    return {name: str(save_tiny_model(root / name, seed=3, **kw)) for name, kw in MODELS.items()}


@pytest.fixture(params=sorted(MODELS))
def env(request, dist_group, model_dirs):
    """(cluster on the 4-rank group, reference worker) for one model; checks pools after."""
    model = model_dirs[request.param]
    cluster = ESPCluster(dist_group, model, KV_SLOTS)
    ref = InstanceWorker(WorkerConfig(model=model, kv_slots=4 * KV_SLOTS, num_threads=1))
    yield cluster, ref
    try:
        for free, total, holding, states in cluster.pool_states():
            assert free == total and not holding and not states, (free, total, holding, states)
    finally:
        cluster.reset()  # a failed test must not leak into the next one


def params(n_out: int) -> SamplingParams:
    return SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True, logprobs=VOCAB)


def make_prompts(lengths, seed=0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {f"r{i}": [256] + [rng.randrange(256) for _ in range(n - 1)] for i, n in enumerate(lengths)}


def reference(ref: InstanceWorker, prompts, n_out):
    return generate_tokens(ref, prompts, n_out, sampling=params(n_out))


def assert_matches(tok, ref_tok, where=""):
    got = {t.token_id: t.logprob for t in tok.top_logprobs}
    want = {t.token_id: t.logprob for t in ref_tok.top_logprobs}
    assert len(got) == len(want) == VOCAB, where
    err = max(abs(got[t] - want[t]) for t in want)
    assert err < TOL, f"{where}: logprob error {err:.2e}"
    top = sorted(want.values(), reverse=True)
    if top[0] - top[1] > TOL:
        assert tok.token_id == ref_tok.token_id, where


class Run:
    """Teacher-forced ESP run of some requests, tracking where each request's KV lives."""

    def __init__(self, cluster: ESPCluster, ref_out, prompts):
        self.cluster, self.ref, self.prompts = cluster, ref_out, prompts
        self.where: dict[str, set[int]] = {rid: set() for rid in prompts}
        self.compared = 0

    def new_requests(self, rids, n_out):
        return tuple(NewRequest(r, tuple(self.prompts[r]), params(n_out)) for r in rids)

    def check(self, sampled, expect: dict[str, int]):
        """expect: request -> output index its sampled token must match."""
        assert set(sampled) == set(expect), (sorted(sampled), sorted(expect))
        for rid, idx in expect.items():
            assert_matches(sampled[rid], self.ref[rid][idx], f"{rid} output {idx}")
            self.compared += 1

    def prefill(self, ring, items, new=(), n_out=8, releases=(), migrations=()):
        """`migrations` run first, in the same plan (a widened chunk's ring)."""
        plan = IterationPlan(
            next_id(),
            new_requests=tuple(new),
            prefills=(prefill_batch(ring, items),),
            migrations=tuple(migrations),
            releases=tuple(releases),
        )
        sampled = self.cluster.execute(plan)
        for m in migrations:
            self.where[m.request_id].add(m.dst)
        for it in items:
            self.where[it.request_id] |= {k.instance for k in it.keep if k.num_tokens}
        expect = {
            it.request_id: it.tokens.end - len(self.prompts[it.request_id]) for it in items if it.sample
        }
        self.check(sampled, expect)

    def decode(
        self,
        step_of: dict[str, int],
        spec: dict[str, tuple],
        instances=None,
        extra_holders: dict[str, tuple] | None = None,
    ):
        """One decode step. step_of[rid] = output index of the input token; spec[rid] =
        (master, new_kv_instance). Holders are where the KV is (plus extra_holders)."""
        items = []
        for rid, j in step_of.items():
            master, new_kv = spec[rid]
            toks = [t.token_id for t in self.ref[rid]]
            holders = self.where[rid] | set((extra_holders or {}).get(rid, ()))
            items.append(
                decode_item(
                    rid, toks[j], len(self.prompts[rid]) + j, master, holders, new_kv, output_prefix=toks[:j]
                )
            )
        used = {i for it in items for i in (it.master, it.new_kv_instance, *it.holders)}
        batch = DecodeBatch(next_id(), tuple(sorted(instances or used)), tuple(items))
        sampled = self.cluster.execute(IterationPlan(next_id(), decodes=(batch,)))
        for it in items:
            self.where[it.request_id].add(it.new_kv_instance)
        self.check(sampled, {rid: j + 1 for rid, j in step_of.items()})

    def migrate(self, migrations):
        self.cluster.execute(IterationPlan(next_id(), migrations=tuple(migrations)))
        for m in migrations:  # whole-holding migrations only in these tests
            self.where[m.request_id] = (self.where[m.request_id] - {m.src}) | {m.dst}

    def release(self, rids, reason=ReleaseReason.FINISHED, instances=range(WORLD)):
        self.cluster.execute(
            IterationPlan(next_id(), releases=tuple(Release(r, tuple(instances), reason) for r in rids))
        )
        for r in rids:
            self.where[r] = set()


# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_prefill_and_decode_matrix(env, P):
    """Mixed, uneven prompt lengths (some shorter than P) on a ring of P; KV kept on 1..P
    instances per request; decode with masters rotating, new tokens scattered (scale-up),
    a holder with zero tokens of a request, and an instance mastering nothing."""
    cluster, ref_worker = env
    lengths = [1, max(P - 1, 1), 7, 23]
    prompts = make_prompts(lengths, seed=P)
    n_out = 4
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    ring = tuple(range(P))
    items = [
        prefill_item(rid, 0, len(p), offset=i % P, keep=even_keep(0, len(p), ring[: 1 + i % P]))
        for i, (rid, p) in enumerate(prompts.items())
    ]
    run.prefill(ring, items, new=run.new_requests(prompts, n_out))
    for step in range(n_out - 1):
        spec = {rid: ((i + step) % P, (i + 2 * step) % P) for i, rid in enumerate(prompts)}
        extra = {"r2": (P - 1,)}  # P-1 may hold no token of r2: its partial must be empty
        run.decode({rid: step for rid in prompts}, spec, instances=ring, extra_holders=extra)
    assert run.compared == len(prompts) * n_out
    run.release(list(prompts))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_scale_down_from_4(env, d):
    """Prefill on 4 instances, KV kept on the first d only (filling the fullest first, so
    the short request lands on one instance); decode on those d."""
    cluster, ref_worker = env
    prompts = make_prompts([29, 3, 14], seed=10 + d)
    n_out = 3
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    decode_set = tuple(range(d))
    keeps = {
        "r0": even_keep(0, 29, decode_set),
        "r1": (KVKeep(d - 1, (TokenRange(0, 3),)),),
        "r2": even_keep(0, 14, decode_set[::-1]),
    }
    items = [
        prefill_item(rid, 0, len(p), offset=(3 * i + 1) % 4, keep=keeps[rid])
        for i, (rid, p) in enumerate(prompts.items())
    ]
    run.prefill((2, 0, 3, 1), items, new=run.new_requests(prompts, n_out))
    for rid in prompts:
        assert run.where[rid] <= set(decode_set)
    for step in range(n_out - 1):
        spec = {rid: ((i + step) % d, (i + step) % d) for i, rid in enumerate(prompts)}
        run.decode({rid: step for rid in prompts}, spec)
    run.release(list(prompts))


def test_scale_up_mid_decode(env):
    """A request decodes on instance 0 alone (single-instance path), then scales up: its
    new tokens go to 1, then 2; masters move; no KV moves."""
    cluster, ref_worker = env
    prompts = make_prompts([11, 6], seed=21)
    n_out = 6
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    items = [
        prefill_item("r0", 0, 11, 1, keep=even_keep(0, 11, (0,))),
        prefill_item("r1", 0, 6, 0, keep=even_keep(0, 6, (0,))),
    ]
    run.prefill((0, 1), items, new=run.new_requests(prompts, n_out))
    both = {"r0": 0, "r1": 0}
    run.decode(both, {"r0": (0, 0), "r1": (0, 0)})  # D = (0,): local execution
    run.decode({"r0": 1, "r1": 1}, {"r0": (0, 1), "r1": (0, 0)})  # r0 scales up onto 1
    run.decode({"r0": 2, "r1": 2}, {"r0": (1, 2), "r1": (0, 0)})  # ... and onto 2
    run.decode({"r0": 3, "r1": 3}, {"r0": (2, 2), "r1": (1, 1)})
    run.decode({"r0": 4, "r1": 4}, {"r0": (0, 1), "r1": (2, 1)})
    assert run.where["r0"] == {0, 1, 2} and run.where["r1"] == {0, 1}
    run.release(list(prompts))


def test_chunked_prefill(env):
    """A 30-token prompt in three chunks on changing rings; later chunks attend to the
    cached KV of earlier ones on their holders; a fresh request shares the last chunk's
    batch. Also a chunk whose queries' rank holds none of the cached KV."""
    cluster, ref_worker = env
    prompts = make_prompts([30, 9], seed=33)
    n_out = 3
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    new = run.new_requests(prompts, n_out)
    run.prefill((0, 1, 2), [prefill_item("r0", 0, 12, 2, even_keep(0, 12, (0, 1)), sample=False)], new=new)
    run.prefill(
        (3, 1, 0),
        [prefill_item("r0", 12, 20, 1, even_keep(12, 20, (3,)), cached_holders=(0, 1), sample=False)],
    )
    run.prefill(
        (2, 3, 0, 1),
        [
            prefill_item("r0", 20, 30, 3, even_keep(20, 30, (2, 0)), cached_holders=(0, 1, 3)),
            prefill_item("r1", 0, 9, 1, even_keep(0, 9, (1, 2, 3))),
        ],
    )
    assert run.where["r0"] == {0, 1, 2, 3}
    for step in range(n_out - 1):
        run.decode({"r0": step, "r1": step}, {"r0": (step % 4, 1), "r1": (3, 3)})
    run.release(list(prompts))


def test_chunk_after_its_ring_widened_by_migrations(env):
    """Widening (esp_core/sched/widen.py): r0's first chunk keeps its KV on instance 0
    alone; the next plan moves the tail of that KV onto 1 and 2 (an even third each) and,
    after those migrations, runs the next chunk on (0, 1, 2) attending to the cached
    prefix on all three; the last chunk and the decode steps follow on the wider ring."""
    cluster, ref_worker = env
    prompts = make_prompts([30], seed=21)
    n_out = 3
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    run.prefill(
        (0,),
        [prefill_item("r0", 0, 12, 0, even_keep(0, 12, (0,)), sample=False)],
        new=run.new_requests(prompts, n_out),
    )
    moves = [Migration("r0", 0, 1, (TokenRange(4, 8),)), Migration("r0", 0, 2, (TokenRange(8, 12),))]
    run.prefill(
        (0, 1, 2),
        [prefill_item("r0", 12, 21, 2, even_keep(12, 21, (0, 1, 2)), cached_holders=(0, 1, 2), sample=False)],
        migrations=moves,
    )
    held = [set(h) for _, _, h, _ in cluster.pool_states()]
    assert all("r0" in held[i] for i in (0, 1, 2)) and "r0" not in held[3]
    run.prefill(
        (2, 0, 1),
        [prefill_item("r0", 21, 30, 1, even_keep(21, 30, (0, 1, 2)), cached_holders=(0, 1, 2))],
    )
    for step in range(n_out - 1):
        run.decode({"r0": step}, {"r0": (step % 3, step % 3)})
    run.release(list(prompts))


def test_ring_ranks_without_tokens(env):
    """A ring rank may hold no token of the batch (a 1-token prompt or chunk on a ring of
    2-3): it still relays K/V blocks, keeps its planned share and serves cached KV."""
    cluster, ref_worker = env
    prompts = make_prompts([1, 5], seed=66)
    n_out = 3
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    new = run.new_requests(prompts, n_out)
    run.prefill((0, 1, 2), [prefill_item("r0", 0, 1, 1, even_keep(0, 1, (2,)))], new=new)
    run.prefill((0, 1), [prefill_item("r1", 0, 4, 0, even_keep(0, 4, (0,)), sample=False)])
    run.prefill((1, 0, 3), [prefill_item("r1", 4, 5, 2, even_keep(4, 5, (1,)), cached_holders=(0,))])
    for step in range(n_out - 1):
        run.decode({"r0": step, "r1": step}, {"r0": (1, 2), "r1": (3, 0)})
    run.release(list(prompts))


def test_preemption_then_reprefill(env):
    """Decode a while, preempt (KV dropped on every instance), re-prefill prompt + the
    generated tokens on another ring, continue decoding; another request keeps running."""
    cluster, ref_worker = env
    prompts = make_prompts([13, 8], seed=44)
    n_out = 7
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    items = [
        prefill_item("r0", 0, 13, 0, even_keep(0, 13, (0, 1))),
        prefill_item("r1", 0, 8, 1, even_keep(0, 8, (1,))),
    ]
    run.prefill((0, 1), items, new=run.new_requests(prompts, n_out))
    for step in range(2):
        run.decode({"r0": step, "r1": step}, {"r0": (0, 0), "r1": (1, 1)})
    # Preempt r0 (outputs 0..2 known; KV of positions < 13 + 2 dropped) ...
    run.release(["r0"], ReleaseReason.PREEMPTED, instances=(0, 1))
    free = [f for f, _, _, _ in cluster.pool_states()]
    assert free[0] == KV_SLOTS, "preempted KV must be freed"
    run.decode({"r1": 2}, {"r1": (1, 1)})
    # ... re-prefill prompt + outputs 0..2 (positions [0, 16)) on ring (2, 3, 0), in two
    # chunks, and sample output 3.
    outs = [t.token_id for t in ref["r0"]]
    run.prefill(
        (2, 3, 0),
        [prefill_item("r0", 0, 14, 2, even_keep(0, 14, (3,)), sample=False, extra_token_ids=outs[:1])],
    )
    run.prefill(
        (3, 2),
        [
            prefill_item(
                "r0", 14, 16, 1, even_keep(14, 16, (2,)), cached_holders=(3,), extra_token_ids=outs[1:3]
            )
        ],
    )
    for step in range(3, n_out - 1):
        run.decode({"r0": step, "r1": step}, {"r0": (2, 3), "r1": (1, 0)})
    run.release(list(prompts), ReleaseReason.ABORTED)


def test_migration_moves_kv_and_decoding_continues(env):
    """Compaction: r0's KV leaves instance 1 for 2 (and 3 -> 0, crossing it), then decode
    runs on the new placement; the sources hold nothing of the request afterwards."""
    cluster, ref_worker = env
    prompts = make_prompts([17, 5], seed=55)
    n_out = 4
    ref = reference(ref_worker, prompts, n_out)
    run = Run(cluster, ref, prompts)
    items = [
        prefill_item("r0", 0, 17, 1, even_keep(0, 17, (0, 1, 3))),
        prefill_item("r1", 0, 5, 0, even_keep(0, 5, (2, 3))),
    ]
    run.prefill((0, 1, 2, 3), items, new=run.new_requests(prompts, n_out))
    run.decode({"r0": 0, "r1": 0}, {"r0": (1, 1), "r1": (2, 3)})
    # exactly what each source holds (as the scheduler plans them): the destination
    # learns the sizes from the ranges alone
    run.migrate(
        [
            Migration("r0", 1, 2, (TokenRange(5, 11), TokenRange(17, 18))),
            Migration("r1", 2, 0, (TokenRange(0, 2),)),
            Migration("r0", 3, 0, (TokenRange(11, 17),)),
        ]
    )
    held = {rank: set(h) for rank, (_, _, h, _) in enumerate(cluster.pool_states())}
    assert "r0" not in held[1] and "r0" not in held[3] and "r1" not in held[2]
    for step in range(1, n_out - 1):
        run.decode({"r0": step, "r1": step}, {"r0": (2, 0), "r1": (3, 3)})
    run.release(list(prompts))
