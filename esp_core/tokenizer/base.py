"""The Tokenizer interface every tokenizer kind implements (byte tokenizer, HF directory).

Torch-free: the ingress imports this. Subclasses provide the encode/decode primitives and a
byte view of tokens; the chat template, the streaming hold-back decision and a few
conveniences are shared here.
"""

from __future__ import annotations

import abc
import codecs
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from esp_core.tokenizer.chat_template import ChatTemplate
from esp_core.tokenizer.errors import TokenizerError


class Tokenizer(abc.ABC):
    """What the server needs from a tokenizer.

    Attributes set by subclasses:
      name:            the model string it was loaded from ("builtin" or a path).
      vocab_size:      size of the id space (max id + 1), specials included.
      bos_token_id:    id prepended by `encode(..., add_special_tokens=True)` if any, else None.
      eos_token_ids:   every id that ends generation (tokenizer eos + generation_config eos).
      bos_token / eos_token: their text (passed to chat templates), or None.
      special_token_ids: ids that `decode(..., skip_special_tokens=True)` drops.
    """

    name: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    bos_token: str | None
    eos_token: str | None
    pad_token_id: int | None = None
    special_token_ids: frozenset[int] = frozenset()
    model_max_length: int | None = None
    # The template (None = no template) and the extra names it sees (bos_token, ...).
    _chat_template: ChatTemplate | None = None
    # Whether `encode_chat` should let `encode` add BOS: HF templates write bos_token
    # themselves (HF encodes rendered chats with add_special_tokens=False); the built-in
    # template does not, because its encode never parses special-token text.
    _chat_encode_adds_special_tokens: bool = False

    # ------------------------------------------------------------------ primitives
    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids. add_special_tokens: add BOS etc. as the tokenizer defines."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text. Invalid UTF-8 becomes U+FFFD; unknown ids are skipped."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of an id (e.g. 'Ġthe', '<0xE4>', '<s>'), None if unknown."""

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, None if absent."""

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes | None:
        """The bytes this token contributes to decoded text, before UTF-8 decoding.

        Used only to decide whether streaming must hold text back (an incomplete UTF-8
        character at the end). b"" for skipped specials and unknown ids. None means "this
        tokenizer has no byte view" and the detokenizer falls back to a heuristic.
        """
        return None

    # ------------------------------------------------------------------ conveniences
    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_ids

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        return [self.id_to_token(int(i)) for i in ids]

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (first of eos_token_ids), for APIs that want just one."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template.source if self._chat_template is not None else None

    def template_variables(self) -> dict[str, Any]:
        """Names every template sees besides messages (HF passes its special-token map)."""
        return {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text, like HF `apply_chat_template(tokenize=False)`.

        chat_template overrides the tokenizer's own (e.g. a server flag). Extra kwargs
        (e.g. enable_thinking) reach the template as variables. Raises TokenizerError when
        there is no template or the template raises (raise_exception, syntax, sandbox).
        """
        template = self._chat_template
        if chat_template is not None:
            template = ChatTemplate(chat_template)
        if template is None:
            raise TokenizerError(
                f"tokenizer {self.name!r} has no chat template; pass chat_template= or use "
                "the completions API"
            )
        variables = {**self.template_variables(), **kwargs}
        return template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            **variables,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> list[int]:
        """Render and tokenize a conversation the way this tokenizer's template expects
        (no double BOS). Same arguments as apply_chat_template."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode_rendered_chat(text)

    def encode_rendered_chat(self, text: str) -> list[int]:
        """Tokenize the text a chat template rendered (as `encode_chat` does)."""
        return self.encode(text, add_special_tokens=self._chat_encode_adds_special_tokens)

    # ------------------------------------------------------------------ streaming support
    def stream_must_hold(self, pending_ids: Sequence[int], skip_special_tokens: bool) -> bool | None:
        """Must a streaming detokenizer hold back the text of `pending_ids`?

        pending_ids are the tokens not yet emitted, starting at a clean boundary (every
        byte before them decoded). True when later tokens can still change their text:
        they end inside a UTF-8 character that may yet complete. None when the tokenizer
        cannot tell (no byte view): the caller then uses a U+FFFD heuristic.
        """
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for tid in pending_ids:
            piece = self.token_bytes(tid, skip_special_tokens)
            if piece is None:
                return None
            decoder.decode(piece)
        buffered, _ = decoder.getstate()
        return bool(buffered)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"
