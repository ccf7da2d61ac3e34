"""How long a batch takes on the simulated cluster: the cost model applied to a plan's parts.

The cost model (`esp_core.sched.cost_model.CostModel`) is used through the small
protocol below, so the simulator also runs with any object of the same shape (tests use
the real one). All times are seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from esp_core.sched.plan import DecodeBatch, Migration, PrefillBatch
from esp_core.sim.kv_ledger import KVLedger


class CostModelLike(Protocol):
    def prefill_time(self, dop: int, sum_len: int, sum_len_sq: int, tp: int = 1) -> float: ...

    def decode_time(
        self, max_requests_per_master: int, max_kv_tokens_per_instance: int, num_instances: int, tp: int = 1
    ) -> float: ...

    def chunk_cross_time(self, chunk_len: int, cached_len: int, num_holders: int, tp: int = 1) -> float: ...

    def migration_time(self, num_tokens: int, cross_node: bool = False, tp: int = 1) -> float: ...

    def kv_transfer_time(self, num_tokens: int, cross_node: bool = False, tp: int = 1) -> float: ...


@dataclass(frozen=True)
class ExecutionModel:
    """How a serving system's engine deviates from the shared cost profile.

    The profile (esp_core/profiles/a800-llama2-7b.json) is anchored to LoongServe's
    measurements, i.e. LightLLM-class engines: FlashAttention-2-class attention kernels and
    a host side (router, detokenizer) that overlaps the GPU. A baseline whose engine is
    slower in a documented way declares it here (baselines/*.py say why and from where);
    the default changes nothing, so ESP / LoongServe timings are the profile's.

    * `attention_slowdown`: multiplies the attention (sum L^2) term of a prefill and the
      cross-attention of a chunk to its cached prefix (a slower attention kernel);
    * `iteration_overhead_s` + `per_seq_overhead_s` x sequences in the forward: host time
      that does not overlap the GPU (eager kernel launches, Python scheduling, sampling,
      detokenization, Ray calls), added to every iteration;
    * `padded_prefill`: a prefill batch runs as a [batch, max prompt length] tensor (vLLM
      <= 0.3), so its dense and attention work counts every prompt at the longest length.
    """

    attention_slowdown: float = 1.0
    iteration_overhead_s: float = 0.0
    per_seq_overhead_s: float = 0.0
    padded_prefill: bool = False

    def __post_init__(self) -> None:
        if self.attention_slowdown < 1.0:
            raise ValueError("attention_slowdown must be >= 1 (the profile is the fast engine)")
        if self.iteration_overhead_s < 0 or self.per_seq_overhead_s < 0:
            raise ValueError("overheads must be >= 0")

    def host_time(self, num_seqs: int) -> float:
        return self.iteration_overhead_s + self.per_seq_overhead_s * num_seqs


PROFILE_ENGINE = ExecutionModel()

# Our own server's host time per engine step, measured (python -m esp_serve.app.bench_overhead
# --config builtin.yaml --streams 1,32, docs/benchmarks.md "Per-step bytes off Ray"): the
# controller, whose event loop plans each step, sends each instance its sub-plan and streams
# every request's token, is on the critical path between forwards. Its CPU per step at 1
# stream is the per-iteration term (1.06-1.60 ms, median 1.13 ms); its CPU per generated
# token at 32 streams the per-sequence one (0.113-0.151 ms, median 0.128 ms): five runs of
# 2026-12-07 04:01-04:12 UTC with the plan and event channels, medians rounded up. (Before
# the channels: ~2.5 ms and ~0.7 ms, docs/benchmarks.md "Host cost per token".)
# Measured on a 2-core CPU VM, so an estimate for a GPU host, not idealised to zero.
# The simulator's esp and loongserve policies run the ESP scheduler with this engine
# (policies.esp_scheduler).
ESP_SERVE_ENGINE = ExecutionModel(iteration_overhead_s=0.0012, per_seq_overhead_s=0.00013)


@dataclass(frozen=True)
class Topology:
    """Which node each instance sits on (instances are `tp` consecutive GPUs)."""

    tp: int = 1
    gpus_per_node: int = 8

    def node(self, instance: int) -> int:
        return (instance * self.tp) // self.gpus_per_node

    def cross_node(self, a: int, b: int) -> bool:
        return self.node(a) != self.node(b)


class CacheBlocks(Protocol):
    """A baseline's own block cache (vllm_apc.py): which cache blocks a request reads."""

    block_tokens: int

    def decode_cache_blocks(self, request_id: str) -> tuple[int, ...]: ...


class BatchTimer:
    """Times batches. `cascade`: a decode step reads KV that several of its requests share
    once per instance for all of them (shared-prefix attention, as the executors do);
    shared KV is the ledger's segments (`KVAdoption(share=True)`) and, for a baseline with
    its own block cache, that cache's blocks (`cache_blocks`). Off: every reader reads it."""

    def __init__(
        self,
        cost_model: CostModelLike,
        topology: Topology,
        engine: ExecutionModel = PROFILE_ENGINE,
        *,
        cascade: bool = True,
        cache_blocks: CacheBlocks | None = None,
    ) -> None:
        self.cost = cost_model
        self.topo = topology
        self.engine = engine
        self.cascade = cascade
        self.cache_blocks = cache_blocks

    def _prefill_compute(self, dop: int, lens: list[int], extra_tokens: int = 0) -> float:
        """Prefill forward over prompts of `lens` (plus `extra_tokens` single-token rows,
        e.g. fused decodes), with the engine's padding and attention kernel."""
        if self.engine.padded_prefill and lens:
            lens = [max(lens)] * len(lens)
        sum_len = sum(lens) + extra_tokens
        sum_sq = sum(n * n for n in lens) + extra_tokens
        t = self.cost.prefill_time(dop, sum_len, sum_sq, self.topo.tp)
        k = self.engine.attention_slowdown
        if k != 1.0:
            # Only the attention (sum L^2) part runs the slower kernel.
            t += (k - 1.0) * (
                self.cost.prefill_time(dop, sum_len, sum_sq, self.topo.tp)
                - self.cost.prefill_time(dop, sum_len, 0, self.topo.tp)
            )
        return t

    def _cross(self, batch: PrefillBatch, fullest: Mapping[str, int] | None = None) -> float:
        """Chunked prefill: each chunk's queries also attend to its request's cached KV.
        `fullest`: per request, the most cached tokens one of its holders reads. The
        holders work in parallel, so the fullest bounds the step: an uneven split is
        charged as if every holder held that much (an even one, up to a token each, as
        the cost model's even split)."""
        t = 0.0
        for it in batch.items:
            if it.tokens.start > 0 and it.cached_holders:
                h = len(it.cached_holders)
                cached = it.tokens.start
                most = (fullest or {}).get(it.request_id, 0)
                if most > -(-cached // h):
                    cached = most * h
                t += self.cost.chunk_cross_time(len(it.tokens), cached, h, self.topo.tp)
        return t * self.engine.attention_slowdown

    def prefill(self, batch: PrefillBatch, fullest: Mapping[str, int] | None = None) -> float:
        lens = [len(it.tokens) for it in batch.items]
        return (
            self._prefill_compute(batch.dop, lens)
            + self._cross(batch, fullest)
            + self.engine.host_time(len(lens))
        )

    @staticmethod
    def fullest_holders(batch: PrefillBatch, ledger: KVLedger) -> dict[str, int]:
        """Per chunk item, the most cached KV one of its holders reads (before the
        chunk's own KV lands)."""
        return {
            it.request_id: max(ledger.read_tokens(it.request_id, h) for h in it.cached_holders)
            for it in batch.items
            if it.tokens.start > 0 and it.cached_holders
        }

    def decode_shape(self, batch: DecodeBatch, ledger: KVLedger) -> tuple[int, int]:
        """(max requests mastered by one instance, max KV tokens read on one instance),
        counting each new token where it is stored (it attends to itself there)."""
        masters = Counter(it.master for it in batch.items)
        kv: Counter[int] = Counter()
        readers: dict[int, list[str]] = {}
        for it in batch.items:
            for h in it.holders:
                readers.setdefault(h, []).append(it.request_id)
            kv[it.new_kv_instance] += 1
        for h, rids in readers.items():
            kv[h] += self._step_reads(rids, h, ledger)
        return max(masters.values(), default=0), max(kv.values(), default=0)

    def _step_reads(self, rids: list[str], instance: int, ledger: KVLedger) -> int:
        """KV tokens the step's attention reads on `instance` for the requests `rids`."""
        if not self.cascade:
            return sum(ledger.read_tokens(rid, instance) for rid in rids)
        total = ledger.step_read_tokens(rids, instance)
        if self.cache_blocks is None or len(rids) < 2:
            return total
        # a block cache's blocks: each reader's share of them counted once, not per reader
        bt = self.cache_blocks.block_tokens
        blocks = [self.cache_blocks.decode_cache_blocks(rid) for rid in rids]
        distinct = set().union(*blocks)
        return total - bt * (sum(len(b) for b in blocks) - len(distinct))

    def decode(self, batch: DecodeBatch, ledger: KVLedger) -> float:
        per_master, per_instance_kv = self.decode_shape(batch, ledger)
        return self.cost.decode_time(
            per_master, per_instance_kv, len(batch.instances), self.topo.tp
        ) + self.engine.host_time(len(batch.items))

    def fused(self, prefill: PrefillBatch, decode: DecodeBatch, ledger: KVLedger) -> float:
        """One SplitFuse iteration: prefill chunk tokens and decode tokens in one forward.

        The dense layers run once over chunk + decode tokens (compute-bound) or are bound by
        reading the weights, whichever is slower; the decode tokens' attention then reads
        their KV (the KV-dependent part of a decode step), and chunks attend to their cached
        prefix. Modelled from the cost model's own terms, no extra constants.
        """
        n_dec = len(decode.items)
        lens = [len(it.tokens) for it in prefill.items]
        per_master, per_kv = self.decode_shape(decode, ledger)
        tp = self.topo.tp
        dop = len(decode.instances)
        dense = max(
            self._prefill_compute(prefill.dop, lens, extra_tokens=n_dec),
            self.cost.decode_time(per_master, 0, dop, tp),
        )
        kv_read = self.cost.decode_time(per_master, per_kv, dop, tp) - self.cost.decode_time(
            per_master, 0, dop, tp
        )
        return dense + max(0.0, kv_read) + self._cross(prefill) + self.engine.host_time(len(lens) + n_dec)

    def migration(self, mig: Migration) -> float:
        n = sum(len(r) for r in mig.ranges)
        return self.cost.migration_time(n, self.topo.cross_node(mig.src, mig.dst), self.topo.tp)

    def kv_transfer(self, mig: Migration) -> float:
        """A prefill->decode KV hand-over (disaggregation), pulled by the destination."""
        n = sum(len(r) for r in mig.ranges)
        return self.cost.kv_transfer_time(n, self.topo.cross_node(mig.src, mig.dst), self.topo.tp)
