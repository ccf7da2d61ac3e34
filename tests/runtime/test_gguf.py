"""GGUF checkpoints against transformers reading the same file (its GGUF loader is the reference).

Tiny files are written in the test with the `gguf` package, one quantisation each; our
loader must produce exactly the weights transformers dequantises from them, and generate
the same greedy tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from esp_core.runtime.config import UnsupportedModelError, WorkerConfig
from esp_core.runtime.gguf_loader import GGUFError, load_gguf_checkpoint, read_gguf_arch
from esp_core.runtime.model import CausalLM
from esp_core.runtime.worker import InstanceWorker
from esp_core.tokenizer import load_tokenizer
from tests.runtime.gguf_files import VOCAB, write_gguf
from tests.runtime.hf_models import INIT_STD, hf_greedy, hf_logits
from tests.support.runtime import generate, reference_logits

QUANTS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
MARGIN = 2e-3


def _tiny_hf(kind: str = "llama", hidden: int = 256, tied: bool = False):
    """Row lengths are multiples of 256: the K-quants' block size."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        kind
    ]
    torch.manual_seed(0)
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        initializer_range=INIT_STD / 4,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return model_cls(cfg).eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny_hf()


def _hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


@pytest.mark.parametrize("qname", QUANTS)
def test_gguf_weights_and_logits_match_transformers(tmp_path, tiny_llama, qname):
    path = write_gguf(tiny_llama, tmp_path / f"tiny-{qname}.gguf", qname)
    arch, ours = load_gguf_checkpoint(path)
    assert arch.architecture == "llama" and arch.num_layers == 2 and arch.num_kv_heads == 2
    hf = _hf_from_gguf(path)
    theirs = hf.state_dict()
    assert set(ours) == set(theirs)
    for name, t in ours.items():
        assert torch.equal(t, theirs[name]), f"{qname}: {name} differs from transformers"
    if qname == "F32":  # lossless: the permuted q/k came back in HF order
        for name, t in tiny_llama.state_dict().items():
            assert torch.equal(ours[name], t), name
    prompt = _prompt(24, 3)
    model = CausalLM(arch, ours)
    torch.testing.assert_close(reference_logits(model, prompt), hf_logits(hf, prompt), atol=2e-4, rtol=0)


@pytest.mark.parametrize("qname", ["Q8_0", "Q4_K"])
def test_gguf_generates_like_transformers(tmp_path, tiny_llama, qname):
    path = write_gguf(tiny_llama, tmp_path / f"tiny-{qname}.gguf", qname)
    hf = _hf_from_gguf(path)
    worker = InstanceWorker(WorkerConfig(model=str(path), kv_slots=256))
    prompt = _prompt(20, 7)
    ours = generate(worker, {"a": prompt}, 12)["a"]
    ref, margins = hf_greedy(hf, prompt, 12)
    compared = 0
    for mine, theirs, margin in zip(ours, ref, margins, strict=True):
        if margin < MARGIN:
            break
        assert mine == theirs, f"step {compared}: {ours} vs transformers {ref}"
        compared += 1
    assert compared >= 3, margins


def test_gguf_qwen3_tied_loads_like_transformers(tmp_path):
    hf_src = _tiny_hf("qwen3", tied=True)
    with torch.no_grad():
        for n, p in hf_src.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn_like(p) * 0.2)
    path = write_gguf(hf_src, tmp_path / "qwen3.gguf", "F32", arch="qwen3")
    arch, ours = load_gguf_checkpoint(path)
    assert arch.architecture == "qwen3" and arch.qk_norm and arch.tie_word_embeddings
    for name, t in hf_src.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(ours[name], t), name
    prompt = _prompt(24, 4)
    got = reference_logits(CausalLM(arch, ours), prompt)
    torch.testing.assert_close(got, hf_logits(hf_src, prompt), atol=2e-4, rtol=0)


def test_gguf_tokenizer_and_template_from_metadata(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    path = write_gguf(tiny_llama, tmp_path / "tok.gguf", "F32")
    ours = load_tokenizer(str(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello there", "<|im_start|>user\nhi<|im_end|>", "!\"#$%&'()*+,-./0123456789"]:
        assert (
            ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        )
    assert ours.eos_token_ids[0] == 2
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.encode_chat(msgs) == list(
        theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )


def test_unsupported_quantisation_and_architecture_are_named(tmp_path, tiny_llama):
    import gguf

    bad = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_tensor(
        "token_embd.weight",
        gguf.quants.quantize(torch.randn(96, 256).numpy(), gguf.GGMLQuantizationType.Q5_0),
        raw_dtype=gguf.GGMLQuantizationType.Q5_0,
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path = write_gguf(tiny_llama, tmp_path / "ok.gguf", "Q8_0")
    from gguf import GGUFReader

    from esp_core.runtime.gguf_loader import dequantize_tensor

    (q5,) = GGUFReader(str(bad)).tensors
    with pytest.raises(GGUFError, match="Q5_0.*not supported.*Q4_K"):
        dequantize_tensor(q5)
    assert read_gguf_arch(path).vocab_size == VOCAB
    phi = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(phi), "phi2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="phi2.*not supported.*llama"):
        read_gguf_arch(phi)
