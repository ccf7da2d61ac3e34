"""A prefill or decode step reads nothing back from its tensors on the host.

On a GPU every `.item()`, `int(t)`, `bool(t)`, `.tolist()` or `.cpu()` of a device tensor
waits until the device has finished all queued work, so one such read per layer or per
ring step serialises host and device. Inputs are checked where they arrive, on the plan's
host ints (`check_step_inputs`), and transfer sizes come from the plan, so the forward
pass, ring attention, distributed decode and the KV bookkeeping never need one.

The tests count such reads (`tests/support/host_reads.py`) while real steps run: local
prefill with a chunk over cached KV, local decode, and the ESP code paths (ring prefill,
distributed decode) on a ring of one instance; `tests/esp/test_no_host_sync_esp.py` does
the same on rings of several processes.
"""

from __future__ import annotations

import pytest
import torch

from esp_core.runtime.comm import P2PComm, RankLayout
from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.esp_decode import decode_esp
from esp_core.runtime.esp_prefill import prefill_esp
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import DecodeBatch, NewRequest, SamplingParams
from tests.support import esp as esp_plans
from tests.support.host_reads import describe, host_reads
from tests.support.runtime import decode_plan, prefill_item, prefill_plan, release_plan, run_one

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def worker():
    return InstanceWorker(WorkerConfig(kv_slots=2048))


def test_the_counter_sees_reads():
    # the detector itself: a read from the runtime's code is counted
    from esp_core.runtime import kv_pool

    with host_reads() as reads:
        kv_pool.KVPool(1, 4, 1, 8, torch.float32, "cpu").allocate("r", torch.tensor([0, 1]))
    assert sum(reads.values()) >= 1, reads


def test_local_prefill_and_decode_steps_read_nothing_back(worker):
    prompt = tuple([256, *b"Elastic sequence parallelism, read nothing back " * 4])
    other = (256, *b"hi")
    p = len(prompt)
    plan = prefill_plan(
        [prefill_item("a", 0, p // 2, sample=False), prefill_item("b", 0, len(other))],
        [NewRequest("a", prompt, GREEDY), NewRequest("b", other, GREEDY)],
    )
    with host_reads() as reads:
        worker.execute(plan)
        first = run_one(worker, prefill_plan([prefill_item("a", p // 2, p)])).sampled[0]
        token, pos = first.token_id, p
        for _ in range(3):
            (step,) = run_one(worker, decode_plan({"a": (token, pos)})).sampled
            token, pos = step.token_id, pos + 1
    assert not reads, describe(reads)
    worker.execute(release_plan(["a", "b"]))
    assert worker.kv_free_slots() == worker.kv_total_slots()


def test_esp_prefill_and_decode_read_nothing_back(worker):
    """The ring prefill (ring attention, keep writer) and the distributed decode on a ring
    of one instance: the same code as on larger rings, without peers."""
    comm = P2PComm(0, RankLayout(1))
    prompt = tuple([256, *b"ring attention without host reads " * 3])
    p = len(prompt)
    worker.execute(prefill_plan([], [NewRequest("r", prompt, GREEDY)]))
    item = esp_plans.prefill_item("r", 0, p, 0, esp_plans.even_keep(0, p, [0]))
    with host_reads() as reads:
        (first,) = prefill_esp(
            worker.model, worker.pool, worker.states, esp_plans.prefill_batch([0], [item]), 0, comm
        )
        token, pos = first.token_id, p
        for _ in range(2):
            step = esp_plans.decode_item("r", token, pos, 0, [0], 0)
            batch = DecodeBatch(esp_plans.next_id(), (0,), (step,))
            (out,) = decode_esp(worker.model, worker.pool, worker.states, batch, 0, comm)
            token, pos = out.token_id, pos + 1
    assert not reads, describe(reads)
    worker.execute(release_plan(["r"]))
    assert worker.kv_free_slots() == worker.kv_total_slots()
