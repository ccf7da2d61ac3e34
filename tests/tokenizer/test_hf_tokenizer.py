"""HF tokenizer directories: loading, round trips, special tokens, config precedence, errors."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from esp_core.tokenizer import HFTokenizer, TokenizerError, load_tokenizer
from tests.support.tokenizer import build_hf_tokenizer_dir

TEXTS = [
    "Hello, world!",
    " leading space and  double  spaces ",
    "日本語のテキスト 中文 😀🚀 👍🏽 café naïve e\u0301",
    "def add(a, b):\n    return a + b\n",
    "unseen: Ω ж ק ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("kind", ["byte_level", "sentencepiece"])
def test_testing_helper_is_deterministic(tmp_path, kind):
    a = build_hf_tokenizer_dir(tmp_path / "a", kind)
    b = build_hf_tokenizer_dir(tmp_path / "b", kind)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (
            hashlib.sha256((a / name).read_bytes()).digest()
            == hashlib.sha256((b / name).read_bytes()).digest()
        ), name


def test_byte_level_attributes(bl_tok):
    assert isinstance(bl_tok, HFTokenizer)
    assert bl_tok.decoder_kind == "byte_level"
    s, im_end, eot = (bl_tok.token_to_id(t) for t in ("<s>", "<|im_end|>", "<|endoftext|>"))
    assert bl_tok.bos_token_id == s
    # tokenizer_config eos first, then generation_config's extra ids, no duplicates
    assert bl_tok.eos_token_ids == (im_end, eot)
    assert bl_tok.pad_token_id == bl_tok.token_to_id("<pad>")
    assert bl_tok.vocab_size == 600
    assert bl_tok.model_max_length == 4096
    assert {s, im_end, eot} <= bl_tok.special_token_ids


def test_sentencepiece_attributes(sp_tok):
    assert sp_tok.decoder_kind == "metaspace"
    assert sp_tok.bos_token_id == 1 and sp_tok.eos_token_ids == (2,)
    assert [sp_tok.id_to_token(i) for i in (3, 4, 258)] == ["<0x00>", "<0x01>", "<0xFF>"]


@pytest.mark.parametrize("tok_name", ["bl_tok", "sp_tok"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(request, tok_name, text):
    tok = request.getfixturevalue(tok_name)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    with_specials = tok.decode(ids, skip_special_tokens=False)
    if tok_name == "bl_tok":  # ByteLevel: the BOS text, then the text
        assert with_specials == "<s>" + text
    else:  # Llama-2 style: "<s>" comes first, so the decoder's Strip keeps the "▁" prepended
        assert with_specials == "<s> " + text


def test_multibyte_characters_split_across_tokens(bl_tok, sp_tok):
    # "Ω" and "☃" are not in either tiny vocabulary: they become several byte tokens
    for tok in (bl_tok, sp_tok):
        ids = tok.encode("☃", add_special_tokens=False)
        pieces = [tok.token_bytes(i) for i in ids]
        assert len(ids) > 1 and b"".join(pieces).strip() == "☃".encode()


def test_special_tokens_parsed_in_text(bl_tok):
    ids = bl_tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == bl_tok.token_to_id("<|im_start|>")
    assert ids[-1] == bl_tok.token_to_id("<|im_end|>")
    assert bl_tok.decode(ids) == "user\nhi"
    assert bl_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_unknown_ids_are_skipped(bl_tok):
    hi = bl_tok.encode("hi", add_special_tokens=False)
    assert bl_tok.decode([*hi, 10**6, -1, 2**40]) == "hi"
    for bad in (10**6, -1, 2**40):
        assert bl_tok.id_to_token(bad) is None and bl_tok.token_bytes(bad) == b""


def test_lone_surrogate_does_not_crash(bl_tok):
    assert bl_tok.decode(bl_tok.encode("a\ud800b")) == "a\ufffdb"


def test_chat_template_jinja_file_wins(tmp_path):
    d = build_hf_tokenizer_dir(
        tmp_path / "t",
        template_file=True,
        chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}",
    )
    assert "chat_template" not in json.loads((d / "tokenizer_config.json").read_text())
    tok = load_tokenizer(d)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_named_chat_templates(tmp_path, bl_dir):
    d = tmp_path / "named"
    shutil.copytree(bl_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(d).apply_chat_template([]) == "DEFAULT"


def test_no_chat_template(tmp_path, bl_dir):
    d = tmp_path / "plain"
    shutil.copytree(bl_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert not tok.has_chat_template and tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    # a template given by the caller (e.g. a server flag) still works
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "x"}], chat_template="{{ messages[0].content }}!"
        )
        == "x!"
    )


def test_special_tokens_map_fallback(tmp_path, bl_dir):
    d = tmp_path / "legacy"
    shutil.copytree(bl_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["bos_token"], cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"})
    )
    (d / "generation_config.json").unlink()
    tok = load_tokenizer(d)
    assert tok.bos_token_id == tok.token_to_id("<s>")
    assert tok.eos_token_ids == (tok.token_to_id("</s>"),)


def test_errors_are_clear(tmp_path, bl_dir):
    with pytest.raises(TokenizerError, match="not 'builtin' and not a directory"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="slow-tokenizer files only"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a usable tokenizer.json"):
        load_tokenizer(bad)
    broken_cfg = tmp_path / "cfg"
    shutil.copytree(bl_dir, broken_cfg)
    (broken_cfg / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="expected a JSON object"):
        load_tokenizer(broken_cfg)
    no_eos = tmp_path / "noeos"
    shutil.copytree(bl_dir, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|not-a-token|>"
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(no_eos)


def test_never_executes_code_from_the_directory(tmp_path, bl_dir):
    d = tmp_path / "remote_code"
    shutil.copytree(bl_dir, d)
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    for name in ("tokenization_evil.py", "__init__.py", "evil.py"):
        (d / name).write_text(code)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.decode(tok.encode("still works")) == "still works"
    assert not marker.exists()


def test_added_tokens_only_in_config_are_added(tmp_path, bl_dir):
    d = tmp_path / "added"
    shutil.copytree(bl_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"600": {"content": "<tool>", "special": True}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.token_to_id("<tool>") == 600 and tok.is_special(600)
    assert tok.vocab_size == 601
    assert tok.encode("<tool>", add_special_tokens=False) == [600]
