"""The kernel entry points read nothing back from the device when the caller passes the
host layout (`kernels/host_layout.py`): the flash adapter maps a striped ring step onto
bottom-right causal attention from host ints alone, and the api/checks layer takes the
offsets from the caller. Counted on CPU (`tests/support/host_reads.py`), where the same
reads happen without stalling; the Triton wrappers are counted under the interpreter
(tests/kernels/triton_interp_cases.py)."""

from __future__ import annotations

import pytest
import torch

from esp_serve.kernels import api as kernels
from esp_serve.kernels import flash_adapter, naive
from esp_serve.kernels.host_layout import HostSeqs
from tests.kernels import cases
from tests.kernels.conftest import assert_attention_close
from tests.kernels.test_flash_mapping import emulated_flash
from tests.support.host_reads import describe, host_reads

F32 = torch.float32
LENGTHS, BASES = [1, 2, 9, 31, 4, 17], [0, 3, 0, 5, 1, 0]


def _step(P, rq, rk, seed):
    q, k, v, qp, kp, cq, ck = cases.striped_step(LENGTHS, P, rq, rk, 4, 2, 16, F32, seed=seed, bases=BASES)
    return (q, k, v, qp, kp, cq, ck), cases.host_layout(cq, qp, P), cases.host_layout(ck, kp, P)


@pytest.mark.parametrize("P", [1, 3, 4])
def test_flash_adapter_maps_striped_steps_from_host_layouts_alone(P):
    for rq in range(P):
        for rk in range(P):
            args, host_q, host_k = _step(P, rq, rk, seed=10 * rq + rk)
            with host_reads() as reads:
                res = flash_adapter.varlen_attention(*args, fn=emulated_flash, host_q=host_q, host_k=host_k)
            assert not reads, describe(reads)
            assert res is not None, f"striped step {rq}<-{rk} of P={P} must be expressible"
            assert_attention_close(*res, *naive.varlen_attention(*args), F32)


def test_flash_adapter_without_host_layouts_reads_offsets_and_positions():
    """The counter sees the reads the host layout saves (so the test above can fail)."""
    args, _, _ = _step(3, 1, 2, seed=4)
    with host_reads() as reads:
        assert flash_adapter.varlen_attention(*args, fn=emulated_flash) is not None
    where = " ".join(reads)
    assert "kernels/checks.py" in where and "kernels/flash_adapter.py" in where, describe(reads)


def test_flash_plan_from_host_equals_plan_from_device():
    for P in (2, 3, 4):
        for rq in range(P):
            for rk in range(P):
                (_, _, _, qp, kp, cq, ck), host_q, host_k = _step(P, rq, rk, seed=0)
                on_device = flash_adapter.plan_causal(qp, kp, cq.tolist(), ck.tolist())
                on_host = flash_adapter.plan_causal(qp, kp, cq.tolist(), ck.tolist(), host_q, host_k)
                assert on_host == on_device, (P, rq, rk)


def test_flash_plan_refuses_host_strides_that_differ():
    """Queries stepping by 2 and keys by 3 are no single progression: Triton's job."""
    qp, kp = torch.tensor([0, 2, 4]), torch.tensor([0, 3, 6])
    host_q, host_k = HostSeqs.of([0, 3], [0], 2), HostSeqs.of([0, 3], [0], 3)
    assert flash_adapter.plan_causal(qp, kp, [0, 3], [0, 3], host_q, host_k) is None


def test_api_entry_points_take_offsets_from_the_caller():
    """varlen_attention, attention_accumulate and slot_attention through the api on the
    torch backend: no read outside the CPU engine (kernels/reference.py) itself."""
    args, host_q, host_k = _step(2, 1, 0, seed=7)
    q = args[0]
    sq, scq, kv, ids, scs = cases.slot_case([1, 1, 0, 1], [3, 0, 6, 40], 4, 2, 16, F32, seed=2)
    host_sq, host_ss = cases.host_layout(scq), cases.host_layout(scs)
    o_acc = torch.zeros(q.shape, dtype=F32)
    lse_acc = torch.full(q.shape[:2], float("-inf"))
    with host_reads() as reads:
        o, lse = kernels.varlen_attention(*args, host_q=host_q, host_k=host_k)
        kernels.attention_accumulate(o_acc, lse_acc, *args, host_q=host_q, host_k=host_k)
        so, slse = kernels.slot_attention(sq, scq, kv, ids, scs, host_q=host_sq, host_slots=host_ss)
    assert not reads, describe(reads)
    expect = naive.varlen_attention(*args)
    assert_attention_close(o, lse, *expect, F32)
    assert_attention_close(o_acc, lse_acc, *expect, F32)
    assert_attention_close(so, slse, *naive.slot_attention(sq, scq, kv, ids, scs), F32)


def test_a_host_copy_that_does_not_fit_the_tensor_is_refused():
    args, host_q, _ = _step(2, 0, 0, seed=1)
    short = HostSeqs.of(host_q.cu[:-1])
    with pytest.raises(ValueError, match="host copy"):
        kernels.varlen_attention(*args, host_q=short)
    wrong_total = HostSeqs.of([*host_q.cu[:-1], host_q.cu[-1] + 1])
    with pytest.raises(ValueError, match="host copy"):
        kernels.varlen_attention(*args, host_q=wrong_total)


def test_a_bound_for_replayed_launches_needs_the_triton_kernel():
    """max_slots (what a CUDA graph records) has no meaning for the torch engine, which
    plans on host offsets: refused rather than silently ignored."""
    q, cq, kv, ids, cs = cases.slot_case([1, 1], [3, 5], 4, 2, 16, F32, seed=3)
    with pytest.raises(ValueError, match="Triton"):
        kernels.slot_attention(q, cq, kv, ids, cs, host_q=cases.host_layout(cq), max_slots=512)
