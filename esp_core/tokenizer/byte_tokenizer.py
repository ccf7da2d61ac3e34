"""The built-in byte tokenizer (FIXED: the built-in model is generated to match it).

ids 0..255 are the raw bytes of UTF-8 text; 256 is BOS "<s>"; 257 is EOS "</s>".
Encoding never parses special-token text: a user who types "<s>" gets the three bytes,
so prompts cannot inject control tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from esp_core.tokenizer.base import Tokenizer
from esp_core.tokenizer.chat_template import ChatTemplate
from esp_core.tokenizer.text_utils import encodable_utf8

BYTE_VOCAB_SIZE = 258
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257
BYTE_BOS_TOKEN = "<s>"
BYTE_EOS_TOKEN = "</s>"

# "<|role|>\ncontent\n" turns; the generation prompt opens an assistant turn. Content may be
# a string or a list of OpenAI content parts (only text parts are rendered).
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SPECIAL_TEXT = {BYTE_BOS_ID: BYTE_BOS_TOKEN.encode(), BYTE_EOS_ID: BYTE_EOS_TOKEN.encode()}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens, plus BOS/EOS. decode == bytes(...).decode('utf-8', 'replace')."""

    def __init__(self, name: str = "builtin"):
        self.name = name
        self.vocab_size = BYTE_VOCAB_SIZE
        self.bos_token_id = BYTE_BOS_ID
        self.eos_token_ids = (BYTE_EOS_ID,)
        self.bos_token = BYTE_BOS_TOKEN
        self.eos_token = BYTE_EOS_TOKEN
        self.pad_token_id = None
        self.special_token_ids = frozenset((BYTE_BOS_ID, BYTE_EOS_ID))
        self.model_max_length = None
        self._chat_template = ChatTemplate(BYTE_CHAT_TEMPLATE)
        # The built-in template writes no BOS text (encode would not parse it): let encode add it.
        self._chat_encode_adds_special_tokens = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(encodable_utf8(text).encode("utf-8"))
        if add_special_tokens:
            ids.insert(0, BYTE_BOS_ID)
        return ids

    def _bytes(self, ids: Iterable[int], skip_special_tokens: bool) -> bytes:
        out = bytearray()
        for tid in ids:
            tid = int(tid)
            if 0 <= tid < 256:
                out.append(tid)
            elif tid in _SPECIAL_TEXT and not skip_special_tokens:
                out += _SPECIAL_TEXT[tid]
            # unknown ids (a model whose vocab is padded past 258) are skipped, as HF does
        return bytes(out)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._bytes(ids, skip_special_tokens).decode("utf-8", "replace")

    def token_bytes(self, token_id: int, skip_special_tokens: bool = True) -> bytes:
        return self._bytes((token_id,), skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        token_id = int(token_id)
        if 0 <= token_id < 256:
            # printable ASCII as itself, other bytes in the "<0xNN>" spelling of sentencepiece
            return chr(token_id) if 0x21 <= token_id <= 0x7E else f"<0x{token_id:02X}>"
        if token_id in _SPECIAL_TEXT:
            return _SPECIAL_TEXT[token_id].decode()
        return None

    def token_to_id(self, token: str) -> int | None:
        if token == BYTE_BOS_TOKEN:
            return BYTE_BOS_ID
        if token == BYTE_EOS_TOKEN:
            return BYTE_EOS_ID
        if len(token) == 1 and 0x21 <= ord(token) <= 0x7E:
            return ord(token)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return int(token[3:5], 16)
            except ValueError:
                return None
        return None
