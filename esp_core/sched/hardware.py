"""Hardware as the analytical cost model sees it: peaks, links and efficiency factors.

Peaks are datasheet numbers per GPU (dense fp16/bf16 tensor FLOPs, HBM bandwidth, one
direction of NVLink / the NIC share of one GPU). The efficiency factors turn peaks into
what real kernels reach; for the A800 they are calibrated against the LoongServe
paper's measurements (see `esp_core/profiles/a800-llama2-7b.json` and
docs/cost-model.md). H200 and CPU values are estimates, to be replaced by a fitted
profile from real runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_tflops: float  # dense fp16/bf16 per GPU
    hbm_gbps: float  # GB/s per GPU
    intra_node_gbps: float  # GB/s per GPU, one direction (NVLink)
    inter_node_gbps: float  # GB/s per GPU, one direction (its share of the NICs)
    gpus_per_node: int
    # ---- efficiency factors (fractions of the peaks that kernels reach) ----
    gemm_efficiency: float = 0.65  # dense matmuls at TP=1
    tp_gemm_scaling: float = 0.9  # GEMM efficiency multiplier per doubling of TP
    attention_efficiency: float = 0.6  # flash attention (causal prefill)
    ring_attention_efficiency: float = 0.9  # multiplier on the above inside a ring (P > 1)
    memory_efficiency: float = 0.6  # HBM streaming in decode (weights + KV)
    link_efficiency: float = 0.8  # achieved fraction of link bandwidth
    # ---- fixed latencies (seconds) ----
    forward_overhead_s: float = 2.5e-3  # per prefill forward (launches, scheduling)
    decode_overhead_s: float = 1.5e-3  # per decode step (launches, sampling, bookkeeping)
    collective_latency_s: float = 30e-6  # one TP all-reduce, size-independent part
    p2p_latency_s: float = 60e-6  # one ring step / one query-partial message, intra-node
    inter_node_latency_s: float = 15e-6  # extra per message crossing nodes
    # per layer, each instance a decode step spans beyond the first: its turn in the
    # layer's query/partial exchange beyond the messages themselves -- where instances
    # share cores (CPU instances), the master waits for every peer to be scheduled, take
    # the query, compute its partial and answer. ~0 on GPUs (each instance its own device
    # and host threads).
    decode_peer_layer_s: float = 0.0

    def __post_init__(self) -> None:
        for f in ("peak_tflops", "hbm_gbps", "intra_node_gbps", "inter_node_gbps"):
            if getattr(self, f) <= 0:
                raise ValueError(f"HardwareSpec.{f} must be > 0")
        if self.gpus_per_node < 1:
            raise ValueError("gpus_per_node must be >= 1")

    # ---- effective rates -------------------------------------------------------------

    def gemm_flops_per_s(self, tp: int) -> float:
        """Effective dense FLOP/s of ONE GPU inside a TP group of `tp` GPUs."""
        doublings = max(tp, 1).bit_length() - 1
        return self.peak_tflops * 1e12 * self.gemm_efficiency * self.tp_gemm_scaling**doublings

    def attention_flops_per_s(self, ring: bool) -> float:
        eff = self.attention_efficiency * (self.ring_attention_efficiency if ring else 1.0)
        return self.peak_tflops * 1e12 * eff

    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9 * self.memory_efficiency

    def link_bytes_per_s(self, cross_node: bool) -> float:
        gbps = self.inter_node_gbps if cross_node else self.intra_node_gbps
        return gbps * 1e9 * self.link_efficiency

    def message_latency_s(self, cross_node: bool) -> float:
        return self.p2p_latency_s + (self.inter_node_latency_s if cross_node else 0.0)

    # ---- presets ---------------------------------------------------------------------

    @classmethod
    def a800(cls) -> HardwareSpec:
        """8x A800-80GB SXM per node, NVLink 400 GB/s, 4x 200 Gbps IB per node (paper).

        Efficiencies calibrated so the analytical model reproduces the paper's data
        points within 10% (tests/sched/test_cost_model_anchors.py).
        """
        return cls(
            name="a800",
            peak_tflops=312.0,
            hbm_gbps=2039.0,
            intra_node_gbps=200.0,
            inter_node_gbps=12.5,
            gpus_per_node=8,
            # calibrated (min-max relative error over the anchors, all within 2.5%)
            gemm_efficiency=0.70,
            tp_gemm_scaling=1.0,
            attention_efficiency=0.59,
            ring_attention_efficiency=0.93,
            memory_efficiency=0.65,
            link_efficiency=0.64,
            forward_overhead_s=5e-3,
            decode_overhead_s=2.3e-3,
            collective_latency_s=20e-6,
            p2p_latency_s=53e-6,
            # assumed (no anchor): IB hop adds ~15 us per message
            inter_node_latency_s=15e-6,
        )

    @classmethod
    def h200(cls) -> HardwareSpec:
        """8x H200-141GB per node, NVLink 900 GB/s, 8x 400 Gbps NICs (estimates)."""
        return cls(
            name="h200",
            peak_tflops=989.0,
            hbm_gbps=4800.0,
            intra_node_gbps=450.0,
            inter_node_gbps=50.0,
            gpus_per_node=8,
            gemm_efficiency=0.6,
            forward_overhead_s=2.0e-3,
            decode_overhead_s=1.2e-3,
            collective_latency_s=25e-6,
            p2p_latency_s=40e-6,
        )

    @classmethod
    def cpu(cls) -> HardwareSpec:
        """This 2-core VM running CPU instances, gloo over loopback (rough measurements:
        1 MiB one-way ~0.35 ms, 16 MiB ~5.8 ms => ~2.9 GB/s, ~0.1 ms latency)."""
        return cls(
            name="cpu",
            peak_tflops=0.1,
            hbm_gbps=10.0,
            intra_node_gbps=2.9,
            inter_node_gbps=1.0,
            gpus_per_node=64,
            gemm_efficiency=0.3,
            tp_gemm_scaling=0.8,
            attention_efficiency=0.2,
            memory_efficiency=0.5,
            link_efficiency=1.0,
            forward_overhead_s=5e-3,
            decode_overhead_s=5e-3,
            collective_latency_s=0.3e-3,
            p2p_latency_s=0.1e-3,
            inter_node_latency_s=0.5e-3,
            # measured on this VM, 4 instances of 1 thread on 2 cores, one stream: the
            # built-in model (4 layers) at 8,000 tokens decoded in 16 ms a step spread over
            # 4 instances, 5.6 ms on one; SmolLM2-135M (30 layers) at 4,000 tokens in 310
            # ms spread, 195 ms on one (ITL medians, docs/benchmarks.md): ~0.9-1.5 ms per
            # extra instance per layer, while the messages alone take ~0.13 ms
            decode_peer_layer_s=1e-3,
        )

    @classmethod
    def preset(cls, name: str) -> HardwareSpec:
        presets = {"a800": cls.a800, "h200": cls.h200, "cpu": cls.cpu}
        try:
            return presets[name]()
        except KeyError:
            raise ValueError(f"unknown hardware preset {name!r}; known: {sorted(presets)}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareSpec:
        return cls(**d)
