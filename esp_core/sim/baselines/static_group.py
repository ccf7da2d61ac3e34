"""Static-parallelism serving: fixed groups of instances, each group a replica.

One engine serves the three static baselines; they differ only in the knobs of
`StaticConfig` (see vllm.py, chunked_prefill.py, static_sp.py for each documented model):

* a group is `group_size` consecutive instances (each instance may be a TP group). A
  group of one instance is plain tensor parallelism; a group of several is a static
  sequence-parallel ring: every prefill runs on the whole ring (striped), every decode
  step on the whole group, KV spread evenly over it. The degree never changes.
* requests are dispatched at arrival to the group with the least outstanding work
  (queued prompt tokens + KV in use), and stay there;
* `admission="paged"` is vLLM 0.3: admit a prompt when its blocks (plus a watermark)
  are free, no room reserved for outputs; when a decode step cannot get a block,
  preempt the latest-arrived running request by recomputation (drop KV, re-prefill
  prompt + outputs later, first in the queue).
  `admission="reserve"` is LightLLM's (and LoongServe's) peak-memory check: admit only
  if every request can run to its output budget, so nothing is ever preempted.
* without `chunk_size`, an iteration is either a prefill batch (prefill-prioritised, the
  running decodes wait) or one decode step of all running requests;
  with `chunk_size` (SplitFuse, LightLLM's), every iteration is one fused forward of all
  running decodes plus a chunk of up to `chunk_size` tokens of every admitted prompt,
  bounded by `max_batch_tokens` per iteration (LightLLM's default: 1/6 of the KV pool).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import (
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    PrefillBatch,
    PrefillItem,
    ReleaseReason,
)
from esp_core.sim.baselines.common import BaselineBase, Phase, Req, peak_fits, water_fill
from esp_core.sim.timing import PROFILE_ENGINE, ExecutionModel


@dataclass(frozen=True)
class StaticConfig:
    group_size: int = 1
    admission: str = "reserve"  # "paged" (vLLM 0.3) | "reserve" (LightLLM peak check)
    chunk_size: int | None = None  # SplitFuse token budget per iteration
    block_size: int = 1  # allocation granularity (vLLM: 16-token blocks)
    watermark: float = 0.0  # fraction of slots kept free at admission (vLLM: 0.01)
    max_running: int = 1000  # max requests in a group's running batch
    max_batch_tokens: int | None = None  # prefill token budget (None: limited by memory)
    # vLLM <= 0.3 pads a prefill batch to its longest prompt: with `max_paddings` set, the
    # token budget counts len(batch) x longest prompt and a prompt joins only while the
    # batch's padding (that product minus the real tokens) stays <= max_paddings.
    max_paddings: int | None = None
    execution: ExecutionModel = PROFILE_ENGINE  # engine timing deviations (timing.py)

    def __post_init__(self) -> None:
        if self.admission not in ("paged", "reserve"):
            raise ValueError("admission must be 'paged' or 'reserve'")
        if self.chunk_size is not None and self.admission != "reserve":
            raise ValueError("SplitFuse chunking is modelled with reserve admission only")
        if self.admission == "paged" and self.group_size != 1:
            raise ValueError("paged admission is modelled for single-instance groups only")


class _Group:
    def __init__(self, index: int, instances: tuple[int, ...]) -> None:
        self.index = index
        self.instances = instances
        self.waiting: deque[Req] = deque()
        self.prefilling: list[Req] = []  # chunked prefill in progress (FCFS)
        self.running: list[Req] = []  # decoding, in arrival order
        self.queued_tokens = 0


class StaticGroupScheduler(BaselineBase):
    def __init__(
        self, cluster: ClusterSpec, config: StaticConfig, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        if cluster.num_instances % config.group_size:
            raise ValueError(
                f"{cluster.num_instances} instances do not split into groups of {config.group_size}"
            )
        self.config = config
        self.block_size = config.block_size
        self.fused_prefill_decode = config.chunk_size is not None
        self.execution = config.execution
        super().__init__(cluster, eos_token_ids)
        g = config.group_size
        self.groups = [_Group(k, tuple(range(k * g, (k + 1) * g))) for k in range(cluster.num_instances // g)]

    # -- queues ------------------------------------------------------------------------

    def _group_capacity(self) -> int:
        cap = self.cluster.kv_slots_per_instance * self.config.group_size
        return int(cap * (1.0 - self.config.watermark))

    def _enqueue(self, req: Req) -> None:
        grp = min(
            self.groups, key=lambda g: (g.queued_tokens + sum(self._used[i] for i in g.instances), g.index)
        )
        req.group = grp.index
        grp.waiting.append(req)
        grp.queued_tokens += req.prefill_target

    def _dequeue(self, req: Req) -> None:
        grp = self.groups[req.group]
        if req.phase == Phase.WAITING and req in grp.waiting:
            grp.waiting.remove(req)
            grp.queued_tokens -= req.prefill_target
        elif req in grp.prefilling:
            grp.prefilling.remove(req)
        elif req in grp.running:
            grp.running.remove(req)

    def _after_prefill(self, req: Req, sampled: bool) -> None:
        if sampled:
            grp = self.groups[req.group]
            if req in grp.prefilling:
                grp.prefilling.remove(req)
            req.phase = Phase.RUNNING
            grp.running.append(req)
            grp.running.sort(key=lambda r: r.order)

    # -- capacity ----------------------------------------------------------------------

    def _group_free(self, grp: _Group) -> int:
        return sum(self._free(i) for i in grp.instances)

    def _admit_reserve(self, grp: _Group, picked: list[Req], cand: Req) -> bool:
        # Requests still prefilling count with their whole prompt: it will all be cached.
        entries = [(r.kv_tokens, r.remaining) for r in grp.running]
        entries += [(r.prefill_target, r.remaining) for r in grp.prefilling + picked + [cand]]
        return peak_fits(entries, self._group_capacity())

    def _admit_paged(self, grp: _Group, picked_slots: int, cand: Req) -> bool:
        cap = self.cluster.kv_slots_per_instance * self.config.group_size
        watermark = int(cap * self.config.watermark)
        need = picked_slots + self._blocks(cand.prefill_target)
        return need + watermark <= self._group_free(grp)

    # -- planning ----------------------------------------------------------------------

    def _plan(self, now: float) -> IterationPlan:
        prefills: list[PrefillBatch] = []
        decodes: list[DecodeBatch] = []
        for grp in self.groups:
            if not self._idle(grp.instances):
                continue
            if self.config.chunk_size is not None:
                p, d = self._splitfuse_iteration(grp)
            else:
                p, d = self._iteration(grp)
            if p is not None:
                prefills.append(p)
            if d is not None:
                decodes.append(d)
        if not prefills and not decodes and not self._releases:
            return IterationPlan(self._next_plan)
        return self._emit(prefills, decodes)

    def _take_prefills(self, grp: _Group, token_room: int | None = None) -> list[Req]:
        """FCFS from the queue head while the token budget, batch size and memory allow.
        With `token_room` (SplitFuse) each request costs only its first chunk."""
        cfg = self.config
        picked: list[Req] = []
        tokens = slots = longest = 0
        for req in grp.waiting:
            if len(grp.running) + len(grp.prefilling) + len(picked) >= cfg.max_running:
                break
            if token_room is not None:
                first = min(cfg.chunk_size, req.prefill_target)
                if tokens + first > token_room:
                    break
                cost = first
            elif cfg.max_paddings is not None:
                # vLLM 0.3: the batch is a padded [n, longest] tensor.
                n_long = max(longest, req.prefill_target)
                padded = (len(picked) + 1) * n_long
                if picked and (
                    padded - (tokens + req.prefill_target) > cfg.max_paddings
                    or (cfg.max_batch_tokens is not None and padded > cfg.max_batch_tokens)
                ):
                    break
                cost = req.prefill_target
            else:
                cost = req.prefill_target
                if cfg.max_batch_tokens is not None and picked and tokens + cost > cfg.max_batch_tokens:
                    break
            fits = (
                self._admit_paged(grp, slots, req)
                if cfg.admission == "paged"
                else self._admit_reserve(grp, picked, req)
            )
            if not fits:
                break  # strict FCFS: vLLM and LightLLM stop at the first misfit
            picked.append(req)
            longest = max(longest, req.prefill_target)
            tokens += cost
            slots += self._blocks(req.prefill_target)
        for req in picked:
            grp.waiting.remove(req)
            grp.queued_tokens -= req.prefill_target
        return picked

    def _keep_shares(self, grp: _Group, n: int) -> list[tuple[int, int]]:
        """Where the KV of n new tokens goes: balanced over the group's instances."""
        if len(grp.instances) == 1:
            return [(grp.instances[0], n)]
        shares = water_fill([self._free(i) for i in grp.instances], n)
        return list(zip(grp.instances, shares))

    def _iteration(self, grp: _Group) -> tuple[PrefillBatch | None, DecodeBatch | None]:
        picked = self._take_prefills(grp)
        if picked:
            items = []
            for req in picked:
                req.phase = Phase.PREFILLING
                items.append(
                    self._prefill_item(
                        req, 0, req.prefill_target, grp.instances, self._keep_shares(grp, req.prefill_target)
                    )
                )
            return self._prefill_batch(grp.instances, items), None
        if not grp.running:
            return None, None
        if self.config.admission == "paged":
            self._preempt_for_decode(grp)
        return None, self._decode_step(grp)

    def _preempt_for_decode(self, grp: _Group) -> None:
        """vLLM 0.3: each running sequence needs a slot for its next token; while the
        blocks are short, evict the latest-arrived running request by recomputation."""

        def need() -> int:
            # a new block is needed where the last block is full (block-granular alloc)
            return sum(self.block_size for r in grp.running if r.kv_tokens + 1 > sum(r.alloc.values()))

        while grp.running and need() > self._group_free(grp):
            victim = grp.running.pop()  # latest arrival
            self._preempt(grp, victim)

    def _preempt(self, grp: _Group, req: Req) -> None:
        self._drop_kv(req, ReleaseReason.PREEMPTED)
        req.phase = Phase.WAITING
        grp.waiting.appendleft(req)
        grp.queued_tokens += req.prefill_target

    def _decode_items(self, grp: _Group) -> list[DecodeItem]:
        items = []
        inst = grp.instances
        for req in grp.running:
            master = inst[req.order % len(inst)]
            new_kv = (
                master
                if self._free(master) >= self.block_size
                else max(inst, key=lambda i: (self._free(i), -i))
            )
            items.append(self._decode_item(req, master, new_kv))
        return items

    def _decode_step(self, grp: _Group) -> DecodeBatch | None:
        items = self._decode_items(grp)
        return self._decode_batch(grp.instances, items) if items else None

    def _splitfuse_iteration(self, grp: _Group) -> tuple[PrefillBatch | None, DecodeBatch | None]:
        """LightLLM SplitFuse: one forward of every running decode (1 token each) plus a
        chunk of up to `chunk_size` tokens of every admitted prompt, the whole iteration
        bounded by `max_batch_tokens`; new prompts join while their first chunk fits."""
        cap = self.config.max_batch_tokens or self._group_capacity() // 6
        tokens = len(grp.running)
        items: list[PrefillItem] = []
        chunks: list[tuple[Req, int]] = []
        for req in grp.prefilling:
            n = min(self.config.chunk_size, req.prefill_target - req.prefilled)
            if chunks and tokens + n > cap:
                break
            chunks.append((req, n))
            tokens += n
        if len(chunks) == len(grp.prefilling):
            for req in self._take_prefills(grp, token_room=cap - tokens):
                n = min(self.config.chunk_size, req.prefill_target)
                req.phase = Phase.PREFILLING
                grp.prefilling.append(req)
                chunks.append((req, n))
                tokens += n
        for req, n in chunks:
            start = req.prefilled
            items.append(self._prefill_item(req, start, start + n, grp.instances, self._keep_shares(grp, n)))
        prefill = self._prefill_batch(grp.instances, items) if items else None
        decode = self._decode_step(grp)
        return prefill, decode
