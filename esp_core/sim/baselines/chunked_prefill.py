"""`chunked-prefill`: static TP with SplitFuse, as the paper ran LightLLM's SplitFuse (TP=8).

Model, per replica (one TP=8 instance in the paper's setup):
* every iteration is one fused forward: a decode token of every running request plus a
  chunk of up to `chunk_size` tokens of every admitted, unfinished prompt (LightLLM's
  `splitfuse_block_size` is per request), the iteration bounded by `batch_max_tokens`
  (LightLLM's default, 1/6 of the KV pool); the simulator charges the fused forward
  (`BatchTimer.fused`), not a prefill and a decode back to back;
* admission (LightLLM `SplitFuseQueue`): FCFS while the peak-memory check passes (every
  admitted request can run to its output budget, so nothing is preempted) and the new
  prompt's first chunk still fits the iteration's token bound;
* chunk sizes as in the paper: ShareGPT 256, L-Eval 2048, LV-Eval 16384, Mixed 2048
  (Zipf: 2048, our choice).
"""

from __future__ import annotations

from esp_core.sched.interface import ClusterSpec
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler

PAPER_CHUNK_SIZES = {"sharegpt": 256, "l-eval": 2048, "lv-eval": 16384, "mixed": 2048}
DEFAULT_CHUNK_SIZE = 2048


def chunk_size_for(workload: str | None) -> int:
    return PAPER_CHUNK_SIZES.get(workload or "", DEFAULT_CHUNK_SIZE)


def chunked_prefill_scheduler(cluster: ClusterSpec, chunk_size: int) -> StaticGroupScheduler:
    return StaticGroupScheduler(cluster, StaticConfig(group_size=1, admission="reserve",
                                                      chunk_size=chunk_size))
