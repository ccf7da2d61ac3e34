"""Fixtures for kernel tests: tolerances and tiny tiling so small shapes hit every path."""

from __future__ import annotations

import pytest
import torch

from esp_serve.kernels import reference

# Stated tolerances (architecture.md §6). fp32: only summation order differs from the naive
# ground truth. bf16/fp16 inputs: both sides compute in fp32 from the same inputs, so
# the LSE stays tight; o is rounded to bf16 once at the end (2^-8 relative).
TOL = {
    torch.float32: dict(o=dict(atol=2e-5, rtol=2e-5), lse=dict(atol=2e-5, rtol=2e-5)),
    torch.float16: dict(o=dict(atol=4e-3, rtol=4e-3), lse=dict(atol=2e-4, rtol=2e-4)),
    torch.bfloat16: dict(o=dict(atol=2e-2, rtol=2e-2), lse=dict(atol=2e-4, rtol=2e-4)),
}


def assert_attention_close(o, lse, o_ref, lse_ref, dtype):
    """o/lse vs the fp32 ground truth; -inf rows must match exactly; never NaN."""
    assert not torch.isnan(o).any() and not torch.isnan(lse).any(), "NaN in result"
    assert lse.dtype == torch.float32
    empty = torch.isneginf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty), "rows without keys differ"
    assert (o.float()[empty] == 0).all(), "rows without keys must have o = 0"
    torch.testing.assert_close(lse, lse_ref, **TOL[dtype]["lse"])
    torch.testing.assert_close(o.float(), o_ref.float().to(o.dtype).float(), **TOL[dtype]["o"])


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Kernel tests use small tensors: one intra-op thread avoids OpenMP barrier stalls
    when the 2 CI cores are shared (measured: 20 ms per tiny index_add with 2 threads on
    a loaded host, 20 us with 1). Restored afterwards for other test areas."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["default", "tiny"])
def tiling(request, monkeypatch):
    """Run a test with the production block sizes and with tiny ones (every code path:
    skipped/full/diagonal tiles, key runs, batched split-KV chunks and groups)."""
    if request.param == "tiny":
        for name, value in dict(
            BLOCK_Q=8,
            BLOCK_K=4,
            RUN_K=12,
            RUN_BYTES=1 << 30,
            FEW_Q=3,
            CHUNK_K=5,
            GROUP_BYTES=4096,
            DECODE_WIDTH=16,
            DECODE_PAD_SLACK=-1.0,  # never: lists over 16 keys stay on the key-chunked driver
        ).items():
            monkeypatch.setattr(reference, name, value)
    return request.param


@pytest.fixture(params=["fused", "math"])
def engine(request, monkeypatch):
    """The fused CPU op and the plain-matmul fallback engine."""
    if request.param == "math":
        monkeypatch.setattr(reference, "_FUSED_CPU", None)
        monkeypatch.setattr(reference, "MATH_SCORES", 4096)  # several key chunks per call
    elif reference._FUSED_CPU is None:
        pytest.skip("this torch build lacks the fused CPU flash-attention op")
    return request.param
