"""`check_plan`: is an IterationPlan consistent with the state it was planned from?

Reusable by anyone driving a scheduler (tests, the simulator, the controller in debug
mode)::

    before = snapshot(scheduler)       # any object with the attributes used below
    plan = scheduler.schedule(now)
    check_plan(plan, before)           # raises PlanError on the first inconsistency

What it checks (the plan contract, docs/architecture.md):

* batches of the plan use disjoint instances (unless `allow_shared_instances`), none of
  them busy with running work; every instance id is in range;
* releases name exactly the instances holding the request's KV; a released request is
  in no batch of the plan; migrations move held positions;
* adoptions (prefix-cache hits) name exactly the source's instances, and what each
  instance keeps (or shares) is exactly the source's positions below `keep_len` there;
  a share starts at a shared segment's end or past the source's last one, and shared
  positions never migrate;
* prefill items: the chunk starts where the request's cached KV ends, `cached_holders`
  is exactly where that KV is, `keep` ranges partition the chunk's tokens and name only
  ring instances, the stripe offset is a valid rank, `sample` is set iff the chunk ends
  the sequence, `extra_token_ids` are the outputs re-prefilled;
* decode items: `holders` is exactly where the request's KV is, that KV covers exactly
  positions [0, position), the input token is the last output, master and
  new_kv_instance are instances of the batch, holders are inside the batch; a
  look-ahead batch (items without input token, lookahead.py) runs on one instance that
  is its master and new KV home, may be busy (with the group's running step) and sits
  one position past the last output;
* each request appears at most once in the plan's batches;
* every instance of a batch knows each of its requests (it had the request's state, or
  a join of the plan sends it the request), joins name only such instances, and a
  decode item's `output_prefix` gives the outputs an instance lacks (join_check.py);
* after releases, migrations, keeps and new tokens, no instance exceeds its capacity
  (shared slots counted once, and freed with their last holder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from esp_core.sched.join_check import join_error
from esp_core.sched.kv_accounting import merge_ranges, subtract_ranges
from esp_core.sched.plan import DecodeBatch, DecodeItem, IterationPlan, PrefillBatch, PrefillItem, TokenRange


class PlanError(AssertionError):
    pass


@dataclass(frozen=True)
class RequestView:
    prompt_len: int
    outputs: tuple[int, ...]
    known: dict[int, int] = field(default_factory=dict)  # instance -> outputs recorded there


@dataclass
class StateSnapshot:
    num_instances: int
    capacity: int
    busy: frozenset[int]
    kv: dict[str, dict[int, list[TokenRange]]]  # rid -> inst -> ranges (own and shared)
    requests: dict[str, RequestView] = field(default_factory=dict)
    # shared KV: segment id -> its positions [start, end), holders; rid -> its segments
    segments: dict[int, SegmentView] = field(default_factory=dict)
    chains: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class SegmentView:
    start: int
    end: int
    per_instance: dict[int, int]  # inst -> slots
    holders: set[str]


def snapshot(scheduler: Any) -> StateSnapshot:
    """Capture what check_plan needs from an `ESPScheduler` (before `schedule`)."""
    kv = scheduler.kv
    return StateSnapshot(
        num_instances=kv.num_instances,
        capacity=kv.capacity,
        busy=frozenset(i for i, b in enumerate(scheduler.busy) if b is not None),
        kv={rid: {i: list(kv.ranges_on(rid, i)) for i in kv.holders(rid)} for rid in kv.requests()},
        requests={
            rid: RequestView(st.prompt_len, tuple(st.outputs), dict(st.known))
            for rid, st in scheduler.requests.items()
        },
        **_shared_view(kv),
    )


def _shared_view(kv: Any) -> dict[str, Any]:
    ids = {id(g): n for n, g in enumerate(kv.segments())}
    segments = {
        ids[id(g)]: SegmentView(g.start, g.end, {i: g.tokens_on(i) for i in g.ranges}, set(g.holders))
        for g in kv.segments()
    }
    chains: dict[str, list[int]] = {}
    for gid, seg in segments.items():
        for h in seg.holders:
            chains.setdefault(h, []).append(gid)
    for chain in chains.values():
        chain.sort(key=lambda gid: segments[gid].start)
    return {"segments": segments, "chains": chains}


def _fail(msg: str) -> NoReturn:
    raise PlanError(msg)


# rid -> instance -> ranges: the KV a plan leaves, replayed step by step
KVMap = dict[str, dict[int, list[TokenRange]]]


def check_plan(
    plan: IterationPlan, before: StateSnapshot, *, allow_shared_instances: bool = False
) -> dict[int, int]:
    """Raise PlanError if `plan` is inconsistent; returns used slots per instance after it."""
    kv = {rid: {i: list(rs) for i, rs in per.items()} for rid, per in before.kv.items()}
    shared = _Shared(
        {
            g: SegmentView(v.start, v.end, dict(v.per_instance), set(v.holders))
            for g, v in before.segments.items()
        },
        {rid: list(c) for rid, c in before.chains.items()},
    )
    released = _check_releases(plan, before, kv, shared)
    _check_adoptions(plan, kv, shared)
    _check_migrations(plan, before.num_instances, kv, shared)
    _check_instances(plan, before, released, allow_shared_instances)
    for pb in plan.prefills:
        for pit in pb.items:
            _check_prefill_item(pb, pit, before, kv)
    for db in plan.decodes:
        for dit in db.items:
            _check_decode_item(db, dit, before, kv)
    error = join_error(plan, before.requests)
    if error is not None:
        _fail(error)
    used = {i: 0 for i in range(before.num_instances)}
    for per in kv.values():
        for i, rs in per.items():
            used[i] += sum(len(r) for r in rs)
    for chain in shared.chains.values():  # a segment is counted once, not per holder
        for gid in chain:
            for i, n in shared.segments[gid].per_instance.items():
                used[i] -= n
    for seg in shared.segments.values():
        for i, n in seg.per_instance.items():
            used[i] += n
    for i, u in used.items():
        if u > before.capacity:
            _fail(f"instance {i} over capacity: {u} > {before.capacity}")
    return used


@dataclass
class _Shared:
    """Shared segments replayed through the plan."""

    segments: dict[int, SegmentView]
    chains: dict[str, list[int]]

    def release(self, rid: str) -> None:
        for gid in self.chains.pop(rid, ()):
            seg = self.segments[gid]
            seg.holders.discard(rid)
            if not seg.holders:
                del self.segments[gid]

    def share(self, src: str, dst: str, keep_len: int, src_kv: dict[int, list[TokenRange]]) -> None:
        chain = self.chains.setdefault(src, [])
        end = self.segments[chain[-1]].end if chain else 0
        if keep_len < end and keep_len not in {self.segments[g].end for g in chain}:
            _fail(f"share of {src}'s [0, {keep_len}) splits a shared segment")
        if keep_len > end:
            span = TokenRange(end, keep_len)
            counts = {i: sum(len(x) for r in rs if (x := r.intersect(span))) for i, rs in src_kv.items()}
            gid = max(self.segments, default=-1) + 1
            self.segments[gid] = SegmentView(end, keep_len, {i: n for i, n in counts.items() if n}, {src})
            chain.append(gid)
        if not chain:
            del self.chains[src]
        taken = [g for g in chain if self.segments[g].end <= keep_len]
        for g in taken:
            self.segments[g].holders.add(dst)
        self.chains[dst] = taken

    def covers(self, rid: str, r: TokenRange) -> bool:
        """Some of `r` lies in `rid`'s shared segments."""
        return any(
            self.segments[g].start < r.end and r.start < self.segments[g].end
            for g in self.chains.get(rid, ())
        )


def _check_releases(plan: IterationPlan, before: StateSnapshot, kv: KVMap, shared: _Shared) -> set[str]:
    released: set[str] = set()
    for rel in plan.releases:
        holders = tuple(sorted(kv.get(rel.request_id, {})))
        if tuple(sorted(rel.instances)) != holders:
            _fail(f"release of {rel.request_id} on {rel.instances}, KV is on {holders}")
        if any(i in before.busy for i in rel.instances):
            _fail(f"release of {rel.request_id} on busy instances")
        kv.pop(rel.request_id, None)
        shared.release(rel.request_id)
        released.add(rel.request_id)
    return released


def _check_adoptions(plan: IterationPlan, kv: KVMap, shared: _Shared) -> None:
    for ad in plan.adoptions:
        src = kv.get(ad.src_rid, {})
        if kv.get(ad.dst_rid):
            _fail(f"adoption into {ad.dst_rid}, which already holds KV")
        keep = TokenRange(0, ad.keep_len)
        expected = {
            i: cut
            for i, rs in src.items()
            if (cut := [x for r in rs if (x := r.intersect(keep)) is not None])
        }
        # a share names the instances holding [0, keep_len) (a live source may hold more
        # elsewhere), an adoption every instance of the entry
        named = expected if ad.share else src
        if tuple(sorted(named)) != tuple(sorted(ad.instances)):
            _fail(f"adoption of {ad.src_rid} on {ad.instances}, KV is on {sorted(named)}")
        got = {k.instance: merge_ranges(k.ranges) for k in ad.kept}
        if got != expected or sum(len(r) for rs in got.values() for r in rs) != ad.keep_len:
            _fail(
                f"adoption {ad.src_rid} -> {ad.dst_rid}: kept {got}, expected {expected} = [0, {ad.keep_len})"
            )
        if ad.share or ad.src_rid in shared.chains:  # (else the kept KV changes owner)
            shared.share(ad.src_rid, ad.dst_rid, ad.keep_len, src)
        if not ad.share:
            del kv[ad.src_rid]
            shared.release(ad.src_rid)
        kv[ad.dst_rid] = got


def _check_migrations(plan: IterationPlan, n: int, kv: KVMap, shared: _Shared) -> None:
    for mig in plan.migrations:
        per = kv.get(mig.request_id, {})
        if any(shared.covers(mig.request_id, r) for r in mig.ranges):
            _fail(f"migration of shared KV: {mig}")
        if mig.src == mig.dst or not (0 <= mig.dst < n):
            _fail(f"bad migration {mig}")
        try:
            left = subtract_ranges(per.get(mig.src, []), mig.ranges)
        except ValueError as e:
            _fail(f"migration of unheld KV: {mig}: {e}")
        if left:
            per[mig.src] = left
        else:
            per.pop(mig.src, None)
        per[mig.dst] = merge_ranges([*per.get(mig.dst, []), *mig.ranges])


def _check_instances(
    plan: IterationPlan, before: StateSnapshot, released: set[str], allow_shared_instances: bool
) -> None:
    seen_inst: dict[int, int] = {}
    seen_req: set[str] = set()
    for batch in plan.batches():
        if len(set(batch.instances)) != len(batch.instances) or not batch.instances:
            _fail(f"batch {batch.batch_id}: empty or repeated instances {batch.instances}")
        for i in batch.instances:
            if not (0 <= i < before.num_instances):
                _fail(f"batch {batch.batch_id}: instance {i} out of range")
            # (a look-ahead step follows its group's running step on the same instance)
            if i in before.busy and not (isinstance(batch, DecodeBatch) and batch.is_lookahead):
                _fail(f"batch {batch.batch_id}: instance {i} is busy with running work")
            if i in seen_inst and not allow_shared_instances:
                _fail(f"instance {i} in batches {seen_inst[i]} and {batch.batch_id}")
            seen_inst[i] = batch.batch_id
        for it in batch.items:
            if it.request_id in seen_req:
                _fail(f"{it.request_id} twice in one plan")
            if it.request_id in released:
                _fail(f"{it.request_id} released and scheduled in one plan")
            seen_req.add(it.request_id)


def _check_prefill_item(batch: PrefillBatch, it: PrefillItem, before: StateSnapshot, kv: KVMap) -> None:
    rid, ring = it.request_id, set(batch.instances)
    view = before.requests.get(rid)
    if view is None:
        _fail(f"prefill of unknown request {rid}")
    per = kv.setdefault(rid, {})
    held = merge_ranges(r for rs in per.values() for r in rs)
    want = [TokenRange(0, it.tokens.start)] if it.tokens.start else []
    if held != want:
        _fail(f"{rid}: chunk starts at {it.tokens.start} but cached KV is {held}")
    if tuple(sorted(it.cached_holders)) != tuple(sorted(per)):
        _fail(f"{rid}: cached_holders {it.cached_holders} != KV holders {sorted(per)}")
    if not set(it.cached_holders) <= ring:
        _fail(f"{rid}: cached holders {it.cached_holders} outside ring {batch.instances}")
    if not (0 <= it.stripe_offset < len(batch.instances)):
        _fail(f"{rid}: stripe offset {it.stripe_offset} for DoP {len(batch.instances)}")
    seq = view.prompt_len + len(view.outputs)
    if it.tokens.end > seq or len(it.tokens) == 0:
        _fail(f"{rid}: chunk {it.tokens} outside sequence of {seq}")
    if it.sample != (it.tokens.end == seq):
        _fail(f"{rid}: sample={it.sample} but chunk ends at {it.tokens.end} of {seq}")
    lo = max(it.tokens.start, view.prompt_len) - view.prompt_len
    hi = max(it.tokens.end, view.prompt_len) - view.prompt_len
    if tuple(it.extra_token_ids) != tuple(view.outputs[lo:hi]):
        _fail(f"{rid}: extra_token_ids {it.extra_token_ids} != outputs[{lo}:{hi}]")
    kept: list[TokenRange] = []
    for k in it.keep:
        if k.instance not in ring:
            _fail(f"{rid}: keep on {k.instance} outside ring {batch.instances}")
        kept.extend(k.ranges)
        per[k.instance] = merge_ranges([*per.get(k.instance, []), *k.ranges])
    try:
        if merge_ranges(kept) != [it.tokens]:
            _fail(f"{rid}: keep ranges {sorted(kept)} do not partition {it.tokens}")
    except ValueError:
        _fail(f"{rid}: keep ranges overlap: {sorted(kept)}")


def _check_decode_item(batch: DecodeBatch, it: DecodeItem, before: StateSnapshot, kv: KVMap) -> None:
    rid, insts = it.request_id, set(batch.instances)
    view = before.requests.get(rid)
    if view is None or not view.outputs:
        _fail(f"decode of {rid} with no output yet")
    per = kv.get(rid, {})
    if tuple(sorted(it.holders)) != tuple(sorted(per)):
        _fail(f"{rid}: holders {it.holders} != KV holders {sorted(per)}")
    held = merge_ranges(r for rs in per.values() for r in rs)
    if held != [TokenRange(0, it.position)]:
        _fail(f"{rid}: KV {held} does not cover [0, {it.position})")
    if batch.is_lookahead:
        _check_lookahead_item(batch, it, view)
    else:
        if it.position != view.prompt_len + len(view.outputs) - 1:
            _fail(f"{rid}: position {it.position} for {len(view.outputs)} outputs")
        if it.input_token != view.outputs[-1]:
            _fail(f"{rid}: input token {it.input_token} != last output {view.outputs[-1]}")
    if it.master not in insts or it.new_kv_instance not in insts:
        _fail(f"{rid}: master/new_kv outside batch {batch.instances}")
    if not set(it.holders) <= insts:
        _fail(f"{rid}: holders {it.holders} outside batch {batch.instances}")
    per[it.new_kv_instance] = merge_ranges(
        [*per.get(it.new_kv_instance, []), TokenRange(it.position, it.position + 1)]
    )


def _check_lookahead_item(batch: DecodeBatch, it: DecodeItem, view: RequestView) -> None:
    """A look-ahead step (input: the token its running step samples) runs on one
    instance, which masters it and stores its new token; its position is the one after
    the running step's (whose KV slot the running step already holds)."""
    rid = it.request_id
    if it.input_token is not None:
        _fail(f"batch {batch.batch_id}: look-ahead batch mixes in {rid} with input token {it.input_token}")
    if len(batch.instances) != 1 or (it.master, it.new_kv_instance) != (batch.instances[0],) * 2:
        _fail(f"{rid}: look-ahead step on {batch.instances}, master {it.master}, new KV {it.new_kv_instance}")
    if it.position != view.prompt_len + len(view.outputs):
        _fail(f"{rid}: look-ahead position {it.position} for {len(view.outputs)} outputs")
