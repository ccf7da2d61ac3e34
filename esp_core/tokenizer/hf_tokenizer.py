"""A tokenizer backed by an HF `tokenizers` tokenizer.json plus its config files.

Only data is read from the model directory (JSON and jinja text); nothing in it is ever
imported or executed (no `auto_map`, no custom tokenizer classes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer as HFRustTokenizer

from esp_core.tokenizer.base import Tokenizer
from esp_core.tokenizer.chat_template import ChatTemplate
from esp_core.tokenizer.text_utils import encodable_utf8


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by ByteLevel (space -> 'Ġ', etc.)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTELEVEL_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}
_U32_MAX = 2**32 - 1  # the backend's id type


@dataclass(frozen=True)
class DecoderView:
    """What the streaming code needs to know about a tokenizer.json decoder.

    kind: "byte_level" (GPT-2 style: token chars map to bytes), "metaspace" (sentencepiece
    style: a replacement char stands for space, optional <0xNN> byte fallback), or None
    (unknown decoder: no byte view).
    """

    kind: str | None
    replacement: str = "\u2581"
    byte_fallback: bool = False

    @staticmethod
    def from_config(decoder: Mapping[str, Any] | None) -> DecoderView:
        if not decoder:
            return DecoderView(None)
        parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        types = [p.get("type") for p in parts]
        if "ByteLevel" in types:
            return DecoderView("byte_level")
        byte_fallback = "ByteFallback" in types
        for part in parts:
            if part.get("type") == "Metaspace":
                return DecoderView("metaspace", part.get("replacement", "\u2581"), byte_fallback)
            if part.get("type") == "Replace" and part.get("content") == " ":
                pattern = part.get("pattern", {})
                if isinstance(pattern, Mapping) and isinstance(pattern.get("String"), str):
                    return DecoderView("metaspace", pattern["String"], byte_fallback)
        if byte_fallback:
            return DecoderView("metaspace", "\u2581", True)
        return DecoderView(None)


def _byte_fallback_value(token: str) -> int | None:
    """0xNN for a sentencepiece byte token "<0xNN>", else None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None


class HFTokenizer(Tokenizer):
    """Tokenizer over `tokenizers.Tokenizer`. Built by `load_tokenizer(path)`.

    Streaming note (sentencepiece ByteFallback decoders): `decode` turns a whole run of
    <0xNN> tokens into one U+FFFD per byte if any byte of the run is invalid, so a later
    byte can change the text of earlier, complete characters. The streaming detokenizer
    emits each character once it is complete (holding a run until it ends would delay
    every byte-fallback CJK character), so for such *invalid* runs its text shows the valid
    characters where `decode` shows U+FFFD. Valid output decodes identically.
    """

    def __init__(
        self,
        name: str,
        backend: HFRustTokenizer,
        decoder_config: Mapping[str, Any] | None,
        *,
        bos_token: str | None,
        eos_token: str | None,
        extra_eos_ids: Sequence[int] = (),
        special_tokens_map: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        pad_token: str | None = None,
    ):
        self.name = name
        self._tk = backend
        self._view = DecoderView.from_config(decoder_config)
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = (max(vocab.values()) + 1) if vocab else 0
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        eos_ids: list[int] = []
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        for tid in ([eos_id] if eos_id is not None else []) + [int(i) for i in extra_eos_ids]:
            if tid not in eos_ids:
                eos_ids.append(tid)
        self.eos_token_ids = tuple(eos_ids)
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token else None
        self.special_token_ids = frozenset(
            tid for tid, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self.model_max_length = model_max_length
        self._special_tokens_map = dict(special_tokens_map or {})
        self._chat_template = ChatTemplate(chat_template) if chat_template else None
        self._chat_encode_adds_special_tokens = False
        self._byte_cache: dict[int, bytes] = {}

    # ------------------------------------------------------------------ primitives
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(encodable_utf8(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # Unknown ids are skipped by the backend (a model's padded vocab may emit them);
        # ids outside u32 would make it raise instead, so drop them here the same way.
        ids = [int(i) for i in ids]
        if any(i < 0 or i > _U32_MAX for i in ids):
            ids = [i for i in ids if 0 <= i <= _U32_MAX]
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        if token_id < 0 or token_id > _U32_MAX:
            return None
        return self._tk.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def template_variables(self) -> dict[str, Any]:
        # HF passes the whole special-tokens map (bos/eos/unk/pad/...) to templates
        return {
            **self._special_tokens_map,
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
        }

    # ------------------------------------------------------------------ streaming support
    @property
    def decoder_kind(self) -> str | None:
        return self._view.kind

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes | None:
        if self._view.kind is None:
            return None
        token_id = int(token_id)
        if skip_special_tokens and token_id in self.special_token_ids:
            return b""
        cached = self._byte_cache.get(token_id)
        if cached is not None:
            return cached
        token = self.id_to_token(token_id)
        if token is None:
            piece = b""
        elif self._view.kind == "byte_level":
            try:
                piece = bytes(_BYTELEVEL_CHAR_TO_BYTE[c] for c in token)
            except KeyError:  # ByteLevel passes tokens with unmapped chars through as-is
                piece = token.encode("utf-8")
        else:
            value = _byte_fallback_value(token) if self._view.byte_fallback else None
            if value is not None:
                piece = bytes((value,))
            else:
                piece = token.replace(self._view.replacement, " ").encode("utf-8")
        if len(self._byte_cache) < 1_000_000:
            self._byte_cache[token_id] = piece
        return piece
