"""The ESP mechanism with CUDA tensors over gloo (host-staged transfers): the one-GPU test
mode of architecture.md §6 (NCCL refuses two ranks on one device). Skipped without CUDA."""

import pytest
import torch

from tests.esp.test_distributed_decode import DECODE_CASES, _decode_case
from tests.esp.test_ring_attention import CASES, TOL, _ring_case

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("P", [2, 4])
def test_ring_attention_cuda_over_gloo(dist_group, P):
    chunks = CASES["uneven_and_short"]
    keep_plan = [{0: [(s, e)]} for s, e, _ in chunks]
    for res in dist_group.run(_ring_case, P, chunks, 7, keep_plan, (4, 4), "cuda")[:P]:
        o_err, lse_err, keep_ok = res
        assert o_err < TOL and lse_err < TOL and keep_ok


def test_decode_exchange_cuda_over_gloo(dist_group):
    P, lengths, placement, masters, new_kv = DECODE_CASES["zero_token_holder_and_scale_up"]
    res = dist_group.run(_decode_case, P, lengths, placement, masters, new_kv, 3, "cuda")
    for err, store_ok in res[:P]:
        assert err < TOL and store_ok
