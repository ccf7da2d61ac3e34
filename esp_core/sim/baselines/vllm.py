"""`vllm`: static tensor parallelism as the paper ran vLLM 0.3 (TP=8 over all GPUs).

Source of every setting: the LoongServe artifact's launch line for vLLM
(test/longserve/5-start-api-server.py: `--enforce-eager --disable-custom-all-reduce
--engine-use-ray --worker-use-ray --block-size 16 --max-num-batched-tokens 600000
--max-num-seqs 1024 --max-model-len 500000`) and vLLM 0.3's scheduler
(`Scheduler._schedule`, v0.3.x). Per replica:
* one instance of TP=8 (`ClusterSpec(1, kv_slots, tp_per_instance=8)`); more instances
  are independent replicas (the paper's "4 replicas of TP2" ablation);
* no chunked prefill, prefill-prioritised: whenever waiting prompts fit, the iteration
  is a prefill-only batch of them (FCFS, stop at the first that does not fit) and the
  running decodes wait; otherwise one decode step of every running request;
* the prefill batch is a padded [n, longest prompt] tensor: the 600,000-token budget
  counts n x longest, a prompt joins only while the padding stays <= 256 tokens
  (`max_paddings`, vLLM 0.3's default), and the forward computes the padded shape;
* paged KV in 16-token blocks; a prompt is admitted when its blocks plus a 1% watermark
  are free -- no room is reserved for outputs; when a decode step cannot get a block,
  the latest-arrived running request is preempted by recomputation (its KV dropped, it
  re-enters the queue first and is re-prefilled over prompt + outputs);
* at most 1024 running sequences (`--max-num-seqs 1024`).

Engine timing (`VLLM_ENGINE`, applied by the simulator on top of the shared profile,
which is anchored to LoongServe's LightLLM-based engine):
* prefill attention runs xformers' memory-efficient (CUTLASS) kernel, not a
  FlashAttention-2-class one: `attention_slowdown` 1.5 (the FlashAttention-2 paper
  reports FA2 forward 1.3-2x faster than xformers' kernel on A100 at head dim 128; the
  middle of that range);
* host time that does not overlap the GPU: vLLM <= 0.5 runs scheduling, input
  preparation, sampling, incremental detokenization and output building synchronously
  between forwards (vLLM's v0.6.0 performance post: for an 8B model, GPU execution was
  only ~38% of the time; HTTP server 33%, scheduling 29%), here further in eager mode
  (no CUDA graphs: ~32 x 15 kernel launches per forward on 8 GPUs), NCCL all-reduce
  instead of the custom one, and the engine behind a Ray actor. Modelled as 5 ms per
  iteration + 0.2 ms per sequence in it (about 1.6x the GPU time of a mid-size decode
  batch, the ratio that post measured).
"""

from __future__ import annotations

from esp_core.sched.interface import ClusterSpec
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler
from esp_core.sim.timing import ExecutionModel

VLLM_ENGINE = ExecutionModel(
    attention_slowdown=1.5, iteration_overhead_s=0.005, per_seq_overhead_s=0.0002, padded_prefill=True
)

VLLM_CONFIG = StaticConfig(
    group_size=1,
    admission="paged",
    block_size=16,
    watermark=0.01,
    max_running=1024,
    max_batch_tokens=600_000,
    max_paddings=256,
    execution=VLLM_ENGINE,
)


def vllm_scheduler(cluster: ClusterSpec) -> StaticGroupScheduler:
    return StaticGroupScheduler(cluster, VLLM_CONFIG)
