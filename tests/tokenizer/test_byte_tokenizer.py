"""The built-in byte tokenizer: the fixed id layout the built-in model is generated for."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esp_core.tokenizer import BYTE_BOS_ID, BYTE_EOS_ID, BYTE_VOCAB_SIZE, ByteTokenizer

UNICODE_SAMPLES = [
    "",
    "hello world",
    "emoji 😀🚀 and a family 👨‍👩‍👧‍👦 and a flag 🇯🇵",
    "CJK 日本語 中文 한국어",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ",
    "RTL עברית العربية",
    "controls \x00\x01\t\n\r and DEL \x7f",
    "max code point \U0010ffff",
]


def test_fixed_layout(byte_tok):
    assert isinstance(byte_tok, ByteTokenizer)
    assert byte_tok.name == "builtin"
    assert (byte_tok.vocab_size, BYTE_VOCAB_SIZE) == (258, 258)
    assert byte_tok.bos_token_id == BYTE_BOS_ID == 256
    assert byte_tok.eos_token_ids == (BYTE_EOS_ID,) == (257,)
    assert byte_tok.eos_token_id == 257
    assert (byte_tok.bos_token, byte_tok.eos_token) == ("<s>", "</s>")
    assert byte_tok.special_token_ids == {256, 257}


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_ids_are_utf8_bytes_and_round_trip(byte_tok, text):
    ids = byte_tok.encode(text)
    assert ids[0] == BYTE_BOS_ID
    assert ids[1:] == list(text.encode("utf-8"))
    assert byte_tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text


@given(st.text(max_size=64))
@settings(max_examples=100, deadline=None)
def test_round_trip_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_decode(byte_tok):
    ids = [BYTE_BOS_ID, *b"hi", BYTE_EOS_ID]
    assert byte_tok.decode(ids) == "hi"
    assert byte_tok.decode(ids, skip_special_tokens=False) == "<s>hi</s>"


def test_special_token_text_is_not_parsed(byte_tok):
    # typed "<s>" stays three bytes: a prompt cannot inject control tokens
    assert byte_tok.encode("<s>", add_special_tokens=False) == list(b"<s>")


def test_invalid_utf8_decodes_like_python(byte_tok):
    for raw in (b"\xff", b"\xe4\xb8", b"a\xe4b", b"\xed\xa0\x80", b"\xf0\x9f\x98"):
        assert byte_tok.decode(list(raw)) == raw.decode("utf-8", "replace")


def test_unknown_ids_are_skipped(byte_tok):
    assert byte_tok.decode([104, 999, -1, 105]) == "hi"
    assert byte_tok.token_bytes(999) == b""


def test_lone_surrogate_does_not_crash(byte_tok):
    assert byte_tok.decode(byte_tok.encode("a\ud800b")) == "a\ufffdb"


def test_token_strings(byte_tok):
    assert byte_tok.id_to_token(ord("a")) == "a"
    assert byte_tok.id_to_token(0xE4) == "<0xE4>"
    assert byte_tok.id_to_token(ord(" ")) == "<0x20>"
    assert byte_tok.id_to_token(256) == "<s>"
    assert byte_tok.id_to_token(300) is None
    for tid in range(BYTE_VOCAB_SIZE):
        assert byte_tok.token_to_id(byte_tok.id_to_token(tid)) == tid
    assert byte_tok.convert_ids_to_tokens([256, 104]) == ["<s>", "h"]


def test_builtin_chat_template(byte_tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi "},
                {"type": "image_url"},
                {"type": "text", "text": "there"},
            ],
        },
    ]
    assert byte_tok.has_chat_template
    text = byte_tok.apply_chat_template(messages)
    assert text == "<|system|>\nBe brief.\n<|user|>\nhi there\n<|assistant|>\n"
    assert byte_tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|system|>\nBe brief.\n<|user|>\nhi there\n"
    )
    ids = byte_tok.encode_chat(messages)
    assert ids == [BYTE_BOS_ID, *text.encode()]  # exactly one BOS
