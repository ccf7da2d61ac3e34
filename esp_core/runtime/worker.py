"""`InstanceWorker`: one elastic instance (model + KV pool + request states) executing plans.

It applies a plan's new requests and releases, then runs every batch that names this
instance and returns one `BatchResult` per such batch. Single-instance batches run here
(`local_exec`); batches spanning several instances go to the ESP executor
(`esp_exec.run_esp_batch`: striped ring prefill, multi-master decode).
"""

from __future__ import annotations

import logging
import time

import torch

from esp_core.runtime.builtin import builtin_arch, builtin_state_dict
from esp_core.runtime.config import ModelArch, WorkerConfig
from esp_core.runtime.esp_exec import esp_comm, run_esp_batch
from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.local_exec import decode_local, prefill_local
from esp_core.runtime.migration import run_migrations
from esp_core.runtime.model import DTYPES, CausalLM
from esp_core.runtime.request_state import RequestState
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    IterationPlan,
    PrefillBatch,
    ReleaseReason,
)
from esp_serve.kernels import api as kernels

log = logging.getLogger(__name__)


def load_model(config: WorkerConfig) -> CausalLM:
    """The model named by the config, in its dtype on its device."""
    dtype, device = DTYPES[config.dtype], torch.device(config.device)
    if config.is_builtin:
        return CausalLM(builtin_arch(), builtin_state_dict(config.builtin_seed), dtype, device)
    if config.model.endswith(".gguf"):
        from esp_core.runtime.gguf_loader import load_gguf_checkpoint

        arch, weights = load_gguf_checkpoint(config.model, dtype=dtype, device="cpu")
    else:
        from esp_core.runtime.weights import load_hf_checkpoint

        arch, weights = load_hf_checkpoint(config.model, dtype=dtype, device="cpu")
    return CausalLM(arch, weights, dtype, device)


def plan_instance_memory(config: WorkerConfig, arch: ModelArch, weight_bytes: int | None = None):
    """The pool plan of this instance's budget (None: no budget, kv_slots unchecked).

    Called once before the weights load (estimated from the parameter count: a budget
    that cannot hold them fails in seconds) and once after (measured).
    """
    from esp_core.runtime.memory import plan_pool
    from esp_core.runtime.memory import weight_bytes as estimate

    budget = config.memory_budget_bytes
    if budget is None and config.memory_fraction is not None and config.device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(config.device)).total_memory
        budget = int(total * config.memory_fraction)
    if budget is None:
        return None
    weights = estimate(arch, DTYPES[config.dtype].itemsize) if weight_bytes is None else weight_bytes
    return plan_pool(arch, config.dtype, budget, weights, config.prefill_piece_tokens, config.kv_slots)


def model_weight_bytes(model: CausalLM) -> int:
    """Bytes of every weight tensor the model holds (the tied LM head counted once)."""
    seen: set[int] = set()
    total = 0
    tensors = [model.embed_tokens, model.lm_head, model.norm]
    for layer in model.layers:
        tensors.extend(t for t in vars(layer).values() if isinstance(t, torch.Tensor))
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class InstanceWorker:
    def __init__(self, config: WorkerConfig, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"WorkerConfig.device={config.device!r} but CUDA is not available; set device='cpu'"
            )
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        kernels.set_backend(config.attention_backend)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        from esp_core.runtime.model_source import read_arch

        plan_instance_memory(config, read_arch(config.model))  # refuses before loading
        self.model = load_model(config)
        a = self.model.arch
        # the measured plan; None: no budget given, kv_slots as configured
        self.memory_plan = plan_instance_memory(config, a, model_weight_bytes(self.model))
        slots = self.memory_plan.kv_slots if self.memory_plan is not None else config.kv_slots
        self.pool = KVPool(
            a.num_layers, slots, a.num_kv_heads, a.head_dim, self.model.dtype, self.model.device
        )
        self.states: dict[str, RequestState] = {}
        # P2P endpoint for multi-instance batches (esp_exec), made lazily from the world group.
        self.comm = None

    @property
    def arch(self) -> ModelArch:
        return self.model.arch

    def kv_free_slots(self) -> int:
        return self.pool.num_free_slots

    def kv_total_slots(self) -> int:
        return self.pool.num_total_slots

    # ----------------------------------------------------------------- plan
    def apply_bookkeeping(self, plan: IterationPlan) -> None:
        """New requests, releases and migrations of a plan (everything before batches)."""
        for req in plan.new_requests:
            # A re-sent request (e.g. after preemption) keeps the outputs it already has.
            if req.request_id not in self.states:
                self.states[req.request_id] = RequestState.from_new(req)
        for rel in plan.releases:
            if self.rank not in rel.instances:
                continue
            self.pool.free(rel.request_id)
            if rel.reason != ReleaseReason.PREEMPTED:
                self.states.pop(rel.request_id, None)
        if any(self.rank in (m.src, m.dst) and m.src != m.dst for m in plan.migrations):
            run_migrations(self.pool, plan.migrations, self.rank, esp_comm(self))

    def execute(self, plan: IterationPlan) -> list[BatchResult]:
        """Apply the plan's bookkeeping, then run every batch naming this instance.

        A batch that fails returns a BatchResult with `error` set (and frees the slots it
        allocated); multi-instance batches raise NotImplementedError.
        """
        self.apply_bookkeeping(plan)
        results = []
        for batch in plan.batches():
            if self.rank in batch.instances:
                results.append(self.run_batch(batch))
        return results

    def run_batch(self, batch: PrefillBatch | DecodeBatch) -> BatchResult:
        kind = "prefill" if isinstance(batch, PrefillBatch) else "decode"
        start = time.perf_counter()
        try:
            if tuple(batch.instances) != (self.rank,):  # spans several instances: ESP
                sampled = run_esp_batch(self, batch)
            elif kind == "prefill":
                sampled = prefill_local(self.model, self.pool, self.states, batch, self.rank)
            else:
                sampled = decode_local(self.model, self.pool, self.states, batch, self.rank)
            self._sync()
        except NotImplementedError:
            raise
        except Exception as e:  # reported to the scheduler, which fails the requests
            log.exception("%s batch %s failed", kind, batch.batch_id)
            if len(batch.instances) > 1 and self.comm is not None:
                # peers may be blocked on a transfer with this instance: unblock them
                self.comm.abort(
                    f"{kind} batch {batch.batch_id} failed on instance {self.rank}: {type(e).__name__}"
                )
            return BatchResult(
                batch.batch_id,
                kind,
                tuple(batch.instances),
                elapsed_s=time.perf_counter() - start,
                error=f"{type(e).__name__}: {e}",
            )
        return BatchResult(
            batch.batch_id,
            kind,
            tuple(batch.instances),
            tuple(sampled),
            elapsed_s=time.perf_counter() - start,
        )

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
