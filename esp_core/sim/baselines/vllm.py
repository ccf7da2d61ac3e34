"""`vllm`: static tensor parallelism as the paper ran vLLM 0.3 (TP=8 over all GPUs).

Model of vLLM 0.3's scheduler (`Scheduler._schedule`, v0.3.x), per replica:
* one instance of TP=8 (`ClusterSpec(1, kv_slots, tp_per_instance=8)`); more instances
  are independent replicas (the paper's "4 replicas of TP2" ablation);
* no chunked prefill, prefill-prioritised: whenever waiting prompts fit, the iteration
  is a prefill-only batch of them (FCFS, stop at the first that does not fit) and the
  running decodes wait; otherwise one decode step of every running request;
* paged KV in 16-token blocks; a prompt is admitted when its blocks plus a 1% watermark
  are free -- no room is reserved for outputs; when a decode step cannot get a block,
  the latest-arrived running request is preempted by recomputation (its KV dropped, it
  re-enters the queue first and is re-prefilled over prompt + outputs);
* at most 256 running sequences (`max_num_seqs`); the prefill token budget
  (`max_num_batched_tokens`) is the model length, i.e. bounded only by memory here.
"""

from __future__ import annotations

from esp_core.sched.interface import ClusterSpec
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler

VLLM_CONFIG = StaticConfig(group_size=1, admission="paged", block_size=16, watermark=0.01,
                           max_running=256)


def vllm_scheduler(cluster: ClusterSpec) -> StaticGroupScheduler:
    return StaticGroupScheduler(cluster, VLLM_CONFIG)
