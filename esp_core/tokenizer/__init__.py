"""Tokenization for the ingress: torch-free (tests/test_purity.py checks it).

tok = load_tokenizer("builtin")            # or a local HF directory with tokenizer.json
ids = tok.encode("hello")                  # BOS added by default
prompt = tok.encode_chat(messages)         # chat template + encode, no double BOS
detok = IncrementalDetokenizer(tok, prompt_ids=ids)
stops = StopStringMatcher(["\\n\\n"])
for token in sampled:                      # streaming
    text, stopped = stops.feed(detok.add(token))
tail = stops.feed(detok.flush())[0] + stops.flush()   # at the end, unless stopped
"""

from esp_core.tokenizer.base import Tokenizer
from esp_core.tokenizer.byte_tokenizer import (
    BYTE_BOS_ID,
    BYTE_CHAT_TEMPLATE,
    BYTE_EOS_ID,
    BYTE_VOCAB_SIZE,
    ByteTokenizer,
)
from esp_core.tokenizer.chat_template import ChatTemplate
from esp_core.tokenizer.errors import ChatTemplateError, TokenizerError
from esp_core.tokenizer.hf_tokenizer import HFTokenizer
from esp_core.tokenizer.incremental import IncrementalDetokenizer
from esp_core.tokenizer.loader import BUILTIN, load_tokenizer
from esp_core.tokenizer.stop_strings import StopStringMatcher

__all__ = [
    "BUILTIN",
    "BYTE_BOS_ID",
    "BYTE_CHAT_TEMPLATE",
    "BYTE_EOS_ID",
    "BYTE_VOCAB_SIZE",
    "ByteTokenizer",
    "ChatTemplate",
    "ChatTemplateError",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]
