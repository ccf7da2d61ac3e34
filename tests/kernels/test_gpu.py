"""GPU kernels (Triton, flash-attn) against the naive ground truth in bf16 on CUDA.

Skipped without CUDA (no GPU was lent while these were written: run them with
`pytest -m gpu tests/kernels` on a GPU host). Tolerances: bf16 inputs, fp32
accumulation; the kernels round P to bf16 before the P.V product (as flash attention
does), so o gets atol/rtol 2e-2 and the fp32 LSE 5e-3.
"""

from __future__ import annotations

import pytest
import torch

from esp_serve.kernels import api as kernels
from esp_serve.kernels import naive
from tests.kernels import cases

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
BF16 = torch.bfloat16


def _close(o, lse, o_ref, lse_ref):
    assert not torch.isnan(o).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref.to(lse.device)))
    torch.testing.assert_close(lse.cpu(), lse_ref.cpu(), atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(o.float().cpu(), o_ref.float().cpu(), atol=2e-2, rtol=2e-2)


@pytest.fixture(params=["triton", "flash"])
def gpu_backend(request):
    if request.param not in kernels.available_backends():
        pytest.skip(f"{request.param} backend not available")
    kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend("auto")


@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_prefill_ring_steps(P, d, gpu_backend):
    lengths, bases = [1, 700, 64, 2049], [0, 3, 0, 17]
    for rq, rk in [(0, 0), (P - 1, 0), (0, P - 1)]:
        q, k, v, qp, kp, cq, ck = cases.striped_step(
            lengths, P, rq, rk, 8, 2, d, BF16, seed=P + d, bases=bases, device="cuda"
        )
        o, lse = kernels.varlen_attention(q, k, v, qp, kp, cq, ck)
        _close(
            o, lse, *naive.varlen_attention(q.cpu(), k.cpu(), v.cpu(), qp.cpu(), kp.cpu(), cq.cpu(), ck.cpu())
        )


def test_accumulate_over_ring(gpu_backend):
    lengths, P, hq, hkv, d = [1500, 333], 4, 8, 1, 128
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = cases.qkv(total, total, hq, hkv, d, BF16, gen)
    pos = torch.cat([torch.arange(n) for n in lengths])
    req = torch.cat([torch.full((n,), b) for b, n in enumerate(lengths)])
    rank = (pos + req) % P
    full = naive.varlen_attention(q, k, v, pos, pos, cases.cu(lengths), cases.cu(lengths))
    starts = [0, lengths[0], total]
    for r in range(P):
        sel_q = rank == r
        cu_q = cases.cu([int(sel_q[starts[b] : starts[b + 1]].sum()) for b in range(2)]).cuda()
        o_acc = torch.zeros((int(sel_q.sum()), hq, d), device="cuda")
        lse_acc = torch.full((int(sel_q.sum()), hq), float("-inf"), device="cuda")
        for step in range(P):
            sel_k = rank == (r - step) % P
            cu_k = cases.cu([int(sel_k[starts[b] : starts[b + 1]].sum()) for b in range(2)]).cuda()
            kernels.attention_accumulate(
                o_acc,
                lse_acc,
                q[sel_q].cuda(),
                k[sel_k].cuda(),
                v[sel_k].cuda(),
                pos[sel_q].cuda(),
                pos[sel_k].cuda(),
                cu_q,
                cu_k,
            )
        _close(o_acc, lse_acc, full[0][sel_q], full[1][sel_q])


@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 1), (4, 4)])
def test_slot_attention_decode(hq, hkv):
    kernels.set_backend("triton" if "triton" in kernels.available_backends() else "auto")
    try:
        q, cq, kv, ids, cs = cases.slot_case(
            [1] * 6 + [5], [1, 0, 4000, 70000, 129, 3, 900], hq, hkv, 128, BF16, seed=hq, device="cuda"
        )
        o, lse = kernels.slot_attention(q, cq, kv, ids, cs)
        _close(o, lse, *naive.slot_attention(q.cpu(), cq.cpu(), kv.cpu(), ids.cpu(), cs.cpu()))
    finally:
        kernels.set_backend("auto")


def test_merge_on_gpu():
    gen = torch.Generator().manual_seed(0)
    outs = [torch.randn(300, 8, 128, generator=gen).cuda() for _ in range(3)]
    lses = [torch.randn(300, 8, generator=gen).cuda() * 10 for _ in range(3)]
    lses[1][:50] = float("-inf")
    outs[1][:50] = float("nan")
    o, lse = kernels.merge_partials(outs, lses)
    o_ref, lse_ref = naive.merge_partials([x.cpu() for x in outs], [x.cpu() for x in lses])
    torch.testing.assert_close(o.cpu(), o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), lse_ref, atol=1e-5, rtol=1e-5)
