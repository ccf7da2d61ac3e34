"""Tiny, deterministic HF tokenizer directories for tests (no downloads).

    build_hf_tokenizer_dir(path)                      # byte-level BPE, ChatML template
    build_hf_tokenizer_dir(path, kind="sentencepiece")  # Llama-2 style: ▁, <0xNN> byte fallback

Both are BPE models trained with the `tokenizers` library on a small built-in text, saved as
tokenizer.json + tokenizer_config.json (+ generation_config.json), the files a model
directory from the Hub has. Training runs over a fixed corpus (the BPE trainer breaks
count ties deterministically); tests/tokenizer checks that two builds are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# A small multilingual corpus: enough merges to make real multi-byte tokens, CJK and emoji
# so that characters get split across tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! Hello again, world.",
    "Elastic sequence parallelism scales prefill across many instances.",
    "Decoding is memory bound; prefill is compute bound.",
    "The scheduler decides; the instances execute the plan.",
    "Naïve café déjà vu — résumé coöperate.",
    "日本語のテキストも少し含めます。東京は日本の首都です。",
    "中文文本：你好，世界！长上下文推理。",
    "Emoji: 😀 🚀 👍🏽 🇺🇸 and symbols ∑ ∞ ≈ ≠.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159",
    "User: what is the capital of France?\nAssistant: Paris.",
]

CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<pad>"]
SENTENCEPIECE_SPECIALS = ["<unk>", "<s>", "</s>"]


def _train(tokenizer: Tokenizer, trainer: trainers.Trainer) -> None:
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer, length=len(CORPUS) * 4)


def build_byte_level_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """GPT-2/Llama-3 style: ByteLevel pre-tokenizer and decoder ('Ġ' for space), BOS added by
    the post-processor, ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BYTE_LEVEL_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    _train(tok, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def build_sentencepiece_tokenizer(vocab_size: int = 700) -> Tokenizer:
    """Llama-2 style: '▁' for space (normalizer prepends one), BPE with <0xNN> byte
    fallback tokens at ids 3..258, decoder Replace/ByteFallback/Fuse/Strip."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SENTENCEPIECE_SPECIALS, show_progress=False
    )
    _train(tok, trainer)
    # Re-number the model vocab so that ids 3..258 are the byte tokens <0x00>..<0xFF>,
    # as in Llama-2; merges refer to strings, so they stay valid.
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for token in SENTENCEPIECE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]:
        vocab[token] = len(vocab)
    for token, _ in learned:
        if token not in vocab:
            vocab[token] = len(vocab)
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    # Llama-2's layout: the normalizer prepends "▁" and turns spaces into "▁" (so a leading
    # space survives the decoder's Strip), no pre-tokenizer.
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return tok


def build_hf_tokenizer_dir(
    path: str | Path, kind: str = "byte_level", chat_template: str | None = None, template_file: bool = False
) -> Path:
    """Write a tiny HF tokenizer directory at `path` (created if needed) and return it.

    kind: "byte_level" (ChatML template, eos <|im_end|>, generation_config adds
    <|endoftext|>) or "sentencepiece" (Llama-2 template, eos </s>).
    template_file: write the template to chat_template.jinja instead of the config.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "byte_level":
        tok = build_byte_level_tokenizer()
        config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>", "unk_token": None}
        template = CHATML_TEMPLATE if chat_template is None else chat_template
        generation = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}
    elif kind == "sentencepiece":
        tok = build_sentencepiece_tokenizer()
        config = {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
        }
        template = LLAMA2_TEMPLATE if chat_template is None else chat_template
        generation = {"eos_token_id": tok.token_to_id("</s>"), "bos_token_id": tok.token_to_id("<s>")}
    else:
        raise ValueError(f"unknown kind {kind!r}")
    config.update(
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 4096,
            "clean_up_tokenization_spaces": False,
        }
    )
    if template:
        if template_file:
            (path / "chat_template.jinja").write_text(template, encoding="utf-8")
        else:
            config["chat_template"] = template
    tok.save(str(path / "tokenizer.json"), pretty=True)
    (path / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return path
