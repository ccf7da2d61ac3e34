"""The CPU path reuses per-thread scratch buffers: a buffer first made by a caller under
torch.inference_mode() (the runtime) must stay usable by callers outside it, and back."""

import torch

from esp_serve.kernels import naive, reference


def _pool_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    kv_layer = torch.randn(64, 2, 2, 16, generator=g)  # [slots, 2, Hkv, D]
    q = torch.randn(3, 4, 16, generator=g)  # [requests, Hq, D]
    slot_ids = torch.randperm(64, generator=g)[:40]
    cu_q = torch.tensor([0, 1, 2, 3])
    cu_slots = torch.tensor([0, 10, 10, 40])  # the second request holds no slots here
    return q, cu_q, kv_layer, slot_ids, cu_slots


def test_scratch_made_in_inference_mode_is_writable_outside_it():
    for first_inference in (True, False):
        reference._scratch.bufs = {}  # the first call below creates the buffers
        for inference in (first_inference, not first_inference, first_inference):
            with torch.inference_mode(inference):
                args = _pool_case(seed=int(inference))
                o, lse = reference.slot_attention(*args)
                o_ref, lse_ref = naive.slot_attention(*args)
            torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=2e-5)
            assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
