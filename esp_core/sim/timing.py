"""How long a batch takes on the simulated cluster: the cost model applied to a plan's parts.

The cost model (`esp_core.sched.cost_model.CostModel`) is used through the small
protocol below, so the simulator also runs with any object of the same shape (tests use
the real one). All times are seconds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from esp_core.sched.plan import DecodeBatch, Migration, PrefillBatch
from esp_core.sim.kv_ledger import KVLedger


class CostModelLike(Protocol):
    def prefill_time(self, dop: int, sum_len: int, sum_len_sq: int, tp: int = 1) -> float: ...

    def decode_time(self, max_requests_per_master: int, max_kv_tokens_per_instance: int,
                    num_instances: int, tp: int = 1) -> float: ...

    def chunk_cross_time(self, chunk_len: int, cached_len: int, num_holders: int,
                         tp: int = 1) -> float: ...

    def migration_time(self, num_tokens: int, cross_node: bool = False,
                       tp: int = 1) -> float: ...

    def kv_transfer_time(self, num_tokens: int, cross_node: bool = False,
                         tp: int = 1) -> float: ...


@dataclass(frozen=True)
class Topology:
    """Which node each instance sits on (instances are `tp` consecutive GPUs)."""

    tp: int = 1
    gpus_per_node: int = 8

    def node(self, instance: int) -> int:
        return (instance * self.tp) // self.gpus_per_node

    def cross_node(self, a: int, b: int) -> bool:
        return self.node(a) != self.node(b)


class BatchTimer:
    def __init__(self, cost_model: CostModelLike, topology: Topology) -> None:
        self.cost = cost_model
        self.topo = topology

    def prefill(self, batch: PrefillBatch) -> float:
        lens = [len(it.tokens) for it in batch.items]
        t = self.cost.prefill_time(batch.dop, sum(lens), sum(n * n for n in lens), self.topo.tp)
        # Chunked prefill: the chunk's queries also attend to the request's cached KV.
        for it in batch.items:
            if it.tokens.start > 0 and it.cached_holders:
                t += self.cost.chunk_cross_time(len(it.tokens), it.tokens.start,
                                                len(it.cached_holders), self.topo.tp)
        return t

    def decode_shape(self, batch: DecodeBatch, ledger: KVLedger) -> tuple[int, int]:
        """(max requests mastered by one instance, max KV tokens read on one instance),
        counting each new token where it is stored (it attends to itself there)."""
        masters = Counter(it.master for it in batch.items)
        kv: Counter[int] = Counter()
        for it in batch.items:
            for h in it.holders:
                kv[h] += ledger.tokens(it.request_id, h)
            kv[it.new_kv_instance] += 1
        return max(masters.values(), default=0), max(kv.values(), default=0)

    def decode(self, batch: DecodeBatch, ledger: KVLedger) -> float:
        per_master, per_instance_kv = self.decode_shape(batch, ledger)
        return self.cost.decode_time(per_master, per_instance_kv, len(batch.instances),
                                     self.topo.tp)

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
            self.cost.prefill_time(prefill.dop, sum(lens) + n_dec,
                                   sum(n * n for n in lens) + n_dec, tp),
            self.cost.decode_time(per_master, 0, dop, tp),
        )
        kv_read = (self.cost.decode_time(per_master, per_kv, dop, tp)
                   - self.cost.decode_time(per_master, 0, dop, tp))
        t = dense + max(0.0, kv_read)
        for it in prefill.items:
            if it.tokens.start > 0 and it.cached_holders:
                t += self.cost.chunk_cross_time(len(it.tokens), it.tokens.start,
                                                len(it.cached_holders), self.topo.tp)
        return t

    def migration(self, mig: Migration) -> float:
        n = sum(len(r) for r in mig.ranges)
        return self.cost.migration_time(n, self.topo.cross_node(mig.src, mig.dst), self.topo.tp)

    def kv_transfer(self, mig: Migration) -> float:
        """A prefill->decode KV hand-over (disaggregation), pulled by the destination."""
        n = sum(len(r) for r in mig.ranges)
        return self.cost.kv_transfer_time(n, self.topo.cross_node(mig.src, mig.dst),
                                          self.topo.tp)
