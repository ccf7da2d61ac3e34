"""`ElasticInstance`: the Ray actor of one placement-group bundle (one GPU, or a CPU share).

It wraps `esp_core.runtime.InstanceWorker` (weights + KV slot pool) and executes the part
of each IterationPlan that concerns it. Sub-plans do not arrive as Ray calls: the
controller sends them on the instance's plan channel (app/plan_channel.py, a socket
served by one thread, opened by `open_plan_channel`), and they run one at a time in the
order sent (app/plan_order.py orders them against `reset`). Ray's concurrency groups keep
the actor responsive: `reset`/`join_group` run in "execute", while `kv_state`/`ready`/
`model_info` answer from "control" even during a long prefill (the controller's status
endpoint and health checks must never wait behind one).

With `cluster.tensor_parallel_size` = t > 1 an instance is t such actors, one per TP rank,
each holding its shard; all get the same sub-plans, TP rank 0 answers with the results.

Multi-instance batches talk point to point over ONE torch.distributed world group of the
ESP group (rank = instance * t + tp_rank): `rendezvous()` on instance 0 gives the address,
then every rank calls `join_group` at once. After a peer died or a multi-instance batch failed,
`reset` drops every request's state and KV (the controller re-queued them) and
`join_group` with a fresh address re-forms the group (gloo: a killed peer breaks the
group; destroy + re-init works). An instance whose part of a batch failed has already
given up its group (P2PComm.abort), so peers waiting on it fail at once and answer
`reset` promptly.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import ray

from esp_core.sched.plan import BatchResult, IterationPlan
from esp_serve.app.plan_channel import PlanServer
from esp_serve.app.plan_order import PlanTurns
from esp_serve.app.protocol import InstanceKV

log = logging.getLogger("esp_serve.instance")


@ray.remote(concurrency_groups={"execute": 1, "control": 1})
class ElasticInstance:
    def __init__(
        self, worker_kwargs: dict[str, Any], rank: int, world_size: int, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        # Imported here: only instance processes pay for torch.
        from esp_core.runtime.config import WorkerConfig
        from esp_core.runtime.tensor_parallel import TPContext
        from esp_core.runtime.worker import InstanceWorker

        # WorkerConfig.num_threads -> torch.set_num_threads (one thread per CPU instance by
        # default: instances share the machine's cores)
        self.rank = rank
        self.world_size = world_size
        self.tp_rank = tp_rank
        # TP > 1: this actor is one rank of the instance; its TP group is made when the
        # world group forms (`join_group`), the weights it loads now are its shard
        tp = TPContext(tp_rank, tp_size) if tp_size > 1 else None
        self.worker = InstanceWorker(WorkerConfig(**worker_kwargs), rank=rank, world_size=world_size, tp=tp)
        self.turns = PlanTurns()  # sub-plans in the controller's order (app/plan_order.py)
        self._plan_server: PlanServer | None = None
        plan = self.worker.memory_plan
        log.info(
            "instance %d/%d TP rank %d/%d ready: %s; %s",
            rank,
            world_size,
            tp_rank,
            tp_size,
            worker_kwargs,
            plan.describe() if plan else f"KV pool {self.worker.kv_total_slots()} tokens (set explicitly)",
        )

    @ray.method(concurrency_group="control")
    def memory_plan(self) -> dict[str, int]:
        """How this instance split its memory (memory.PoolPlan), or just its pool size."""
        plan = self.worker.memory_plan
        if plan is None:
            return {"kv_slots": int(self.worker.kv_total_slots())}
        return plan.as_dict()

    @ray.method(concurrency_group="control")
    def open_plan_channel(self, token: bytes) -> tuple[str, int]:
        """Serve sub-plans on a socket of this node (its address is returned) to whoever
        presents `token`: the controller, which sent it over Ray (app/plan_channel.py)."""
        if self._plan_server is None:
            self._plan_server = PlanServer(ray.util.get_node_ip_address(), token, self.execute)
        elif not self._plan_server.accepts(token):
            raise PermissionError("this instance's plan channel belongs to another controller")
        return self._plan_server.address

    def execute(self, plan_bytes: bytes, generation: int, seq: int) -> bytes:
        """Run a pickled sub-plan, sub-plan `seq` of the controller's `generation`, once
        every earlier one has run (app/plan_order.py); returns the pickled list of
        BatchResult. Called by the plan channel's thread.

        The plan and the results are bytes made by the standard pickler (Ray's
        cloudpickle calls back into Python for every object of the plan's dataclass tree,
        ~3x slower here); both ends are processes of the same ESP group."""
        plan: IterationPlan = pickle.loads(plan_bytes)
        with self.turns.turn(generation, seq):
            results: list[BatchResult] = self.worker.execute(plan)
        if self.tp_rank > 0:
            # the controller reads TP rank 0's results (every rank samples the same
            # tokens); the others answer with their failures only
            results = [r for r in results if r.error]
        return pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL)

    @ray.method(concurrency_group="control")
    def rendezvous(self) -> tuple[str, int]:
        """This node's IP and a port free on it (instance 0 hosts the group's store)."""
        import socket

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    @ray.method(concurrency_group="execute")
    def join_group(self, init_method: str, backend: str, init_timeout_s: float, comm_timeout_s: float) -> int:
        """Join the world group (blocks until all instances joined, or the timeout)."""
        with self.turns.exclusive(0):
            self.worker.join_world(init_method, backend, init_timeout_s, comm_timeout_s)
        return self.rank

    @ray.method(concurrency_group="execute")
    def reset(self, generation: int = 0) -> int:
        """Drop every request and free the whole KV pool (the controller failed them),
        after the running sub-plan; sub-plans of generations before `generation` are
        refused from now on (their results would be ignored)."""
        with self.turns.exclusive(generation):
            return int(self.worker.reset())

    @ray.method(concurrency_group="control")
    def ready(self) -> int:
        return self.rank

    @ray.method(concurrency_group="control")
    def kv_state(self) -> InstanceKV:
        return InstanceKV(self.rank, int(self.worker.kv_free_slots()), int(self.worker.kv_total_slots()))

    @ray.method(concurrency_group="control")
    def model_info(self) -> dict[str, Any]:
        arch = self.worker.arch
        if self.worker.tp is not None:  # a TP rank computes a shard: report the whole model
            from esp_core.runtime.model_source import served_arch

            arch = served_arch(self.worker.config.model, self.worker.config.rope_scaling)
        return {
            "num_layers": int(arch.num_layers),
            "hidden_size": int(arch.hidden_size),
            "num_heads": int(arch.num_heads),
            "num_kv_heads": int(arch.num_kv_heads),
            "head_dim": int(arch.head_dim),
            "intermediate_size": int(arch.intermediate_size),
            "vocab_size": int(arch.vocab_size),
            "max_position_embeddings": int(arch.max_position_embeddings),
            # the longest sequence the runtime accepts (scaled RoPE extends it)
            "max_context_len": int(arch.max_context_len),
            "eos_token_ids": tuple(int(t) for t in arch.eos_token_ids),
        }
