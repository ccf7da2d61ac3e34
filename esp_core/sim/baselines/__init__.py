"""Baseline serving policies as `Scheduler` implementations (same simulator as ESP).

* `vllm`            -- static TP, no chunking, prefill-prioritised, paged KV (vLLM 0.3)
* `chunked-prefill` -- static TP with SplitFuse chunks (LightLLM SplitFuse)
* `pd-disagg`       -- prefill/decode disaggregation with KV transfer (DistServe)
* `static-sp`       -- fixed sequence-parallel rings (the paper's ablation)
"""

from esp_core.sim.baselines.chunked_prefill import chunk_size_for, chunked_prefill_scheduler
from esp_core.sim.baselines.pd_disagg import PDDisaggScheduler
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler
from esp_core.sim.baselines.static_sp import static_sp_scheduler
from esp_core.sim.baselines.vllm import vllm_scheduler

__all__ = [
    "PDDisaggScheduler",
    "StaticConfig",
    "StaticGroupScheduler",
    "chunk_size_for",
    "chunked_prefill_scheduler",
    "static_sp_scheduler",
    "vllm_scheduler",
]
