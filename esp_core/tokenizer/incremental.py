"""Streaming detokenization: token ids in, newly completed text out, O(new tokens) a step.

Decoding token by token is wrong for real tokenizers: one character may span several
tokens (UTF-8 bytes, byte-fallback tokens), and sentencepiece-style decoders drop the
leading space of whatever they decode first. So we decode a short *window*:

    ids:  ... | prefix window  |  pending tokens  |
              ^prefix          ^read              ^end

The prefix window holds the tokens of the last emission (already sent); decoding it plus
the pending tokens and cutting off the prefix's own text gives exactly the pending
tokens' text *in context* (their leading spaces right). We emit once the tokenizer says
nothing pending can change any more (no unfinished UTF-8 character, see
`Tokenizer.stream_must_hold`); then the pending tokens become the next prefix window.
Both windows stay a few tokens long, so each step costs O(new tokens).

Invariant (tested): after `flush()`, `text == tokenizer.decode(ids)` for the ids added,
and with a prompt, `text == decode(prompt + ids)[len(decode(prompt)):]` whenever the
prompt's own decode is a prefix of that (it is not when the prompt ends inside a
character that the output completes). Exception, by choice: sentencepiece ByteFallback
decoders turn a whole run of <0xNN> tokens into U+FFFD if any byte in it is invalid; we
emit each character once complete instead of holding whole runs, so only for such
invalid runs the streamed text keeps the valid characters (see HFTokenizer).
Without a byte view (unknown decoders) we fall back to holding text that ends in U+FFFD.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from esp_core.tokenizer.base import Tokenizer

# Prompt tokens kept as decoding context for the first output tokens (leading spaces).
_PROMPT_CONTEXT = 6
# How far back into the prompt we look at all (for context that decodes to some text).
_PROMPT_CONTEXT_MAX = 64
# Without a byte view we hold while the text ends in U+FFFD; never hold more than this
# many tokens that way (a model may emit a literal U+FFFD forever).
_MAX_HEURISTIC_HOLD = 16
# Forget ids older than the prefix window once this many accumulate (memory stays bounded).
_COMPACT_AT = 4096

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed sampled token ids one at a time; get the text each one completes.

    add(token_id) -> str   newly completed text (maybe "" while a character is unfinished)
    flush() -> str         whatever is still held (end of generation); idempotent
    text                   everything emitted so far
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        # Only the prompt's tail matters (and prompts may be 500K tokens): drop the ids
        # decode() would drop, keep the last few as context for the first output tokens,
        # extended back while they decode to nothing ...
        tail = [int(i) for i in prompt_ids[-_PROMPT_CONTEXT_MAX:]]
        prompt = [i for i in tail if self._visible(i)]
        start = max(len(prompt) - _PROMPT_CONTEXT, 0)
        while start > 0 and not self._decode(prompt[start:]):
            start = max(start - _PROMPT_CONTEXT, 0)
        # ... and starting on a character boundary (at most 3 UTF-8 continuation bytes
        # back): a sentencepiece ByteFallback run cut mid-character decodes to U+FFFD as a
        # whole, and the output may continue that run.
        for _ in range(3):
            if start > 0 and self._starts_mid_character(prompt[start]):
                start -= 1
        self._ids: list[int] = prompt[start:]
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self._num_output = 0

    # ------------------------------------------------------------------ public
    @property
    def text(self) -> str:
        """All text emitted so far (not including what is held back)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache] if self._text_cache else []
        return self._text_cache

    @property
    def num_tokens(self) -> int:
        """Output tokens added so far."""
        return self._num_output

    @property
    def has_pending(self) -> bool:
        """Whether tokens are held back (their text not yet emitted)."""
        return self._read < len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes ("" if none yet)."""
        self._num_output += 1
        token_id = int(token_id)
        if not self._visible(token_id):
            # decode() drops it before its decoder runs, so leaving it out of the window
            # changes nothing, and the window cannot fill up with invisible tokens
            return ""
        self._ids.append(token_id)
        pending = self._ids[self._read :]
        hold = self._tok.stream_must_hold(pending, self._skip)
        if hold:
            return ""
        window_text = self._decode(self._ids[self._prefix :])
        if hold is None and window_text.endswith(_REPLACEMENT) and len(pending) <= _MAX_HEURISTIC_HOLD:
            return ""
        return self._emit(window_text)

    def add_many(self, token_ids: Iterable[int]) -> str:
        """add() each id; the concatenated new text."""
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Emit everything held back (end of generation): an unfinished character becomes
        U+FFFD exactly as a full decode renders it."""
        if not self.has_pending:
            return ""
        return self._emit(self._decode(self._ids[self._prefix :]), force=True)

    # ------------------------------------------------------------------ internals
    def _visible(self, token_id: int) -> bool:
        """False for ids decode() drops: skipped specials and ids outside the vocabulary."""
        if self._skip and self._tok.is_special(token_id):
            return False
        return self._tok.id_to_token(token_id) is not None

    def _starts_mid_character(self, token_id: int) -> bool:
        piece = self._tok.token_bytes(token_id, self._skip)
        return bool(piece) and 0x80 <= piece[0] <= 0xBF  # a UTF-8 continuation byte

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _emit(self, window_text: str, force: bool = False) -> str:
        if len(window_text) <= len(self._prefix_text) and not force:
            # nothing visible yet (e.g. a skipped special token): keep it pending, so the
            # window keeps its context and a decoder's first-token rules stay right
            return ""
        # The window's text starts with the prefix's own text (decoders are prefix-stable
        # at clean boundaries); what follows is new.
        delta = window_text[len(self._prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        if self._prefix >= _COMPACT_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta
