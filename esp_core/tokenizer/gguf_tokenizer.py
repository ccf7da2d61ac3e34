"""The tokenizer and chat template of a GGUF file, rebuilt from its metadata.

A GGUF carries the vocabulary (`tokenizer.ggml.tokens`, `token_type`), the BPE merges,
the special token ids and `tokenizer.chat_template`, but not a tokenizer.json. The
byte-level BPE ("gpt2") models are rebuilt as transformers rebuilds them for GGUF files:
BPE over the vocabulary and merges, GPT-2's byte-level pre-tokenizer (with the split
pattern named by `tokenizer.ggml.pre` where the vocabulary was trained with another),
control tokens added as special tokens and user-defined ones as plain added tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFRustTokenizer

from esp_core.tokenizer.errors import TokenizerError
from esp_core.tokenizer.hf_tokenizer import HFTokenizer, _bytes_to_unicode

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split its merges were learned with (others: GPT-2's own regex)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str | None) -> HFRustTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFRustTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    split = _PRE_SPLITS.get(pre or "")
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    """The HFTokenizer a GGUF file describes (TokenizerError if it has none we can build)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise TokenizerError(f"{path}: not a readable GGUF file ({exc})") from exc
    kind = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.model/tokens)")
    if kind != "gpt2":
        raise TokenizerError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)"
        )
    types = _field(reader, "tokenizer.ggml.token_type") or []
    backend = _byte_level_backend(
        tokens, _field(reader, "tokenizer.ggml.merges") or [], _field(reader, "tokenizer.ggml.pre")
    )
    spelled = set(_bytes_to_unicode().values())
    control = [
        AddedToken(tok, normalized=False, special=True)
        for tok, kind_id in zip(tokens, types, strict=False)
        if kind_id == _CONTROL and set(tok) <= spelled
    ]
    backend.add_special_tokens(control)
    user = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind_id in zip(tokens, types, strict=False)
        if kind_id == _USER_DEFINED
    ]
    backend.add_tokens(user)
    special_map: dict[str, Any] = {}
    for name, key in _SPECIAL_IDS.items():
        tid = _field(reader, f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= int(tid) < len(tokens):
            special_map[name] = tokens[int(tid)]
    special_map["additional_special_tokens"] = [t.content for t in control]
    bos_first = bool(_field(reader, "tokenizer.ggml.add_bos_token"))
    if bos_first and "bos_token" in special_map:  # GGUF states it; tokenizer.json would hold it
        bos = special_map["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    context = None
    arch = _field(reader, "general.architecture")
    if arch is not None:
        context = _field(reader, f"{arch}.context_length")
    return HFTokenizer(
        str(path),
        backend,
        json.loads(backend.to_str()).get("decoder"),
        bos_token=special_map.get("bos_token"),
        eos_token=special_map.get("eos_token"),
        extra_eos_ids=[],
        special_tokens_map=special_map,
        chat_template=_field(reader, "tokenizer.chat_template"),
        model_max_length=None if context is None else int(context),
        pad_token=special_map.get("pad_token"),
    )
