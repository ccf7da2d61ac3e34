"""Entry point of multi-instance execution for `InstanceWorker`: picks the ESP path of a
batch and the P2P endpoint of this instance.

The endpoint comes from the initialised default process group (one world group for the
ESP group, rank = instance with TP = 1), set up by whoever starts the instances (the
controller's actors, or the tests' `DistGroup`); `init_esp_group` does that setup.
A worker may also be handed an endpoint explicitly (`worker.comm = P2PComm(...)`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from esp_core.runtime.comm import P2PComm
from esp_core.runtime.esp_decode import decode_esp
from esp_core.runtime.esp_prefill import prefill_esp
from esp_core.sched.plan import DecodeBatch, PrefillBatch, SampledToken

if TYPE_CHECKING:
    from esp_core.runtime.worker import InstanceWorker

# Default per-transfer timeout. An instance may wait for a peer that is still finishing an
# earlier batch of the same plan (batches sharing an instance run back to back), so this
# must exceed the longest batch, not just a network round trip.
DEFAULT_TIMEOUT_S = 600.0


def init_esp_group(
    instance: int,
    num_instances: int,
    init_method: str,
    backend: str = "gloo",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> P2PComm:
    """Join the ESP group's world process group (call once per instance process)."""
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=instance,
        world_size=num_instances,
        timeout=timedelta(seconds=timeout_s),
    )
    return P2PComm.from_world(timeout_s=timeout_s)


def esp_comm(worker: InstanceWorker) -> P2PComm:
    comm = getattr(worker, "comm", None)
    if comm is None:
        if not dist.is_initialized():
            raise RuntimeError(
                f"instance {worker.rank}: a multi-instance batch needs torch.distributed "
                f"initialised over the ESP group ({worker.world_size} instances); call "
                "esp_core.runtime.esp_exec.init_esp_group in every instance process"
            )
        tp_size = worker.tp.size if getattr(worker, "tp", None) is not None else 1
        comm = P2PComm.from_world(tp_size=tp_size, timeout_s=DEFAULT_TIMEOUT_S)
        worker.comm = comm
    if comm.instance != worker.rank:
        raise RuntimeError(
            f"worker is instance {worker.rank} but its P2P endpoint is instance {comm.instance}"
        )
    return comm


def run_esp_batch(worker: InstanceWorker, batch: PrefillBatch | DecodeBatch) -> list[SampledToken]:
    """This instance's part of a batch spanning several instances."""
    comm = esp_comm(worker)
    if isinstance(batch, PrefillBatch):
        return prefill_esp(worker.model, worker.pool, worker.states, batch, worker.rank, comm)
    return decode_esp(worker.model, worker.pool, worker.states, batch, worker.rank, comm)
