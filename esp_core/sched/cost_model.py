"""Cost model: how long prefill, decode, chunk cross-attention and KV moves take.

All times are in seconds. Forms (docs/architecture.md §4):

* prefill on `dop` instances of `tp` GPUs each, over requests with Σ L and Σ L²::

      T_P = a_P + b_P · ΣL + c_P · ΣL²

* one decode step on instance list D, bounded by the busiest instance (dense work is
  split over masters, attention over holders) plus a query/partial exchange per layer
  when |D| > 1::

      T_dec = a + b · max_d(requests mastered on d) + c · max_d(KV tokens on d)
              + layers · t_roundtrip(|D|, requests per master)

* cross-attention of a chunk's queries to its request's cached KV on |H| holders::

      T_x = c_x · L_chunk · L_cached / |H| + layers · t_roundtrip(|H| + 1, L_chunk)

* KV moves (migration, P/D transfer): KV bytes per token of the model over the link's
  bandwidth (intra- or inter-node), never a constant.

Coefficients come either from the analytical model (`CostModel.analytical`: FLOPs and
bytes of a `ModelShape` over the peaks and efficiency factors of a `HardwareSpec`), or
from a fitted profile (`CostModel.from_profile`, produced by `fit` from measured records;
see `esp_core/sched/cost_fit.py`). A fitted profile overrides the analytical
coefficients where it has data; unprofiled DoPs are scaled from the nearest profiled one.

CLI::

    python -m esp_core.sched.cost_model fit RECORDS.jsonl --out FITTED.json \
        [--hardware a800] [--model llama2-7b]
    python -m esp_core.sched.cost_model analytical --hardware a800 --model llama2-7b \
        --out esp_core/profiles/a800-llama2-7b.json
    python -m esp_core.sched.cost_model show PROFILE.json
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esp_core.sched.hardware import HardwareSpec
from esp_core.sched.model_shape import ModelShape

PROFILE_FORMAT = "esp-cost-profile/1"
PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles"


@dataclass(frozen=True)
class PrefillCoeffs:
    """T = a + b·ΣL + c·ΣL² (s, s/token, s/token²) for one (dop, tp)."""

    a: float
    b: float
    c: float

    def time(self, sum_len: float, sum_len_sq: float) -> float:
        return self.a + self.b * sum_len + self.c * sum_len_sq


@dataclass(frozen=True)
class DecodeCoeffs:
    """Decode step coefficients for one TP degree.

    a: per step (weights streamed, launches); b: per request mastered on the busiest
    master (dense FLOPs, LM head, sampling); c: per KV token read on the busiest holder;
    rt_base / rt_per_peer / rt_per_request: one layer's query/partial exchange when the
    batch spans several instances (latency, extra peers, bytes of each request's query
    and partial).
    """

    a: float
    b: float
    c: float
    rt_base: float = 0.0
    rt_per_peer: float = 0.0
    rt_per_request: float = 0.0


@dataclass
class CostModel:
    """Time estimates for the scheduler and the simulator (see the module docstring)."""

    model: ModelShape
    hardware: HardwareSpec
    # fitted overrides: (dop, tp) -> prefill, tp -> decode, tp -> c_x
    prefill_table: dict[tuple[int, int], PrefillCoeffs] = field(default_factory=dict)
    decode_table: dict[int, DecodeCoeffs] = field(default_factory=dict)
    chunk_table: dict[int, float] = field(default_factory=dict)
    source: str = "analytical"
    notes: str = ""
    # node of each instance of the group (esp_core/sched/placement.py), once known; None:
    # a batch crosses nodes when its GPUs exceed one node's
    node_of: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._prefill_cache: dict[tuple[int, int, bool], PrefillCoeffs] = {}
        self._array_cache: dict[tuple[int, int, bool], tuple[np.ndarray, ...]] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def analytical(
        cls, model: ModelShape | None = None, hw: HardwareSpec | None = None, notes: str = ""
    ) -> CostModel:
        return cls(
            model=model or ModelShape.llama2_7b(),
            hardware=hw or HardwareSpec.a800(),
            source="analytical",
            notes=notes,
        )

    @classmethod
    def from_profile(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.exists() and not path.suffix:
            path = PROFILES_DIR / f"{path}.json"
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def default_a800(cls) -> CostModel:
        """The shipped profile of the paper's setup (8x A800, Llama-2-7B)."""
        return cls.from_profile(PROFILES_DIR / "a800-llama2-7b.json")

    # ------------------------------------------------------------------ prefill

    def _analytical_prefill(self, dop: int, tp: int, cross_node: bool) -> PrefillCoeffs:
        m, hw = self.model, self.hardware
        L = m.num_layers
        gemm = hw.gemm_flops_per_s(tp)
        # a: fixed per forward; 2 TP all-reduces per layer; (P-1) ring steps per layer
        a = hw.forward_overhead_s
        if tp > 1:
            a += L * 2 * hw.collective_latency_s
        if dop > 1:
            a += L * (dop - 1) * hw.message_latency_s(cross_node)
        # b: dense FLOPs split over all dop*tp GPUs ...
        b = m.dense_flops_per_token / (dop * tp * gemm)
        if tp > 1:
            # ... plus ring all-reduce bytes of each token's hidden state (2 per layer);
            # TP groups never cross nodes
            ar_bytes = 2.0 * (tp - 1) / tp * m.hidden_size * m.dtype_bytes
            b += L * 2 * ar_bytes / (dop * hw.link_bytes_per_s(cross_node=False))
        if dop > 1:
            # ... plus the ring's K/V blocks: each token's K/V visits P-1 other instances,
            # each GPU of the TP group moving its heads' share. Counted as exposed: for
            # short requests there is little attention to hide it behind, for long ones
            # it is small beside the quadratic term.
            ring_bytes = (dop - 1) / dop * m.kv_bytes_per_token_per_layer / tp
            b += L * ring_bytes / hw.link_bytes_per_s(cross_node)
        # c: causal attention FLOPs per ΣL², split over all GPUs
        c = m.attention_flops(1.0) / (dop * tp * hw.attention_flops_per_s(ring=dop > 1))
        return PrefillCoeffs(a, b, c)

    def prefill_coeffs(self, dop: int, tp: int = 1, cross_node: bool | None = None) -> PrefillCoeffs:
        if dop < 1 or tp < 1:
            raise ValueError("dop and tp must be >= 1")
        cross = self._ring_crosses_nodes(dop, tp) if cross_node is None else bool(cross_node)
        key = (dop, tp, cross)
        hit = self._prefill_cache.get(key)
        if hit is not None:
            return hit
        coeffs = self._fitted_prefill(dop, tp)
        if coeffs is None:
            coeffs = self._analytical_prefill(dop, tp, cross)
        elif cross:
            # fitted profiles come from one node: add the analytical inter-node extra
            near = self._analytical_prefill(dop, tp, False)
            far = self._analytical_prefill(dop, tp, True)
            coeffs = PrefillCoeffs(
                coeffs.a + far.a - near.a, coeffs.b + far.b - near.b, coeffs.c + far.c - near.c
            )
        self._prefill_cache[key] = coeffs
        return coeffs

    def _fitted_prefill(self, dop: int, tp: int) -> PrefillCoeffs | None:
        if (dop, tp) in self.prefill_table:
            return self.prefill_table[(dop, tp)]
        same_tp = [p for (p, t) in self.prefill_table if t == tp]
        if not same_tp:
            return None
        # nearest profiled DoP; the work terms scale with 1/DoP, the fixed part does
        # not (its ring-latency share is re-added from the analytical model)
        p0 = min(same_tp, key=lambda p: (abs(math.log(p / dop)), p))
        base = self.prefill_table[(p0, tp)]
        lat = self.hardware.message_latency_s(False) * self.model.num_layers
        a = max(base.a + lat * ((dop - 1) - (p0 - 1)), 0.0)
        return PrefillCoeffs(a, base.b * p0 / dop, base.c * p0 / dop)

    def _ring_crosses_nodes(self, dop: int, tp: int) -> bool:
        if self.node_of is not None:  # the best ring of `dop` instances stays on the fullest node
            return dop > max(self.node_of.count(n) for n in set(self.node_of))
        return dop * tp > self.hardware.gpus_per_node

    def set_placement(self, node_of: tuple[str, ...]) -> None:
        """Tell the model where the group's instances are (instance i on node_of[i])."""
        self.node_of = tuple(node_of)
        self._prefill_cache.clear()
        self._array_cache.clear()

    def crosses_nodes(self, instances, tp: int = 1) -> bool:
        """Whether a batch on these instances talks across nodes (placement known), else
        the GPU-count rule."""
        instances = tuple(instances)
        if self.node_of is None:
            return self._ring_crosses_nodes(len(instances), tp)
        return len({self.node_of[i] for i in instances}) > 1

    def prefill_time(
        self, dop: int, sum_len: float, sum_len_sq: float, tp: int = 1, cross_node: bool | None = None
    ) -> float:
        """Prefill of a batch with Σ L = sum_len, Σ L² = sum_len_sq on `dop` instances."""
        if sum_len <= 0:
            return 0.0
        return self.prefill_coeffs(dop, tp, cross_node).time(sum_len, sum_len_sq)

    def prefill_coeff_arrays(self, max_dop: int, tp: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, c) as arrays indexed by DoP 0..max_dop (index 0 unused: +inf) for the
        vectorised batching DP. Topology inferred from dop*tp vs GPUs per node."""
        key = (max_dop, tp, False)
        hit = self._array_cache.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        a = np.full(max_dop + 1, np.inf)
        b = np.full(max_dop + 1, np.inf)
        c = np.full(max_dop + 1, np.inf)
        for p in range(1, max_dop + 1):
            co = self.prefill_coeffs(p, tp)
            a[p], b[p], c[p] = co.a, co.b, co.c
        for arr in (a, b, c):
            arr.setflags(write=False)
        self._array_cache[key] = (a, b, c)
        return a, b, c

    # ------------------------------------------------------------------ decode

    def _analytical_decode(self, tp: int, cross_node: bool) -> DecodeCoeffs:
        m, hw = self.model, self.hardware
        L = m.num_layers
        gemm = hw.gemm_flops_per_s(tp)
        hbm = hw.hbm_bytes_per_s()
        a = hw.decode_overhead_s + m.weight_bytes / (tp * hbm)
        b = (m.dense_flops_per_token + m.lm_head_flops) / (tp * gemm)
        if tp > 1:
            a += L * 2 * hw.collective_latency_s
            b += (
                L
                * 2
                * (2.0 * (tp - 1) / tp * m.hidden_size * m.dtype_bytes)
                / hw.link_bytes_per_s(cross_node=False)
            )
        c = m.kv_bytes_per_token / (tp * hbm)
        # exchange per layer: query out, partial (o, lse) back -- two message latencies,
        # a little per extra peer (messages posted back to back), and the bytes
        per_req_bytes = (2 * m.q_size * m.dtype_bytes + m.num_heads * 4) / tp
        # each instance beyond the first, per layer (so a step on n instances pays it
        # (n - 1) x layers times)
        peer = hw.decode_peer_layer_s
        return DecodeCoeffs(
            a=a,
            b=b,
            c=c,
            rt_base=2 * hw.message_latency_s(cross_node) + peer,
            rt_per_peer=0.1 * hw.message_latency_s(cross_node) + peer,
            rt_per_request=per_req_bytes / hw.link_bytes_per_s(cross_node),
        )

    def decode_coeffs(self, tp: int = 1, cross_node: bool = False) -> DecodeCoeffs:
        fitted = self.decode_table.get(tp)
        if fitted is None:
            return self._analytical_decode(tp, cross_node)
        if cross_node:
            near = self._analytical_decode(tp, False)
            far = self._analytical_decode(tp, True)
            return DecodeCoeffs(
                fitted.a,
                fitted.b,
                fitted.c,
                fitted.rt_base + far.rt_base - near.rt_base,
                fitted.rt_per_peer + far.rt_per_peer - near.rt_per_peer,
                fitted.rt_per_request + far.rt_per_request - near.rt_per_request,
            )
        return fitted

    def t_roundtrip(
        self, num_instances: int, requests_per_master: float = 1.0, tp: int = 1, cross_node: bool = False
    ) -> float:
        """One layer's query/partial exchange among `num_instances` (0 when alone)."""
        if num_instances <= 1:
            return 0.0
        co = self.decode_coeffs(tp, cross_node)
        return co.rt_base + co.rt_per_peer * (num_instances - 2) + co.rt_per_request * requests_per_master

    def decode_time(
        self,
        max_requests_per_master: float,
        max_kv_tokens_per_instance: float,
        num_instances: int,
        tp: int = 1,
        cross_node: bool | None = None,
    ) -> float:
        """One decode step, bounded by the busiest master and the busiest holder."""
        if max_requests_per_master <= 0:
            return 0.0
        cross = (num_instances * tp > self.hardware.gpus_per_node) if cross_node is None else bool(cross_node)
        co = self.decode_coeffs(tp, cross)
        t = co.a + co.b * max_requests_per_master + co.c * max_kv_tokens_per_instance
        return t + self.model.num_layers * self.t_roundtrip(num_instances, max_requests_per_master, tp, cross)

    # ------------------------------------------------------------------ chunked prefill

    def chunk_cross_coeff(self, tp: int = 1) -> float:
        """c_x: seconds per (chunk query, cached key) pair on one holder."""
        if tp in self.chunk_table:
            return self.chunk_table[tp]
        m, hw = self.model, self.hardware
        return m.cross_attention_flops(1, 1) / (tp * hw.attention_flops_per_s(ring=False))

    def chunk_cross_time(
        self, chunk_len: int, cached_len: int, num_holders: int, tp: int = 1, cross_node: bool = False
    ) -> float:
        """Extra time of a chunk whose queries attend to `cached_len` cached tokens spread
        over `num_holders` instances (on top of `prefill_time` of the chunk itself)."""
        if chunk_len <= 0 or cached_len <= 0:
            return 0.0
        holders = max(num_holders, 1)
        compute = self.chunk_cross_coeff(tp) * chunk_len * cached_len / holders
        return compute + self.model.num_layers * self.t_roundtrip(holders + 1, chunk_len, tp, cross_node)

    # ------------------------------------------------------------------ KV moves

    def kv_transfer_time(self, num_tokens: int, cross_node: bool = False, tp: int = 1) -> float:
        """Send `num_tokens` tokens of KV (all layers) between two instances; each GPU of
        the TP group sends its heads' share in parallel."""
        if num_tokens <= 0:
            return 0.0
        hw = self.hardware
        nbytes = num_tokens * self.model.kv_bytes_per_token / tp
        return hw.message_latency_s(cross_node) + nbytes / hw.link_bytes_per_s(cross_node)

    def migration_time(self, num_tokens: int, cross_node: bool = False, tp: int = 1) -> float:
        """Move KV between pools: gather on the source, transfer, scatter on the target."""
        if num_tokens <= 0:
            return 0.0
        nbytes = num_tokens * self.model.kv_bytes_per_token / tp
        return (
            self.kv_transfer_time(num_tokens, cross_node, tp) + 2 * nbytes / self.hardware.hbm_bytes_per_s()
        )

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self, dops: Iterable[int] = (), tps: Iterable[int] = ()) -> dict[str, Any]:
        """Profile JSON. Fitted tables are written as they are; for `dops` x `tps` the
        analytical coefficients are materialised too (handy to read and diff)."""
        table = dict(self.prefill_table)
        for tp in tps:
            for dop in dops:
                # table entries are single-node; rings across nodes add the analytical
                # inter-node extra on lookup
                if (dop, tp) not in table and dop * tp <= self.hardware.gpus_per_node:
                    table[(dop, tp)] = self.prefill_coeffs(dop, tp, cross_node=False)
        decode = dict(self.decode_table)
        chunk = dict(self.chunk_table)
        for tp in tps:
            decode.setdefault(tp, self.decode_coeffs(tp))
            chunk.setdefault(tp, self.chunk_cross_coeff(tp))
        return {
            "format": PROFILE_FORMAT,
            "source": self.source,
            "notes": self.notes,
            "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "prefill": [{"dop": d, "tp": t, **asdict(c)} for (d, t), c in sorted(table.items())],
            "decode": [{"tp": t, **asdict(c)} for t, c in sorted(decode.items())],
            "chunk_cross": [{"tp": t, "c_x": v} for t, v in sorted(chunk.items())],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CostModel:
        if d.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a cost profile (format {d.get('format')!r}, want {PROFILE_FORMAT!r})")
        return cls(
            model=ModelShape.from_dict(d["model"]),
            hardware=HardwareSpec.from_dict(d["hardware"]),
            prefill_table={
                (int(r["dop"]), int(r["tp"])): PrefillCoeffs(r["a"], r["b"], r["c"])
                for r in d.get("prefill", [])
            },
            decode_table={
                int(r["tp"]): DecodeCoeffs(**{k: v for k, v in r.items() if k != "tp"})
                for r in d.get("decode", [])
            },
            chunk_table={int(r["tp"]): float(r["c_x"]) for r in d.get("chunk_cross", [])},
            source=d.get("source", "fitted"),
            notes=d.get("notes", ""),
        )

    def save(self, path: str | Path, dops: Iterable[int] = (), tps: Iterable[int] = ()) -> None:
        Path(path).write_text(json.dumps(self.to_dict(dops, tps), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    from esp_core.sched.cost_fit import cli

    return cli(argv)


if __name__ == "__main__":
    raise SystemExit(main())
