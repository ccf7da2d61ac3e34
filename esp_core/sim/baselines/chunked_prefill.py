"""`chunked-prefill`: static TP with SplitFuse, as the paper ran LightLLM's SplitFuse (TP=8).

Source of the settings: the LoongServe artifact's launch line for LightLLM
(test/longserve/5-start-api-server.py: `--splitfuse_mode --splitfuse_block_size
{256, 2048, 16384, 2048} --batch_max_tokens 600000 --running_max_req_size
{1024, 256, 256, 1024}` for ShareGPT / L-Eval / LV-Eval / Mixed, `--mode
triton_flashdecoding`) and LightLLM's splitfuse input preparation. Model, per replica
(one TP=8 instance in the paper's setup):
* every iteration is one fused forward: a decode token of every running request plus a
  chunk of up to `chunk_size` tokens of every admitted, unfinished prompt (LightLLM's
  `splitfuse_block_size` is per request), the iteration bounded by `batch_max_tokens`
  (600,000); the simulator charges the fused forward (`BatchTimer.fused`), not a prefill
  and a decode back to back; a chunk's queries attend to the request's whole cached
  prefix (`chunk_cross_time`), so a long prompt's chunks cost more the later they come;
* admission (LightLLM `SplitFuseQueue`): FCFS while the peak-memory check passes (every
  admitted request can run to its output budget, so nothing is preempted), the running
  batch has fewer than `running_max_req_size` requests and the new prompt's first chunk
  still fits the iteration's token bound;
* chunk sizes as in the paper: ShareGPT 256, L-Eval 2048, LV-Eval 16384, Mixed 2048
  (Zipf: 512, the artifact's).

Engine timing (`LIGHTLLM_SF_ENGINE`): the chunk attention is LightLLM's Triton splitfuse
kernel, which gathers the prefix K/V through the token index table of the token-level
KV pool; Triton flash-attention kernels of early 2024 reached roughly 50-70% of
FlashAttention-2 on A100, so `attention_slowdown` is 1.7 (ASSUMED within that range; the
profile itself is anchored to LoongServe, whose ring attention is FA2-class). Host work
(router, detokenizer) runs in separate processes overlapping the GPU: no host term.
"""

from __future__ import annotations

from esp_core.sched.interface import ClusterSpec
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler
from esp_core.sim.timing import ExecutionModel

PAPER_CHUNK_SIZES = {"sharegpt": 256, "l-eval": 2048, "lv-eval": 16384, "mixed": 2048, "zipf": 512}
DEFAULT_CHUNK_SIZE = 2048
# The artifact's `--running_max_req_size` per dataset (server configuration, not tuning).
PAPER_RUNNING_MAX_REQ = {"sharegpt": 1024, "l-eval": 256, "lv-eval": 256, "mixed": 1024, "zipf": 1024}
DEFAULT_RUNNING_MAX_REQ = 1024
BATCH_MAX_TOKENS = 600_000
LIGHTLLM_SF_ENGINE = ExecutionModel(attention_slowdown=1.7)


def _dataset(workload: str | None) -> str:
    w = workload or ""
    return "zipf" if w.startswith("zipf") else w


def chunk_size_for(workload: str | None) -> int:
    return PAPER_CHUNK_SIZES.get(_dataset(workload), DEFAULT_CHUNK_SIZE)


def running_max_for(workload: str | None) -> int:
    return PAPER_RUNNING_MAX_REQ.get(_dataset(workload), DEFAULT_RUNNING_MAX_REQ)


def chunked_prefill_scheduler(
    cluster: ClusterSpec, chunk_size: int, max_running: int = DEFAULT_RUNNING_MAX_REQ
) -> StaticGroupScheduler:
    return StaticGroupScheduler(
        cluster,
        StaticConfig(
            group_size=1,
            admission="reserve",
            chunk_size=chunk_size,
            max_running=max_running,
            max_batch_tokens=BATCH_MAX_TOKENS,
            execution=LIGHTLLM_SF_ENGINE,
        ),
    )
