"""The packaged default model (SmolLM2-135M-Instruct, a Q4_1 GGUF installed by
scripts/bootstrap.sh) loads by its name and answers as transformers does from the same file."""

from __future__ import annotations

import pytest

from esp_core.runtime.config import WorkerConfig
from esp_core.runtime.model_source import read_arch, resolve_model_path
from esp_core.runtime.worker import InstanceWorker
from esp_core.tokenizer import load_tokenizer
from tests.support.runtime import generate

pytestmark = pytest.mark.slow


def test_packaged_smollm2_answers_a_chat_question():
    path = resolve_model_path("smollm2-135m-instruct")
    assert path.endswith(".gguf")
    arch = read_arch(path)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert arch.kv_bytes_per_token(4) == 46080 and arch.max_context_len == 8192
    tok = load_tokenizer("smollm2-135m-instruct")
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    worker = InstanceWorker(WorkerConfig(model=path, kv_slots=256))
    out = generate(worker, {"q": prompt}, 9)["q"]
    # greedy, as transformers generates from the same GGUF: "The capital of France is Paris."
    assert tok.decode(out).startswith("The capital of France is Paris.")
