"""ESPScheduler: LoongServe's global manager, event-driven (DESIGN 4).

Per call, `schedule(now)` decides only new work on idle instances, in this order:

1. releases whose instances are idle (finished / aborted requests);
2. prefills: dispatching (`dispatch.py`), elastic instance allocation
   (`allocation.py`: idle instances, plus paused or compacted decode groups), batching
   by the interval DP (`batching.py`), scale-down keeps (`scaling.py`); with chunked
   prefill, long prompts go chunk by chunk and short requests may run in between;
3. the next step of every decode group whose previous step finished: masters, new-token
   placement, scale-up (KV full, or compute-bound), preemption when nothing fits.

`update(result, now)` records one batch's completion: sampled tokens, finishes (max
tokens, EOS unless ignore_eos, stop ids, min_tokens), new decode groups (merged with
groups sharing instances), resumed paused groups.

State invariants (`check_invariants`, run after every step in tests): KV accounting
consistent and never over-committed; decode groups own disjoint instance sets that hold
all their requests' KV; instances busy exactly with running batches.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable

import numpy as np

from esp_core.sched.allocation import GroupView, allocate
from esp_core.sched.batching import plan_batches
from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.dispatch import Candidate, PeakMemoryCheck, dispatch_fcfs
from esp_core.sched.interface import (
    ClusterSpec,
    FinishReason,
    RequestEvent,
    RequestRejected,
)
from esp_core.sched.kv_accounting import KVAccounting
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    Migration,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    SampledToken,
    TokenRange,
)
from esp_core.sched.scaling import (
    assign_masters,
    choose_new_kv_instance,
    masters_per_instance,
    place_keeps,
    spread_keeps,
)
from esp_core.sched.state import DecodeGroup, Phase, RequestState, RunningBatch


class ESPScheduler:
    def __init__(
        self, cluster: ClusterSpec, cost_model: CostModel, config: ESPSchedulerConfig | None = None
    ) -> None:
        self.cluster = cluster
        self.cost = cost_model
        self.config = config or ESPSchedulerConfig()
        self.tp = cluster.tp_per_instance
        n = cluster.num_instances
        self.kv = KVAccounting(n, cluster.kv_slots_per_instance)
        self.requests: dict[str, RequestState] = {}
        self._waiting: list[tuple[float, int, str]] = []  # (arrival, seq, rid), sorted
        self._waiting_key: dict[str, tuple[float, int, str]] = {}
        self.groups: dict[int, DecodeGroup] = {}
        self.owner: list[int | None] = [None] * n  # decode group owning each instance
        self.busy: list[int | None] = [None] * n  # running batch on each instance
        self.running: dict[int, RunningBatch] = {}
        self._pending_release: dict[str, ReleaseReason] = {}
        self._resident: dict[str, None] = {}  # requests holding (or about to hold) KV
        # the memory check's aggregates over them, kept current (`_set_check`): Σ check_len
        # exactly, and an upper bound of max check_remaining (tightened when computed)
        self._resident_len = 0
        self._resident_rem_ub = 0
        self._steps_since_prefill_check = 0
        self._last_short_arrival = -math.inf  # for short-request isolation
        self._claimed: set[int] = set()  # holders an aged chunk waits for (per call)
        self._partial_memo: set[int] | None = None  # _partial_holders within a call
        self._defer_release: dict[str, ReleaseReason] = {}  # in a running batch
        self._ids = itertools.count(1)
        self._plan_ids = itertools.count(1)
        self._seq = itertools.count()
        self._stripe = itertools.count()
        self.stats = {
            "preemptions": 0,
            "migrations": 0,
            "scale_ups": 0,
            "pauses": 0,
            "prefill_batches": 0,
            "decode_steps": 0,
            "chunks": 0,
            "budget_chunks": 0,
        }

    # ================================================================== protocol

    def add_request(self, request: NewRequest, now: float) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise RequestRejected(f"duplicate request id {rid!r}")
        if request.prompt_len < 1:
            raise RequestRejected("empty prompt")
        if request.sampling.max_tokens < 1:
            raise RequestRejected("max_tokens must be >= 1")
        need = request.prompt_len + request.sampling.max_tokens
        total = self.cluster.num_instances * self.cluster.kv_slots_per_instance
        limit = min(total, self.config.max_model_len or total)
        if need > limit:
            raise RequestRejected(
                f"prompt ({request.prompt_len}) + max_tokens ({request.sampling.max_tokens}) "
                f"= {need} tokens exceeds the context this group can hold ({limit})",
                code="context_length_exceeded",
            )
        st = RequestState(req=request, arrival=request.arrival_time or now, wait_since=now)
        if request.prompt_len <= self.config.chunk_tokens:
            self._last_short_arrival = now
        self.requests[rid] = st
        self._enqueue(st)

    def add_resumed_request(self, request: NewRequest, output_token_ids: Iterable[int], now: float) -> None:
        """A request that already produced `output_token_ids` (streamed to its client) and
        lost its KV (the group was rebuilt after a fault): it waits like a preempted
        request, is re-prefilled over prompt + those outputs (`extra_token_ids`) and
        continues to its original max_tokens. The outputs stay its output history, so
        penalties and (seed, output index) sampling continue as if nothing happened."""
        outputs = [int(t) for t in output_token_ids]
        if len(outputs) >= request.sampling.max_tokens:
            raise RequestRejected(
                f"request {request.request_id!r} already has "
                f"{len(outputs)} of {request.sampling.max_tokens} tokens"
            )
        self.add_request(request, now)
        if outputs:
            st = self.requests[request.request_id]
            st.outputs = outputs
            st.prefill_target = st.seq_len
            st.check_remaining = st.remaining

    def abort_request(self, request_id: str, now: float) -> list[RequestEvent]:
        st = self.requests.get(request_id)
        if st is None or st.phase == Phase.DONE:
            return []
        st.aborted = True
        self._finish(st, ReleaseReason.ABORTED)
        return [
            RequestEvent(
                request_id,
                finish_reason=FinishReason.ABORT,
                num_prompt_tokens=st.prompt_len,
                num_output_tokens=len(st.outputs),
            )
        ]

    def has_unfinished(self) -> bool:
        return bool(
            self._waiting
            or self.running
            or self._pending_release
            or self._defer_release
            or any(g.requests for g in self.groups.values())
        )

    def kv_free_slots(self) -> list[int]:
        return self.kv.free_slots()

    # ================================================================== schedule

    def schedule(self, now: float) -> IterationPlan:
        self._claimed = set()
        self._partial_memo = None
        try:
            return self._schedule(now)
        finally:
            self._partial_memo = None  # outside a call, always recomputed

    def _schedule(self, now: float) -> IterationPlan:
        releases = self._emit_releases()
        migrations: list[Migration] = []
        new_requests: list[NewRequest] = []
        prefills: list[PrefillBatch] = []
        paused: list[str] = []
        if self._waiting:
            self._plan_prefills(now, prefills, migrations, new_requests, paused)
        decodes = self._plan_decodes(now, releases)
        return IterationPlan(
            plan_id=next(self._plan_ids),
            new_requests=tuple(new_requests),
            prefills=tuple(prefills),
            decodes=tuple(decodes),
            migrations=tuple(migrations),
            releases=tuple(releases),
            paused=tuple(paused),
        )

    # ------------------------------------------------------------------ releases

    def _emit_releases(self) -> list[Release]:
        out = []
        for rid, reason in list(self._pending_release.items()):
            holders = self.kv.holders(rid)
            if any(self.busy[i] is not None for i in holders):
                continue  # its instances are lent to a running prefill: later
            del self._pending_release[rid]
            self.kv.release(rid)
            self._forget(rid)
            if holders:
                out.append(Release(rid, holders, reason))
        return out

    def _forget(self, rid: str) -> None:
        """Drop a finished request whose KV is gone (keeps the state small)."""
        st = self.requests.get(rid)
        if (
            st is not None
            and st.phase == Phase.DONE
            and st.batch is None
            and rid not in self._pending_release
            and rid not in self._defer_release
        ):
            del self.requests[rid]

    # ------------------------------------------------------------------ prefills

    def _idle(self) -> list[int]:
        return [i for i, b in enumerate(self.busy) if b is None]

    def _partial_holders(self) -> set[int]:
        """Instances holding KV of chunked requests between chunks (the next chunk needs
        its holders). Memoised within one `schedule` call: requests become PARTIAL only
        in `update`, so during a call the set can only shrink (a chunk planned now), and
        every use treats a holder just planned as busy anyway. Returns a fresh set."""
        if not self.config.chunked_prefill:
            return set()  # (requests are PARTIAL only between chunks)
        if self._partial_memo is None:
            out: set[int] = set()
            for _, _, rid in self._waiting:
                if self.requests[rid].phase == Phase.PARTIAL:
                    out.update(self.kv.holders(rid))
            self._partial_memo = out
        return set(self._partial_memo)

    def _long_instances(self) -> set[int]:
        """Instances a long (chunked) prompt occupies: its holders between chunks and
        the rings of running chunks."""
        out = self._partial_holders()
        for b in self.running.values():
            if b.chunk:
                out.update(b.instances)
        return out

    def _long_instance_cap(self, now: float, budget: bool = False) -> int:
        """How many instances long prompts' chunks may occupy now: all, or all but
        `short_reserved_instances` while short requests are arriving. `budget`: beyond
        how many a chunk is cut to `short_wait_budget_s` -- while shorts arrive, as soon
        as no instance is left free of long prompts (also with no reserved instance)."""
        cfg, n = self.config, self.cluster.num_instances
        if now - self._last_short_arrival <= cfg.short_activity_window_s:
            reserved = max(cfg.short_reserved_instances, 1 if budget else 0)
            return max(n - reserved, 1)
        return n

    def _is_long(self, st: RequestState) -> bool:
        return self.config.chunked_prefill and (
            st.phase == Phase.PARTIAL or st.prefill_target - st.prefilled > self.config.chunk_tokens
        )

    def _plan_prefills(self, now, prefills, migrations, new_requests, paused) -> None:
        idle = self._idle()
        if not idle:
            return
        if not any(self.owner[i] is None for i in idle):
            # only decode instances between steps: borrowing them is reconsidered every
            # few decode steps, not after each one (LoongServe: every 10)
            if self._steps_since_prefill_check < self.config.prefill_check_interval_steps:
                return
        self._steps_since_prefill_check = 0
        taken: set[int] = set()
        longs = (
            [self.requests[rid] for _, _, rid in self._waiting if self._is_long(self.requests[rid])]
            if self.config.chunked_prefill
            else []
        )
        aged = [st for st in longs if now - st.wait_since >= self.config.long_request_max_wait_s]
        aged_ids = {st.rid for st in aged}
        # long prompts that could not start (KV, instances) and were passed by later
        # ones: bounded skip-ahead as in dispatch, else a huge prompt waiting for room
        # is passed by smaller ones forever (seen: 480K tokens waiting 800 s on Mixed)
        unstarted: list[RequestState] = []
        for st in aged:  # starving chunked requests go before short ones
            self._try_chunk(st, now, taken, prefills, new_requests, paused, unstarted)
            if st.phase == Phase.PARTIAL:
                self._claim_holders(st, taken)
        self._plan_round(now, taken, prefills, migrations, new_requests, paused)
        for st in longs:
            if st.rid in aged_ids or st.phase not in (Phase.WAITING, Phase.PARTIAL):
                continue
            if (
                st.phase == Phase.WAITING
                and not self.kv.holders(st.rid)
                and not any(
                    b is None and i not in taken and self.owner[i] is None for i, b in enumerate(self.busy)
                )
            ):
                continue  # a first chunk needs an idle instance no group owns: none left
            self._try_chunk(st, now, taken, prefills, new_requests, paused, unstarted)

    def _try_chunk(
        self, st, now, taken, prefills, new_requests, paused, unstarted: list[RequestState]
    ) -> None:
        """`_plan_chunk`, with a first chunk not planned ahead of an earlier long prompt
        that has been passed `max_skip_ahead` times."""
        # (admitted already -- its whole prompt reserved -- counts as started: blocking
        # it could leave its reservation in the way of the request it waits for)
        first = st.phase == Phase.WAITING and not self.kv.holders(st.rid) and not self.kv.reserved(st.rid)
        if first and any(u.times_passed >= self.config.max_skip_ahead for u in unstarted):
            return
        self._plan_chunk(st, now, taken, prefills, new_requests, paused)
        if not first:
            return
        if st.phase == Phase.WAITING:
            unstarted.append(st)
        else:
            for u in unstarted:
                u.times_passed += 1

    def _claim_holders(self, st: RequestState, taken: set[int]) -> None:
        """An aged chunked request waits for its holders: start no new prefill there and
        no further steps of the decode groups on them, so that they drain (a ring needs
        all its instances idle at once, which a stream of short work may never leave).
        Only when running work blocks it (that work's completion comes back as an event)."""
        holders = self.kv.holders(st.rid)
        owners = {self.owner[i] for i in holders} - {None}
        if any(self.busy[i] is not None for i in holders) or any(not self.groups[o].ready for o in owners):
            taken.update(holders)
            self._claimed.update(holders)

    def _resident_check(self) -> PeakMemoryCheck:
        # the per-request arrays (thousands of residents) are gathered only when a check
        # needs the exact peak; until then the kept aggregates bound it
        def load() -> tuple[list[int], list[int]]:
            states = [self.requests[rid] for rid in self._resident]
            rem = [st.check_remaining for st in states]
            self._resident_rem_ub = max(rem, default=0)
            return rem, [st.check_len for st in states]

        total = self.cluster.num_instances * self.cluster.kv_slots_per_instance
        n = len(self._resident)
        bound = self._resident_rem_ub * n + self._resident_len if n else 0
        return PeakMemoryCheck.deferred(load, bound, total)

    def _set_check(self, st: RequestState, remaining: int, length: int) -> None:
        """Set the memory check's view of a request (keeps the resident aggregates)."""
        if st.rid in self._resident:
            self._resident_len += length - st.check_len
            self._resident_rem_ub = max(self._resident_rem_ub, remaining)
        st.check_remaining = remaining
        st.check_len = length

    def _make_resident(self, st: RequestState) -> None:
        if st.rid not in self._resident:
            self._resident[st.rid] = None
            self._resident_len += st.check_len
            self._resident_rem_ub = max(self._resident_rem_ub, st.check_remaining)

    def _drop_resident(self, st: RequestState) -> None:
        if st.rid in self._resident:
            del self._resident[st.rid]
            self._resident_len -= st.check_len

    def _group_view(self, g: DecodeGroup) -> GroupView:
        insts = tuple(sorted(g.instances))
        kv_tok = {i: 0 for i in insts}
        for rid in g.requests:
            for i, n in self.kv.placement(rid).items():
                kv_tok[i] += n
        borrowable = g.steps_since_borrow >= self.config.min_decode_steps_between_borrows
        return GroupView(
            g.gid,
            insts,
            len(g.requests),
            tuple(int(self.kv.free[i]) for i in insts),
            tuple(kv_tok[i] for i in insts),
            borrowable,
        )

    def _wait_alt(self, now: float) -> float:
        """Estimated wait until instances free up without borrowing any."""
        ends = [b.est_end - now for b in self.running.values() if b.kind == "prefill"]
        if ends:
            return max(min(ends), 0.0)
        drains = []
        for g in self.groups.values():
            if g.requests:
                steps = min(self.requests[r].remaining for r in g.requests)
                drains.append(steps * self._decode_estimate(g))
        return min(drains) if drains else math.inf

    def _decode_estimate(self, g: DecodeGroup) -> float:
        if self.config.constant_decode_time_s is not None:
            return self.config.constant_decode_time_s
        view = self._group_view(g)
        m = max(len(view.instances), 1)
        return self.cost.decode_time(
            math.ceil(len(g.requests) / m), max(view.kv_tokens, default=0), m, self.tp
        )

    def _dispatch_candidates(self, max_scan: int):
        """Waiting, non-chunked requests in queue order, at most `max_scan` of them."""
        n = 0
        for _, _, rid in self._waiting:
            st = self.requests[rid]
            if st.phase != Phase.WAITING or self._is_long(st):
                continue
            yield Candidate(rid, st.prefill_target - st.prefilled, st.remaining, st.times_passed)
            n += 1
            if n >= max_scan:
                return

    def _plan_round(self, now, taken, prefills, migrations, new_requests, paused) -> None:
        """One non-chunked prefill round: dispatch, allocate, batch, place."""
        cfg = self.config
        idle = [i for i in self._idle() if i not in taken]
        partial = set() if cfg.short_kv_on_long_holders else self._partial_holders()
        free_idle = [i for i in idle if self.owner[i] is None]
        ready = [
            g
            for g in self.groups.values()
            if g.ready and g.requests and all(self.busy[i] is None and i not in taken for i in g.instances)
        ]
        views = [self._group_view(g) for g in ready]
        free_now = self.kv.free  # one snapshot: nothing below changes KV before the keeps
        keep_free = lambda i: 0 if i in partial else int(free_now[i])  # noqa: E731
        # slots reserved for chunked prompts' later chunks are not available to others
        room_max = min(
            sum(keep_free(i) for i in free_idle) + sum(sum(v.free_slots) for v in views if v.borrowable),
            self.kv.unreserved_free,
        )
        dop_max = len(free_idle) + sum(len(v.instances) for v in views if v.borrowable)
        if dop_max == 0:
            return
        # built lazily: dispatch usually stops (time budget, request cap) long before
        # the end of a 512-deep queue, and nothing it reads changes while it scans
        queue = self._dispatch_candidates(cfg.max_scan)
        first = next(queue, None)
        if first is None:
            return
        queue = itertools.chain((first,), queue)
        tp = self.tp
        res = dispatch_fcfs(
            queue,
            self._resident_check(),
            room_max,
            max_skip_ahead=cfg.max_skip_ahead,
            max_requests=cfg.max_prefill_requests,
            max_scan=cfg.max_scan,
            time_fn=lambda s1, s2: self.cost.prefill_time(dop_max, s1, s2, tp),
            max_time_s=cfg.max_prefill_time_s,
        )
        for rid, n in res.passed:
            self.requests[rid].times_passed += n
        admitted = [self.requests[r] for r in res.admitted]
        if not admitted:
            return
        lens = [st.prefill_target - st.prefilled for st in admitted]
        s1, s2 = sum(lens), sum(x * x for x in lens)
        alloc = allocate(
            free_instances=free_idle,
            free_room=sum(keep_free(i) for i in free_idle),
            groups=views,
            need_tokens=s1,
            num_new=len(admitted),
            prefill_time=lambda d: self.cost.prefill_time(d, s1, s2, tp),
            wait_alt_s=self._wait_alt(now),
            gain_vs_delay=cfg.gain_vs_delay,
            allow_migration=cfg.allow_migration and not cfg.is_loongserve,
            migration_time=lambda n: self.cost.migration_time(n, tp=tp),
            growth_margin=cfg.headroom_tokens,
        )
        if not alloc.instances:
            return
        ring_pool = list(alloc.instances)
        free_for_keep = np.array([keep_free(i) for i in ring_pool], dtype=np.int64)
        coeffs = self.cost.prefill_coeff_arrays(len(ring_pool), tp)
        result = None
        while admitted:
            lens = [st.prefill_target - st.prefilled for st in admitted]
            # the headroom is a preference: without it when nothing fits otherwise
            for headroom in dict.fromkeys((cfg.headroom_tokens, 0)):
                result = plan_batches(
                    lens,
                    free_for_keep,
                    coeffs,
                    max_request_groups=cfg.dp_max_request_groups,
                    max_instance_groups=cfg.dp_max_instance_groups,
                    headroom=headroom,
                )
                if result is not None:
                    break
            if result is not None:
                break
            admitted.pop()  # drop the latest admitted until the rest fits
        if not admitted or result is None:
            return
        # compaction migrations happen before any batch of this plan (plan order)
        for gid, freed in alloc.compacted.items():
            self._compact(self.groups[gid], freed, migrations)
        used: set[int] = set()
        free = self.kv.free.tolist()  # (plain ints: cheaper to index per request)
        for i in partial:
            free[i] = 0
        for ba in result.batches:
            ring = tuple(ring_pool[j] for j in ba.instances)
            batch_reqs = [admitted[j] for j in ba.requests]
            items = []
            for st in batch_reqs:
                tokens = TokenRange(st.prefilled, st.prefill_target)
                keeps = place_keeps(tokens, ring, free, headroom=cfg.headroom_tokens)
                if keeps is None:  # cannot happen when the DP's room check held
                    raise AssertionError(f"no room to keep {st.rid} on {ring}")
                items.append(self._prefill_item(st, tokens, ring, keeps, new_requests))
                for k in keeps:
                    self.kv.place(st.rid, k.instance, k.ranges)
            self._start_prefill(
                now, ring, items, batch_reqs, prefills, est=ba.est_time_s + alloc.migration_delay_s
            )
            used.update(ring)
        taken.update(used)
        for gid in alloc.paused_groups:
            g = self.groups[gid]
            if g.paused_by:
                self.stats["pauses"] += 1
                g.steps_since_borrow = 0
                paused.extend(g.requests)

    def _compact(self, g: DecodeGroup, freed: Iterable[int], migrations: list[Migration]) -> None:
        """Move the group's KV off `freed` onto its other instances (most room first)."""
        freed = set(freed)
        keep = sorted(g.instances - freed)
        for src in sorted(freed):
            for rid in list(g.requests):
                for rng in self.kv.ranges_on(rid, src):
                    pos = rng.start
                    while pos < rng.end:
                        dst = max(keep, key=lambda i: (int(self.kv.free[i]), -i))
                        take = min(int(self.kv.free[dst]), rng.end - pos)
                        if take <= 0:
                            raise AssertionError("compaction without room")
                        piece = (TokenRange(pos, pos + take),)
                        self.kv.move(rid, src, dst, piece)
                        migrations.append(Migration(rid, src, dst, piece))
                        self.stats["migrations"] += 1
                        pos += take
            g.instances.discard(src)
            self.owner[src] = None

    def _prefill_item(
        self,
        st: RequestState,
        tokens: TokenRange,
        ring: tuple[int, ...],
        keeps,
        new_requests: list[NewRequest],
    ) -> PrefillItem:
        if not st.sent:
            new_requests.append(st.req)
            st.sent = True
        # called before this chunk's keeps are placed: the holders of positions < start
        cached = self.kv.holders(st.rid) if tokens.start else ()
        return PrefillItem(
            request_id=st.rid,
            tokens=tokens,
            stripe_offset=next(self._stripe) % len(ring),
            keep=tuple(keeps),
            cached_holders=cached,
            sample=tokens.end == st.prefill_target,
            extra_token_ids=st.extra_token_ids(tokens.start, tokens.end),
        )

    def _start_prefill(self, now, ring, items, batch_reqs, prefills, est: float, chunk: bool = False) -> None:
        bid = next(self._ids)
        batch = PrefillBatch(batch_id=bid, instances=ring, items=tuple(items))
        prefills.append(batch)
        borrowed = sorted({self.owner[i] for i in ring if self.owner[i] is not None})
        for gid in borrowed:
            self.groups[gid].paused_by.add(bid)
        for i in ring:
            self.busy[i] = bid
        for st, it in zip(batch_reqs, items):
            self._dequeue(st)
            self._make_resident(st)
            self._set_check(st, st.remaining, st.prefill_target)
            st.phase = Phase.PREFILLING
            st.batch = bid
            st.prefilled = it.tokens.end
            st.times_passed = 0
        self.running[bid] = RunningBatch(
            bid,
            "prefill",
            ring,
            tuple(st.rid for st in batch_reqs),
            now,
            now + est,
            sample={it.request_id: it.sample for it in items},
            borrowed_groups=tuple(borrowed),
            chunk=chunk,
        )
        self.stats["prefill_batches"] += 1

    def _plan_chunk(self, st: RequestState, now, taken, prefills, new_requests, paused) -> None:
        """Plan the next chunk of a chunked request on its holders plus idle instances."""
        cfg, tp = self.config, self.tp
        holders = self.kv.holders(st.rid)
        borrow: set[int] = set()  # decode groups (of shorts) on the holders: paused
        for i in holders:
            if self.busy[i] is not None or i in taken:
                return
            if self.owner[i] is not None:
                g = self.groups[self.owner[i]]
                if not (
                    cfg.short_kv_on_long_holders
                    and g.ready
                    and g.steps_since_borrow >= 1
                    and all(self.busy[j] is None and j not in taken for j in g.instances)
                ):
                    return
                borrow.add(g.gid)
        start = st.prefilled
        end = min(start + cfg.chunk_tokens, st.prefill_target)
        partial = self._partial_holders() - set(holders)
        extra = [i for i in self._idle() if i not in taken and self.owner[i] is None and i not in holders]
        extra.sort(key=lambda i: (i in partial, -int(self.kv.free[i]), i))
        # short-request isolation: instances not yet serving a long prompt join the
        # ring only while long prompts stay within their cap; beyond it only when the
        # chunk's KV does not fit otherwise (a time-based wait could deadlock: nothing
        # else may be running to wake the scheduler when shorts stop arriving)
        longs = self._long_instances() | set(holders)
        allowed = self._long_instance_cap(now) - len(longs)
        within, beyond = [], []
        for i in extra:
            if i in longs or allowed > 0:
                allowed -= i not in longs
                within.append(i)
            else:
                beyond.append(i)
        extra = within + beyond
        if not holders and not within:
            return
        if start == 0 and not self.kv.reserved(st.rid):
            check = self._resident_check()
            if not check.fits(st.remaining, st.prefill_target) or not self.kv.can_admit(st.prefill_target):
                return
            self.kv.admit(st.rid, st.prefill_target)  # the whole prompt, chunk by chunk
            admitted_now = True
        else:
            admitted_now = False
        chunk = end - start
        best = None
        # (spread KV: later chunks on the holders alone unless the KV needs more room)
        max_extra = 0 if cfg.spread_chunk_kv and holders else len(within)
        for n_extra in range(0, max_extra + 1):
            dop = len(holders) + n_extra
            if dop == 0:
                continue
            t = self.cost.prefill_time(dop, chunk, chunk * chunk, tp) + self.cost.chunk_cross_time(
                chunk, start, len(holders), tp
            )
            if best is None or t < best[0]:
                best = (t, n_extra)
        if best is None:
            if admitted_now:
                self.kv.unreserve(st.rid)
            return
        # grow the ring beyond the time-optimal size only if the KV needs it
        t_best, n_extra = best
        free = self.kv.free.copy()
        for i in partial:
            free[i] = 0
        while True:
            ring = tuple(holders) + tuple(extra[:n_extra])
            keeps = self._chunk_keeps(TokenRange(start, end), ring, free.copy(), holders)
            if keeps is not None and all(self.kv.can_place(st.rid, k.instance, k.num_tokens) for k in keeps):
                break
            if n_extra >= len(extra):
                if admitted_now:  # not started: its reservation must not block others
                    self.kv.unreserve(st.rid)
                return
            n_extra += 1
        if len(longs | set(ring)) > self._long_instance_cap(now, budget=True):
            # the chunk takes the shorts' instances too: keep it short
            cut = self._budget_chunk(start, end, len(ring), len(holders))
            if cut < end:
                end = cut
                self.stats["budget_chunks"] += 1
                keeps = self._chunk_keeps(TokenRange(start, end), ring, free.copy(), holders)
                assert keeps is not None, "a shorter chunk fits where the longer one did"
        chunk = end - start
        t_best = self.cost.prefill_time(len(ring), chunk, chunk * chunk, tp) + self.cost.chunk_cross_time(
            chunk, start, len(holders), tp
        )
        tokens = TokenRange(start, end)
        item = self._prefill_item(st, tokens, ring, keeps, new_requests)
        for k in keeps:
            self.kv.place(st.rid, k.instance, k.ranges)
        self._start_prefill(now, ring, [item], [st], prefills, est=t_best, chunk=True)
        taken.update(ring)
        for gid in sorted(borrow):
            g = self.groups[gid]
            taken.update(g.instances)  # it cannot step while paused
            g.steps_since_borrow = 0
            self.stats["pauses"] += 1
            paused.extend(g.requests)
        self.stats["chunks"] += 1

    def _chunk_keeps(self, tokens: TokenRange, ring, free: np.ndarray, holders):
        if self.config.spread_chunk_kv:
            return spread_keeps(tokens, ring, free, headroom=self.config.headroom_tokens)
        return place_keeps(tokens, ring, free, headroom=self.config.headroom_tokens, prefer=holders)

    def _budget_chunk(self, start: int, end: int, dop: int, num_holders: int) -> int:
        """End of the longest chunk from `start` (at most to `end`, at least
        `min_chunk_tokens`) whose cost-model time fits `short_wait_budget_s`."""
        cfg, tp = self.config, self.tp

        def fits(n: int) -> bool:
            t = self.cost.prefill_time(dop, n, n * n, tp) + self.cost.chunk_cross_time(
                n, start, num_holders, tp
            )
            return t <= cfg.short_wait_budget_s

        lo, hi = min(cfg.min_chunk_tokens, end - start), end - start
        if fits(hi):
            return end
        while hi - lo > 1:  # fits(lo) or lo is the floor; not fits(hi)
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return start + lo

    # ------------------------------------------------------------------ decodes

    def _scale_up_candidates(self) -> list[int]:
        partial = self._partial_holders()
        return [i for i in self._idle() if self.owner[i] is None and i not in partial]

    def _plan_decodes(self, now: float, releases: list[Release]) -> list[DecodeBatch]:
        out = []
        for g in list(self.groups.values()):
            if not g.ready:
                continue
            if g.steps_since_borrow >= 1 and not self._claimed.isdisjoint(g.instances):
                continue  # drains for an aged chunk (it stepped since its last pause)
            if not g.requests:
                self._dissolve(g)
                continue
            batch = self._plan_group_step(now, g, releases)
            if batch is not None:
                out.append(batch)
        return out

    def _plan_group_step(self, now: float, g: DecodeGroup, releases: list[Release]) -> DecodeBatch | None:
        rids = sorted(g.requests, key=lambda r: (self.requests[r].arrival, r))
        # trim instances that hold nothing of the group
        holding = set()
        for r in rids:
            holding.update(self.kv.holders(r))
        assert holding, f"group {g.gid}: decoding requests without KV"
        for i in sorted(g.instances - holding):
            g.instances.discard(i)
            self.owner[i] = None
        self._scale_for_compute(g, len(rids))
        insts = sorted(g.instances)
        free = self.kv.free.copy()
        masters = assign_masters([self.kv.placement(r) for r in rids], insts)
        items: list[DecodeItem] = []
        pending = list(zip(rids, masters))
        while pending:
            rid, master = pending.pop(0)
            st = self.requests[rid]
            held = self.kv.placement(rid)
            # (slots reserved for chunked prompts are not available to decode)
            room = self.kv.unreserved_free > 0
            nk = choose_new_kv_instance(master, held, insts, free) if room else None
            if nk is None and room:
                nk = self._scale_up_for_kv(g, free)
                if nk is not None:
                    insts = sorted(g.instances)
            if nk is None:
                # preempt the latest arrival not yet stepped (possibly this request)
                victim = max([rid] + [r for r, _ in pending], key=lambda r: (self.requests[r].arrival, r))
                releases.append(self._preempt(self.requests[victim], now))
                free = self.kv.free.copy()  # already includes this step's placed tokens
                if victim != rid:
                    pending = [(r, m) for r, m in pending if r != victim]
                    pending.insert(0, (rid, master))
                continue
            free[nk] -= 1
            pos = st.seq_len - 1
            items.append(
                DecodeItem(
                    request_id=rid,
                    input_token=st.outputs[-1],
                    position=pos,
                    master=master,
                    holders=self.kv.holders(rid),
                    new_kv_instance=nk,
                )
            )
            self.kv.place(rid, nk, (TokenRange(pos, pos + 1),))
        if not items:
            if not g.requests:
                self._dissolve(g)
            return None
        # instances may have been emptied by preemptions: keep the batch on what it uses
        used = set()
        for it in items:
            used.update(it.holders)
            used.add(it.master)
            used.add(it.new_kv_instance)
        for i in sorted(g.instances - used):
            g.instances.discard(i)
            self.owner[i] = None
        bid = next(self._ids)
        insts_t = tuple(sorted(g.instances))
        for i in insts_t:
            self.busy[i] = bid
        for it in items:
            self.requests[it.request_id].batch = bid
        g.running_batch = bid
        g.steps_since_borrow += 1
        if self.config.constant_decode_time_s is not None:
            est = self.config.constant_decode_time_s
        else:
            kv_max = max(int(self.kv.used[i]) for i in insts_t)
            est = self.cost.decode_time(
                masters_per_instance([it.master for it in items]), kv_max, len(insts_t), self.tp
            )
        self.running[bid] = RunningBatch(
            bid, "decode", insts_t, tuple(it.request_id for it in items), now, now + est, group=g.gid
        )
        self.stats["decode_steps"] += 1
        return DecodeBatch(batch_id=bid, instances=insts_t, items=tuple(items))

    def _scale_for_compute(self, g: DecodeGroup, batch_size: int) -> None:
        """Add idle instances as extra masters while the step is compute-bound
        (loongserve: more than θ requests per instance; esp: while the cost model says
        the step gets faster). Never while prefills wait for instances."""
        if self._waiting:
            return
        cands = self._scale_up_candidates()
        while cands:
            m = len(g.instances)
            if self.config.is_loongserve or self.config.constant_decode_time_s is not None:
                grow = batch_size / m > self.config.decode_batch_threshold
            else:
                if batch_size / m <= self.config.decode_batch_threshold:
                    break
                view = self._group_view(g)
                kv_max = max(view.kv_tokens, default=0)
                now_t = self.cost.decode_time(math.ceil(batch_size / m), kv_max, m, self.tp)
                new_t = self.cost.decode_time(math.ceil(batch_size / (m + 1)), kv_max, m + 1, self.tp)
                grow = new_t < now_t
            if not grow:
                break
            inst = max(cands, key=lambda i: (int(self.kv.free[i]), -i))
            cands.remove(inst)
            g.instances.add(inst)
            self.owner[inst] = g.gid
            self.stats["scale_ups"] += 1

    def _scale_up_for_kv(self, g: DecodeGroup, free: np.ndarray) -> int | None:
        cands = [i for i in self._scale_up_candidates() if free[i] > 0]
        if not cands:
            return None
        inst = max(cands, key=lambda i: (int(free[i]), -i))
        g.instances.add(inst)
        self.owner[inst] = g.gid
        self.stats["scale_ups"] += 1
        return inst

    def _preempt(self, st: RequestState, now: float) -> Release:
        """Drop a decoding request's KV; it is re-prefilled later over prompt + outputs."""
        g = self.groups[st.group]
        del g.requests[st.rid]
        holders = self.kv.release(st.rid)
        self._drop_resident(st)
        st.phase = Phase.WAITING
        st.group = None
        st.batch = None
        st.prefill_target = st.seq_len
        st.prefilled = 0
        st.preemptions += 1
        st.wait_since = now
        self._enqueue(st)
        self.stats["preemptions"] += 1
        return Release(st.rid, holders, ReleaseReason.PREEMPTED)

    def _dissolve(self, g: DecodeGroup) -> None:
        for i in g.instances:
            if self.owner[i] == g.gid:
                self.owner[i] = None
        del self.groups[g.gid]

    # ================================================================== update

    def update(self, result: BatchResult, now: float) -> list[RequestEvent]:
        batch = self.running.pop(result.batch_id, None)
        if batch is None:
            raise KeyError(f"unknown or already completed batch {result.batch_id}")
        for i in batch.instances:
            if self.busy[i] == batch.batch_id:
                self.busy[i] = None
        tokens = {s.request_id: s for s in result.sampled}
        events: list[RequestEvent] = []
        if result.error is not None:
            for rid in batch.requests:
                st = self.requests[rid]
                st.batch = None
                if st.phase == Phase.DONE:
                    self._flush_deferred(rid)
                    continue
                self._finish(st, ReleaseReason.ABORTED)
                events.append(
                    RequestEvent(
                        rid,
                        finish_reason=FinishReason.ERROR,
                        error=result.error,
                        num_prompt_tokens=st.prompt_len,
                        num_output_tokens=len(st.outputs),
                    )
                )
            if batch.kind == "decode" and batch.group in self.groups:
                self.groups[batch.group].running_batch = None
            self._resume_borrowed(batch)
            return events
        if batch.kind == "prefill":
            events = self._prefill_done(batch, tokens, now)
        else:
            events = self._decode_done(batch, tokens)
        return events

    def _prefill_done(
        self, batch: RunningBatch, tokens: dict[str, SampledToken], now: float
    ) -> list[RequestEvent]:
        events = []
        joined: list[RequestState] = []
        for rid in batch.requests:
            st = self.requests[rid]
            st.batch = None
            if st.phase == Phase.DONE:
                self._flush_deferred(rid)
                continue
            if not batch.sample[rid]:
                st.phase = Phase.PARTIAL
                st.wait_since = now
                self._enqueue(st)
                continue
            tok = tokens.get(rid)
            if tok is None:
                raise ValueError(f"prefill result of batch {batch.batch_id} lacks a token for {rid}")
            st.prefill_target = st.prompt_len  # back to normal bookkeeping
            st.phase = Phase.DECODE
            events.append(self._record_token(st, tok))
            if st.phase == Phase.DECODE:
                joined.append(st)
        self._resume_borrowed(batch)
        if joined:
            self._form_group(joined)
        return events

    def _decode_done(self, batch: RunningBatch, tokens: dict[str, SampledToken]) -> list[RequestEvent]:
        events = []
        self._steps_since_prefill_check += 1
        g = self.groups.get(batch.group) if batch.group is not None else None
        if g is not None:
            g.running_batch = None
        for rid in batch.requests:
            st = self.requests[rid]
            st.batch = None
            if st.phase == Phase.DONE:
                self._flush_deferred(rid)
                continue
            tok = tokens.get(rid)
            if tok is None:
                raise ValueError(f"decode result of batch {batch.batch_id} lacks a token for {rid}")
            events.append(self._record_token(st, tok))
        if g is not None and not g.requests and g.ready:
            self._dissolve(g)
        return events

    def _record_token(self, st: RequestState, tok: SampledToken) -> RequestEvent:
        st.outputs.append(tok.token_id)
        self._set_check(st, st.remaining, st.kv_len)
        sp = st.req.sampling
        n = len(st.outputs)
        reason = None
        if n >= sp.min_tokens and (
            tok.token_id in sp.stop_token_ids
            or (not sp.ignore_eos and tok.token_id in self.config.eos_token_ids)
        ):
            reason = FinishReason.STOP
        elif n >= sp.max_tokens:
            reason = FinishReason.LENGTH
        elif self.config.max_model_len is not None and st.seq_len >= self.config.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(st, ReleaseReason.FINISHED)
        return RequestEvent(
            st.rid, token=tok, finish_reason=reason, num_prompt_tokens=st.prompt_len, num_output_tokens=n
        )

    def _finish(self, st: RequestState, reason: ReleaseReason) -> None:
        """Request done (finished / aborted / failed): leave queue and group; its KV is
        released by the next plan (or when its running batch completes)."""
        rid = st.rid
        if st.phase in (Phase.WAITING, Phase.PARTIAL):
            self._dequeue(st)
        if st.group is not None:
            g = self.groups.get(st.group)
            if g is not None:
                g.requests.pop(rid, None)
            st.group = None
        st.phase = Phase.DONE
        self._drop_resident(st)
        if st.batch is not None:
            self._defer_release[rid] = reason
        elif self.kv.holders(rid) or self.kv.reserved(rid):
            self._pending_release[rid] = reason
        else:
            self._forget(rid)

    def _flush_deferred(self, rid: str) -> None:
        reason = self._defer_release.pop(rid, None)
        if reason is not None and (self.kv.holders(rid) or self.kv.reserved(rid)):
            self._pending_release[rid] = reason
        else:
            self._forget(rid)

    def _resume_borrowed(self, batch: RunningBatch) -> None:
        if not batch.borrowed_groups:
            return
        # borrowed groups may have merged into new ones since: look at every group
        for g in self.groups.values():
            g.paused_by.discard(batch.batch_id)

    def _form_group(self, members: list[RequestState]) -> None:
        """A decode group for requests whose prefill finished, merged with every group
        that shares an instance (instances belong to one group at a time)."""
        insts: set[int] = set()
        for st in members:
            insts.update(self.kv.holders(st.rid))
        g = DecodeGroup(gid=next(self._ids), instances=insts)
        for st in members:
            g.requests[st.rid] = None
            st.group = g.gid
        self.groups[g.gid] = g
        merge = {self.owner[i] for i in insts if self.owner[i] is not None}
        for gid in sorted(merge):
            other = self.groups.pop(gid)
            assert other.running_batch is None, "merging into a running group"
            g.instances |= other.instances
            g.paused_by |= other.paused_by
            g.steps_since_borrow = min(g.steps_since_borrow, other.steps_since_borrow)
            for rid in other.requests:
                g.requests[rid] = None
                self.requests[rid].group = g.gid
        for i in g.instances:
            self.owner[i] = g.gid

    # ================================================================== queue

    def _enqueue(self, st: RequestState) -> None:
        key = (st.arrival, next(self._seq), st.rid)
        self._waiting_key[st.rid] = key
        bisect.insort(self._waiting, key)

    def _dequeue(self, st: RequestState) -> None:
        key = self._waiting_key.pop(st.rid, None)
        if key is not None:
            idx = bisect.bisect_left(self._waiting, key)
            assert self._waiting[idx] == key
            del self._waiting[idx]

    # ================================================================== checks

    def check_invariants(self) -> None:
        self.kv.check_invariants()
        seen: dict[int, int] = {}
        for g in self.groups.values():
            for i in g.instances:
                assert i not in seen, f"instance {i} in groups {seen[i]} and {g.gid}"
                seen[i] = g.gid
                assert self.owner[i] == g.gid, f"owner[{i}] = {self.owner[i]} != {g.gid}"
            for rid in g.requests:
                st = self.requests[rid]
                assert st.phase == Phase.DECODE and st.group == g.gid, (rid, st.phase, st.group)
                holders = set(self.kv.holders(rid))
                assert holders <= g.instances, f"{rid} KV on {holders} outside group {g.instances}"
                assert self.kv.tokens_of(rid) == st.kv_len + (1 if st.batch is not None else 0), (
                    f"{rid}: {self.kv.tokens_of(rid)} KV tokens, expected {st.kv_len}"
                )
        for i, o in enumerate(self.owner):
            assert o is None or i in self.groups[o].instances, f"stale owner of {i}"
        for bid, b in self.running.items():
            for i in b.instances:
                assert self.busy[i] == bid, f"instance {i} of batch {bid} not marked busy"
        for i, b in enumerate(self.busy):
            assert b is None or b in self.running, f"instance {i} busy with finished batch {b}"
        waiting = {k[2] for k in self._waiting}
        assert len(waiting) == len(self._waiting)
        for rid, st in self.requests.items():
            in_q = rid in waiting
            assert in_q == (st.phase in (Phase.WAITING, Phase.PARTIAL)), (rid, st.phase, in_q)
            if st.phase == Phase.DONE:
                assert st.group is None
                if st.batch is None and rid not in self._pending_release:
                    assert not self.kv.holders(rid), f"{rid} done but holds KV without release"
        for rid in self._pending_release:
            assert self.requests[rid].phase == Phase.DONE
        resident = {
            rid
            for rid, st in self.requests.items()
            if st.phase in (Phase.PREFILLING, Phase.PARTIAL, Phase.DECODE)
        }
        assert resident == set(self._resident), resident ^ set(self._resident)
        for rid in resident:
            st = self.requests[rid]
            assert st.check_remaining == st.remaining, rid
            assert st.check_len == (st.kv_len if st.phase == Phase.DECODE else st.prefill_target), rid
        assert self._resident_len == sum(self.requests[r].check_len for r in resident)
        assert self._resident_rem_ub >= max((self.requests[r].check_remaining for r in resident), default=0)
        if not self.config.short_kv_on_long_holders:
            for i in self._partial_holders():
                assert self.owner[i] is None, f"partial holder {i} owned by group {self.owner[i]}"
