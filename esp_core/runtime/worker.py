"""`InstanceWorker`: one elastic instance (model + KV pool + request states) executing plans.

It applies a plan's new requests and releases, then runs every batch that names this
instance and returns one `BatchResult` per such batch. Single-instance batches run here
(`local_exec`); batches spanning several instances run ESP (`esp_prefill`: striped ring
prefill; `esp_decode`: multi-master decode) over this instance's P2P endpoint.

The worker owns its state: request states, the KV pool and the P2P endpoint change only
through its methods (`execute`, `join_world`, `reset`).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from esp_core.runtime.builtin import builtin_arch, builtin_state_dict
from esp_core.runtime.comm import P2PComm, RankLayout
from esp_core.runtime.config import ModelArch, WorkerConfig
from esp_core.runtime.decode_graph import DecodeGraphs
from esp_core.runtime.esp_decode import decode_esp
from esp_core.runtime.esp_prefill import prefill_esp
from esp_core.runtime.kv_pool import KVPool
from esp_core.runtime.local_exec import decode_local, prefill_local
from esp_core.runtime.migration import run_migrations
from esp_core.runtime.model import DTYPES, CausalLM
from esp_core.runtime.request_state import RequestState
from esp_core.runtime.tensor_parallel import TPContext, init_tp_groups
from esp_core.runtime.tp_shapes import local_arch
from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    IterationPlan,
    PrefillBatch,
    ReleaseReason,
    SampledToken,
)
from esp_serve.kernels import api as kernels

log = logging.getLogger(__name__)

# Default per-transfer timeout. An instance may wait for a peer that is still finishing an
# earlier batch of the same plan (batches sharing an instance run back to back), so this
# must exceed the longest batch, not just a network round trip.
DEFAULT_COMM_TIMEOUT_S = 600.0


def load_model(config: WorkerConfig, tp: TPContext | None = None) -> CausalLM:
    """The model named by the config, in its dtype on its device (this TP rank's shard)."""
    dtype, device = DTYPES[config.dtype], torch.device(config.device)
    if config.is_builtin:
        arch = builtin_arch().with_rope_scaling(config.rope_scaling)
        return CausalLM(arch, builtin_state_dict(config.builtin_seed), dtype, device, tp)
    if config.model.endswith(".gguf"):
        from esp_core.runtime.gguf_loader import load_gguf_checkpoint

        if tp is not None and tp.size > 1:
            raise ValueError("GGUF checkpoints load unsharded: use a Hugging Face directory with TP > 1")
        arch, weights = load_gguf_checkpoint(config.model, dtype=dtype, device="cpu")
    else:
        from esp_core.runtime.weights import load_hf_checkpoint

        arch, weights = load_hf_checkpoint(config.model, dtype=dtype, device="cpu", tp=tp)
    return CausalLM(arch.with_rope_scaling(config.rope_scaling), weights, dtype, device, tp)


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
    def __init__(
        self, config: WorkerConfig, rank: int = 0, world_size: int = 1, tp: TPContext | None = None
    ) -> None:
        """`rank` is this instance's index among `world_size` instances; `tp` (None: TP 1)
        makes this process one TP rank of it, holding that rank's heads."""
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
        self.tp = tp
        from esp_core.runtime.model_source import served_arch

        # refuses before loading; a TP rank budgets for its own heads and MLP slice
        plan_instance_memory(config, local_arch(served_arch(config.model, config.rope_scaling), self.tp_size))
        self.model = load_model(config, tp)
        a = self.model.arch
        # the measured plan; None: no budget given, kv_slots as configured
        self.memory_plan = plan_instance_memory(config, a, model_weight_bytes(self.model))
        slots = self.memory_plan.kv_slots if self.memory_plan is not None else config.kv_slots
        # CUDA graphs: single-instance decode at TP 1 (collectives stay eager)
        # (and a Triton-capable backend: the torch engine plans its tiles on the host)
        graphs = (
            config.cuda_graphs
            and self.model.device.type == "cuda"
            and tp is None
            and config.attention_backend != "torch"
        )
        self.pool = KVPool(
            a.num_layers, slots, a.num_kv_heads, a.head_dim, self.model.dtype, self.model.device,
            scratch_slots=1 if graphs else 0,
        )  # fmt: skip
        self.decode_graphs = DecodeGraphs(self.model, self.pool) if graphs else None
        self.states: dict[str, RequestState] = {}
        # P2P endpoint for multi-instance batches: set by `join_world`, or made lazily
        # from a world group its process joined otherwise (the tests' DistGroup).
        self.comm: P2PComm | None = None

    @property
    def arch(self) -> ModelArch:
        return self.model.arch

    def kv_free_slots(self) -> int:
        return self.pool.num_free_slots

    def kv_total_slots(self) -> int:
        return self.pool.num_total_slots

    # ----------------------------------------------------------------- group
    def join_world(
        self,
        init_method: str,
        backend: str,
        init_timeout_s: float,
        comm_timeout_s: float = DEFAULT_COMM_TIMEOUT_S,
    ) -> None:
        """Join the ESP group's world process group (rank = instance * tp_size + tp_rank),
        leaving any earlier one first (a broken gloo group is re-formed by destroy + init),
        create every instance's TP group (with TP > 1: the model's all-reduces run on this
        rank's) and take its P2P endpoint. Blocks until every rank joined, or the timeout."""
        if dist.is_initialized():
            dist.destroy_process_group()
        layout = RankLayout(self.world_size, self.tp_size)
        tp_rank = self.tp.rank if self.tp is not None else 0
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=layout.global_rank(self.rank, tp_rank),
            world_size=layout.world_size,
            timeout=timedelta(seconds=init_timeout_s),
        )
        if self.tp is not None and self.tp.size > 1:
            # the model holds this very TPContext: its collectives use the new group
            self.tp.group = init_tp_groups(layout, timeout_s=comm_timeout_s).group
        self.attach_world(comm_timeout_s)

    def attach_world(self, comm_timeout_s: float = DEFAULT_COMM_TIMEOUT_S) -> None:
        """Take the P2P endpoint of the world group this process already joined."""
        self.comm = P2PComm.from_world(tp_size=self.tp_size, timeout_s=comm_timeout_s)

    @property
    def tp_size(self) -> int:
        return self.tp.size if self.tp is not None else 1

    def _esp_comm(self) -> P2PComm:
        if self.comm is None:
            if not dist.is_initialized():
                raise RuntimeError(
                    f"instance {self.rank}: a multi-instance batch needs torch.distributed "
                    f"initialised over the ESP group ({self.world_size} instances): "
                    "InstanceWorker.join_world in every instance process"
                )
            self.comm = P2PComm.from_world(tp_size=self.tp_size, timeout_s=DEFAULT_COMM_TIMEOUT_S)
        if self.comm.instance != self.rank:
            raise RuntimeError(f"worker is instance {self.rank} but its P2P endpoint is {self.comm.instance}")
        return self.comm

    def reset(self) -> int:
        """Drop every request and free the whole KV pool (their requests were failed or
        re-queued elsewhere); returns the free slots."""
        self.states.clear()
        for rid in self.pool.requests():  # preempted requests' leftovers included
            self.pool.free(rid)
        return self.kv_free_slots()

    # ----------------------------------------------------------------- plan
    def apply_bookkeeping(self, plan: IterationPlan) -> None:
        """New requests, releases, prefix-cache adoptions and migrations of a plan
        (everything before batches)."""
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
        for ad in plan.adoptions:  # prefix-cache hits: slots change owner (or are shared)
            if self.rank not in ad.instances:
                continue
            if ad.share:
                self.pool.share_prefix(ad.src_rid, ad.dst_rid, ad.keep_len)
            else:
                self.pool.adopt(ad.src_rid, ad.dst_rid, ad.keep_len)
                self.states.pop(ad.src_rid, None)
        if any(self.rank in (m.src, m.dst) and m.src != m.dst for m in plan.migrations):
            run_migrations(self.pool, plan.migrations, self.rank, self._esp_comm())

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
            self._inject_faults(batch)
            if tuple(batch.instances) != (self.rank,):  # spans several instances: ESP
                sampled = self._run_esp(batch)
            elif kind == "prefill":
                sampled = prefill_local(self.model, self.pool, self.states, batch, self.rank)
            else:
                sampled = decode_local(
                    self.model, self.pool, self.states, batch, self.rank, self.decode_graphs
                )
            self._sync()
        except NotImplementedError:
            raise
        except Exception as e:  # reported to the scheduler, which fails the requests
            log.exception("%s batch %s failed", kind, batch.batch_id)
            if (len(batch.instances) > 1 or self.tp_size > 1) and self.comm is not None:
                # peers (or this instance's other TP ranks, in an all-reduce) may be
                # blocked on a transfer with this rank: unblock them
                self.comm.abort(
                    f"{kind} batch {batch.batch_id} failed on instance {self.rank}: {type(e).__name__}"
                )
                if self.tp is not None:
                    # the last reference to the destroyed TP group: freeing it closes
                    # its connections (`join_world` makes a new one)
                    self.tp.group = None
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

    def _inject_faults(self, batch: PrefillBatch | DecodeBatch) -> None:
        """Fault injection for tests (WorkerConfig.fault_token / hang_token): a
        deterministic "poison" request fails every batch it is in; a hanging one stalls
        the instance far past any watchdog."""
        cfg = self.config
        if cfg.fault_token is None and cfg.hang_token is None:
            return
        for item in batch.items:
            state = self.states.get(item.request_id)
            prompt = state.prompt_ids if state is not None else ()
            if cfg.hang_token is not None and cfg.hang_token in prompt:
                log.warning("batch %s: injected hang (request %s)", batch.batch_id, item.request_id)
                time.sleep(cfg.hang_s)
            if cfg.fault_token is not None and cfg.fault_token in prompt:
                raise RuntimeError(
                    f"injected fault (request {item.request_id} holds token {cfg.fault_token})"
                )

    def _run_esp(self, batch: PrefillBatch | DecodeBatch) -> list[SampledToken]:
        """This instance's part of a batch spanning several instances."""
        comm = self._esp_comm()
        if isinstance(batch, PrefillBatch):
            return prefill_esp(self.model, self.pool, self.states, batch, self.rank, comm)
        return decode_esp(self.model, self.pool, self.states, batch, self.rank, comm)

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
