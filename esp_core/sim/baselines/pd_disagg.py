"""`pd-disagg`: prefill/decode disaggregation, modelled on DistServe (OSDI'24).

The paper's configuration is 4 GPUs of prefill (one TP=4 instance) and 4 GPUs of decode
(one TP=4 instance): `ClusterSpec(num_instances=2, tp_per_instance=4)` with
`num_prefill=1`. In general the first `num_prefill` instances prefill, the rest decode.

* Prefill instances run FCFS prefill batches of whole prompts (up to
  `prefill_token_budget` tokens, at least one request); the KV stays on the prefill
  instance until it is transferred, so a prefill instance only takes a prompt that fits
  its free slots (back-pressure when the decode side is full).
* A prefilled request moves to a decode instance when that instance has room for its
  whole output (the peak-memory check: a DistServe decode instance is sized by its KV
  memory); the transfer is a `Migration` from the prefill instance, pulled by the decode
  instance (`migrations_pull_only`: the prefill instance keeps computing, as DistServe
  overlaps transfers with prefill), and costs the cost model's KV-transfer time on the
  decode instance before its next step.
* Decode instances run continuous batching: one step of up to `decode_max_batch`
  requests they hold (FCFS; the rest wait on the instance with their KV).
* A request whose prompt exceeds a prefill instance's slots, or whose prompt + output
  exceed a decode instance's, can never run: it is rejected (the paper's "OOM").

Settings from the LoongServe artifact's DistServe launch line
(test/longserve/5-start-api-server.py): context TP=4 PP=1, decoding TP=2 PP=2,
`--context-max-batch-size 128 --context-max-tokens-per-batch 550000
--decoding-max-batch-size 128`, FCFS on both sides. The decode side's 4 GPUs are timed
as one TP=4 instance (same GPUs, same aggregate FLOPs and HBM bandwidth); its pipeline
of 2 stages keeps 2 micro-batches of <= 128 in flight, so a step holds at most 256
requests (ASSUMED: DistServe's engine keeps one batch per pipeline stage).

Engine timing (`DISTSERVE_ENGINE`): DistServe's engine is Python in vLLM's mould (block
manager, FCFS scheduler, Ray calls to the workers every step, no CPU/GPU overlap); its
model is C++ (SwiftTransformer), so no eager-launch cost. ASSUMED: vLLM 0.3's per-sequence
host cost (0.2 ms, see vllm.py) and 3 ms per iteration for the Ray round trip.
"""

from __future__ import annotations

from collections import deque

from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import DecodeBatch, IterationPlan, Migration, NewRequest, PrefillBatch, TokenRange
from esp_core.sim.baselines.common import BaselineBase, Phase, Req, peak_fits
from esp_core.sim.timing import ExecutionModel

DISTSERVE_ENGINE = ExecutionModel(iteration_overhead_s=0.003, per_seq_overhead_s=0.0002)


class PDDisaggScheduler(BaselineBase):
    migrations_pull_only = True

    def __init__(
        self,
        cluster: ClusterSpec,
        num_prefill: int | None = None,
        prefill_token_budget: int = 550_000,
        prefill_max_batch: int = 128,
        decode_max_batch: int = 256,
        execution: ExecutionModel = DISTSERVE_ENGINE,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        super().__init__(cluster, eos_token_ids)
        self.execution = execution
        self.prefill_max_batch = prefill_max_batch
        self.decode_max_batch = decode_max_batch
        n = cluster.num_instances
        num_prefill = n // 2 if num_prefill is None else num_prefill
        if not 1 <= num_prefill < n:
            raise ValueError("need at least one prefill and one decode instance")
        self.prefill_instances = tuple(range(num_prefill))
        self.decode_instances = tuple(range(num_prefill, n))
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Req] = deque()
        self.ready: deque[Req] = deque()  # prefilled, KV on a prefill instance
        self.running: dict[int, list[Req]] = {d: [] for d in self.decode_instances}

    def _never_fits(self, request: NewRequest) -> str | None:
        cap = self.cluster.kv_slots_per_instance
        if request.prompt_len > cap:
            return f"prompt of {request.prompt_len} tokens exceeds a prefill instance ({cap} slots)"
        if request.prompt_len + request.sampling.max_tokens > cap:
            return (
                f"{request.prompt_len} + {request.sampling.max_tokens} tokens exceed a "
                f"decode instance ({cap} slots)"
            )
        return None

    def _enqueue(self, req: Req) -> None:
        self.waiting.append(req)

    def _dequeue(self, req: Req) -> None:
        for q in (self.waiting, self.ready):
            if req in q:
                q.remove(req)
        for lst in self.running.values():
            if req in lst:
                lst.remove(req)

    def _after_prefill(self, req: Req, sampled: bool) -> None:
        if sampled:
            req.phase = Phase.READY
            self.ready.append(req)

    def _plan(self, now: float) -> IterationPlan:
        migrations: list[Migration] = []
        decodes: list[DecodeBatch] = []
        prefills: list[PrefillBatch] = []
        for d in self.decode_instances:
            if not self._idle([d]):
                continue
            running = self.running[d]
            # FCFS transfers into this decode instance while its memory can hold them.
            while self.ready:
                req = self.ready[0]
                entries = [(r.kv_tokens, r.remaining) for r in running]
                entries.append((req.kv_tokens, req.remaining))
                if not peak_fits(entries, self.cluster.kv_slots_per_instance):
                    break
                self.ready.popleft()
                (src,) = req.holders()
                n = self._move_kv(req, src, d)
                migrations.append(Migration(req.rid, src, d, (TokenRange(0, n),)))
                req.phase = Phase.RUNNING
                running.append(req)
            if running:
                # `running` is in transfer (FCFS) order: the first ones form the batch.
                items = [self._decode_item(r, d, d) for r in running[: self.decode_max_batch]]
                decodes.append(self._decode_batch((d,), items))
        for p in self.prefill_instances:
            if not self._idle([p]) or not self.waiting:
                continue
            items, tokens, free = [], 0, self._free(p)
            while self.waiting:
                req = self.waiting[0]
                n = req.prefill_target
                if n > free or (
                    items and (tokens + n > self.prefill_token_budget or len(items) >= self.prefill_max_batch)
                ):
                    break
                self.waiting.popleft()
                req.phase = Phase.PREFILLING
                items.append(self._prefill_item(req, 0, n, (p,), [(p, n)]))
                tokens += n
                free -= n
            if items:
                prefills.append(self._prefill_batch((p,), items))
        if not (prefills or decodes or migrations or self._releases):
            return IterationPlan(self._next_plan)
        return self._emit(prefills, decodes, migrations)
