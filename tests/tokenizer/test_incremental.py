"""IncrementalDetokenizer: streamed text == full decode, no partial characters, O(new)."""

from __future__ import annotations

import codecs
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esp_core.tokenizer import IncrementalDetokenizer, load_tokenizer

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def stream(tok, ids, prompt=(), skip=True):
    det = IncrementalDetokenizer(tok, prompt_ids=prompt, skip_special_tokens=skip)
    pieces = [det.add(t) for t in ids]
    pieces.append(det.flush())
    assert "".join(pieces) == det.text
    assert det.flush() == ""  # idempotent
    return pieces, det.text


def expected(tok, prompt, ids, skip):
    full = tok.decode(list(prompt) + list(ids), skip_special_tokens=skip)
    head = tok.decode(list(prompt), skip_special_tokens=skip)
    return full, head


def check_exact(tok, prompt, ids, skip):
    full, head = expected(tok, prompt, ids, skip)
    if not full.startswith(head):
        return  # the prompt ends inside a character the output completes: no clean split
    _, text = stream(tok, ids, prompt, skip)
    assert text == full[len(head) :]


# ------------------------------------------------------------------ exactness (random ids)
byte_ids = st.lists(st.one_of(st.integers(0, 257), st.integers(0x80, 0xFF)), max_size=40)


@SETTINGS
@given(ids=byte_ids, prompt=byte_ids, skip=st.booleans())
def test_byte_tokenizer_random_ids_incl_invalid_utf8(byte_tok, ids, prompt, skip):
    check_exact(byte_tok, [], ids, skip)
    check_exact(byte_tok, prompt[:8], ids, skip)


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_byte_level_bpe_random_ids_incl_invalid_utf8(bl_tok, data, skip):
    # mostly low ids (single bytes, often partial UTF-8), some merges, specials, unknown ids
    token = st.one_of(st.integers(6, 262), st.integers(0, bl_tok.vocab_size - 1), st.just(10**6))
    ids = data.draw(st.lists(token, max_size=40))
    prompt = data.draw(st.lists(token, max_size=8))
    check_exact(bl_tok, [], ids, skip)
    check_exact(bl_tok, prompt, ids, skip)


def _sp_valid_ids(sp_tok):
    """Sentencepiece ids whose <0xNN> byte runs are valid UTF-8 (see HFTokenizer docs:
    ByteFallback turns a whole invalid run into U+FFFD, which no stream can foresee)."""
    normal = st.integers(259, sp_tok.vocab_size - 1)
    special = st.integers(0, 2)
    char_bytes = st.characters(codec="utf-8").map(lambda c: [3 + b for b in c.encode("utf-8")])
    item = st.one_of(normal.map(lambda i: [i]), special.map(lambda i: [i]), char_bytes)
    return st.lists(item, max_size=20).map(lambda items: [i for it in items for i in it])


@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_sentencepiece_random_ids_with_valid_byte_runs(sp_tok, data, skip):
    ids = data.draw(_sp_valid_ids(sp_tok))
    prompt = data.draw(_sp_valid_ids(sp_tok))
    check_exact(sp_tok, [], ids, skip)
    check_exact(sp_tok, prompt, ids, skip)


@SETTINGS
@given(text=st.text(max_size=60), split=st.integers(0, 60))
def test_encoded_text_streams_back_exactly(bl_tok, sp_tok, byte_tok, text, split):
    for tok in (byte_tok, bl_tok, sp_tok):
        ids = tok.encode(text)
        check_exact(tok, [], ids, True)
        check_exact(tok, ids[:split], ids[split:], True)


# ------------------------------------------------------------------ latency: no partial chars
def _completed_text(tok, ids):
    """Text of every *complete* character in ids (incomplete UTF-8 tail left out)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    return "".join(decoder.decode(tok.token_bytes(i)) for i in ids)


@SETTINGS
@given(text=st.text(max_size=40))
def test_each_character_is_emitted_as_soon_as_complete(byte_tok, bl_tok, text):
    for tok in (byte_tok, bl_tok):
        ids = tok.encode(text)
        det = IncrementalDetokenizer(tok)
        for k, tid in enumerate(ids, 1):
            det.add(tid)
            assert det.text == _completed_text(tok, ids[:k])


def test_multibyte_character_split_across_byte_tokens(byte_tok):
    det = IncrementalDetokenizer(byte_tok)
    assert [det.add(b) for b in "a😀".encode()] == ["a", "", "", "", "😀"]
    assert det.flush() == "" and det.text == "a😀"


def test_multibyte_character_split_across_bpe_tokens(bl_tok, sp_tok):
    for tok in (bl_tok, sp_tok):
        ids = tok.encode("☃", add_special_tokens=False)  # not in either vocab: byte tokens
        det = IncrementalDetokenizer(tok)
        out = [det.add(t) for t in ids]
        assert out[-1].endswith("☃") and all("☃" not in o and "\ufffd" not in o for o in out[:-1])


def test_invalid_bytes_emit_replacement_at_once(byte_tok):
    det = IncrementalDetokenizer(byte_tok)
    assert det.add(0xFF) == "\ufffd"  # can never be valid: emitted now
    assert det.add(0xE4) == ""  # may still become a character
    assert det.add(ord("A")) == "\ufffdA"  # ...did not: U+FFFD, like decode()
    assert det.add(0xE4) == "" and det.add(0xB8) == ""
    assert det.add(0xFF) == "\ufffd\ufffd"  # E4 B8 is one maximal subpart, FF another
    assert det.add(0xF0) == ""
    assert det.flush() == "\ufffd"  # unfinished at the end: U+FFFD
    assert det.text == byte_tok.decode([0xFF, 0xE4, 65, 0xE4, 0xB8, 0xFF, 0xF0])


# ------------------------------------------------------------------ context and specials
def test_leading_space_needs_the_prompt_as_context(sp_tok):
    prompt = sp_tok.encode("Hello")
    out = sp_tok.encode("Hello world")[len(prompt) :]
    # with the prompt as context the first output token keeps its space ...
    assert stream(sp_tok, out, prompt)[1] == " world"
    # ... decoded alone, sentencepiece's decoder strips it (as decode(out) does)
    assert stream(sp_tok, out)[1] == sp_tok.decode(out) == "world"


def test_prompt_ending_in_skipped_specials(sp_tok, bl_tok):
    for tok in (sp_tok, bl_tok):
        eos = tok.eos_token_ids[0]
        prompt = tok.encode("Hello") + [eos] * 20
        out = tok.encode("Hello there", add_special_tokens=False)[
            len(tok.encode("Hello", add_special_tokens=False)) :
        ]
        full, head = expected(tok, prompt, out, True)
        assert stream(tok, out, prompt)[1] == full[len(head) :] == " there"


def test_special_tokens_kept_or_skipped(bl_tok):
    im_start, im_end = bl_tok.token_to_id("<|im_start|>"), bl_tok.token_to_id("<|im_end|>")
    ids = [im_start, *bl_tok.encode("hi", add_special_tokens=False), im_end]
    assert stream(bl_tok, ids, skip=True)[1] == "hi"
    assert stream(bl_tok, ids, skip=False)[1] == "<|im_start|>hi<|im_end|>"


def test_long_output_compacts_and_stays_exact(byte_tok, bl_tok):
    text = "Elastic sequence parallelism 日本語 😀 café. " * 300  # > 4096 tokens
    for tok in (byte_tok, bl_tok):
        ids = tok.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(tok, prompt_ids=ids[:10])
        for t in ids[10:]:
            det.add(t)
        det.flush()
        assert det.text == text[len(tok.decode(ids[:10])) :]
        assert det.num_tokens == len(ids) - 10
        assert len(det._ids) < 4096 + 16  # the window, not the whole output, is kept


# ------------------------------------------------------------------ no byte view (heuristic)
@pytest.fixture(scope="module")
def wordpiece_tok(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.support.tokenizer import CORPUS

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        CORPUS * 4,
        trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"], show_progress=False
        ),
    )
    d = tmp_path_factory.mktemp("wordpiece")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]"}))
    return load_tokenizer(d)


@SETTINGS
@given(data=st.data())
def test_decoder_without_byte_view_streams_exactly(wordpiece_tok, data):
    assert wordpiece_tok.decoder_kind is None and wordpiece_tok.token_bytes(5) is None
    ids = data.draw(st.lists(st.integers(0, wordpiece_tok.vocab_size - 1), max_size=30))
    check_exact(wordpiece_tok, [], ids, True)


def test_out_of_vocabulary_ids_are_ignored(byte_tok, bl_tok):
    for tok in (byte_tok, bl_tok):
        hi = tok.encode("hi", add_special_tokens=False)
        ids = [hi[0], -1, 10**6, 2**40, *hi[1:]]
        assert stream(tok, ids)[1] == tok.decode(ids) == "hi"


def test_heuristic_hold_is_bounded(tmp_path):
    """Without a byte view, text ending in U+FFFD is held (it may be an unfinished
    character), but a model repeating a literal U+FFFD token must still stream."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "\ufffd": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    wl = load_tokenizer(tmp_path)
    det = IncrementalDetokenizer(wl)
    pieces = [det.add(1) for _ in range(40)]
    assert any(pieces[:20])  # emitted long before the end
    det.flush()
    assert det.text == wl.decode([1] * 40)


def test_only_the_prompt_tail_is_read(byte_tok):
    """A 500K-token prompt must not cost O(prompt) per request: only its tail is read."""
    from collections.abc import Sequence

    class HugePrompt(Sequence):
        n = 500_000

        def __len__(self):
            return self.n

        def __getitem__(self, index):
            if isinstance(index, slice):
                start, stop, step = index.indices(self.n)
                assert self.n - start <= 64, f"read from {start}"
                return [self[i] for i in range(start, stop, step)]
            return ord("a") + index % 26

    det = IncrementalDetokenizer(byte_tok, prompt_ids=HugePrompt())
    assert det.add(ord(" ")) + det.add(ord("z")) == " z"
