"""`ElasticInstance`: the Ray actor of one placement-group bundle (one GPU, or a CPU share).

It wraps `esp_core.runtime.InstanceWorker` (weights + KV slot pool) and executes the part
of each IterationPlan that concerns it. Two concurrency groups keep it responsive: plans
run one at a time in "execute", while `kv_state`/`ready`/`model_info` answer from
"control" even during a long prefill (the controller's status endpoint and health checks
must never wait behind one).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from app.protocol import InstanceKV
from esp_core.sched.plan import BatchResult, IterationPlan

log = logging.getLogger("esp_serve.instance")


@ray.remote(concurrency_groups={"execute": 1, "control": 1})
class ElasticInstance:
    def __init__(self, worker_kwargs: dict[str, Any], rank: int, world_size: int) -> None:
        # Imported here: only instance processes pay for torch.
        from esp_core.runtime.config import WorkerConfig
        from esp_core.runtime.worker import InstanceWorker

        # WorkerConfig.num_threads -> torch.set_num_threads (one thread per CPU instance by
        # default: instances share the machine's cores)
        self.rank = rank
        self.worker = InstanceWorker(WorkerConfig(**worker_kwargs), rank=rank,
                                     world_size=world_size)
        log.info("instance %d/%d ready: %s", rank, world_size, worker_kwargs)

    @ray.method(concurrency_group="execute")
    def execute(self, plan: IterationPlan) -> list[BatchResult]:
        return self.worker.execute(plan)

    @ray.method(concurrency_group="control")
    def ready(self) -> int:
        return self.rank

    @ray.method(concurrency_group="control")
    def kv_state(self) -> InstanceKV:
        return InstanceKV(self.rank, int(self.worker.kv_free_slots()),
                          int(self.worker.kv_total_slots()))

    @ray.method(concurrency_group="control")
    def model_info(self) -> dict[str, Any]:
        arch = self.worker.arch
        return {"vocab_size": int(arch.vocab_size),
                "max_position_embeddings": int(arch.max_position_embeddings),
                # the longest sequence the runtime accepts (scaled RoPE extends it)
                "max_context_len": int(arch.max_context_len),
                "eos_token_ids": tuple(int(t) for t in arch.eos_token_ids)}
