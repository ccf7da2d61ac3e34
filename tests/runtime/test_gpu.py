"""The same runtime on CUDA (skipped without a GPU): matches the CPU run."""

import pytest
import torch

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.worker import InstanceWorker
from esp_core.sched.plan import SamplingParams
from tests.support.runtime import generate_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_cpu(dtype):
    p = SamplingParams(temperature=0.0, logprobs=3, ignore_eos=True)
    prompts = {"a": [256, *b"GPU check"], "b": [256, *b"second prompt, longer"]}
    cpu = generate_tokens(InstanceWorker(WorkerConfig(kv_slots=256)), prompts, 8, p)
    gpu_worker = InstanceWorker(WorkerConfig(device="cuda", dtype=dtype, kv_slots=256))
    gpu = generate_tokens(gpu_worker, prompts, 8, p)
    tol = 1e-3 if dtype == "float32" else 0.3
    for rid in prompts:
        for c, g in zip(cpu[rid], gpu[rid]):
            assert g.logprob == pytest.approx(c.logprob, abs=tol)
            if dtype == "float32":
                assert g.token_id == c.token_id
    assert gpu_worker.kv_free_slots() == 256
