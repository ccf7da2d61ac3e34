"""Our HF-directory tokenizer against transformers' AutoTokenizer on the same directory:
chat templates, encode and decode must agree (transformers is a test-only dependency)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "日本 😀"},
        {"role": "assistant", "content": "  ok  "},
        {"role": "user", "content": "more\nlines"},
    ],
]
TEXTS = ["Hello world, 日本語 😀 café", " two  spaces\n\ttab", "<|im_start|>user\nx<|im_end|>"]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def pair(request):
    from esp_core.tokenizer import load_tokenizer

    path = request.getfixturevalue("bl_dir" if request.param == "byte_level" else "sp_dir")
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(pair, conv, add_generation_prompt):
    ours, hf = pair
    want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == want
    want_ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(want_ids, "keys"):  # transformers 5 returns a BatchEncoding
        want_ids = want_ids["input_ids"]
    assert ours.encode_chat(conv, add_generation_prompt=add_generation_prompt) == list(want_ids)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(pair, text):
    ours, hf = pair
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_special_ids_match_transformers(pair):
    ours, hf = pair
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_ids[0] == hf.eos_token_id
    assert ours.vocab_size == len(hf)


@pytest.mark.parametrize(
    "variant",
    [
        # transformers 5 follows tokenizer.json's post-processor, whatever the flags say
        {"add_bos_token": False},
        {"add_bos_token": True, "add_eos_token": True},
        {"drop_post_processor": True},
        {"drop_post_processor": True, "add_bos_token": True},
    ],
)
def test_bos_eos_flags_match_transformers(tmp_path, sp_dir, variant):
    import json
    import shutil

    from esp_core.tokenizer import load_tokenizer

    d = tmp_path / "variant"
    shutil.copytree(sp_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token", None)
    cfg.pop("add_eos_token", None)
    cfg.update({k: v for k, v in variant.items() if k.startswith("add_")})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if variant.get("drop_post_processor"):
        spec = json.loads((d / "tokenizer.json").read_text())
        spec["post_processor"] = None
        (d / "tokenizer.json").write_text(json.dumps(spec))
    ours, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text), variant


def test_reasoning_fields_and_tools_match_transformers(pair):
    ours, hf = pair
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.thinking }}|"
        "{{ m.content }}\n{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
    )
    conv = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "reasoning": "think <b>", "content": "a"},
        {"role": "assistant", "thinking": "t2", "content": "b"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "é & <x>"}}]
    want = hf.apply_chat_template(conv, tools=tools, chat_template=template, tokenize=False)
    assert (
        ours.apply_chat_template(conv, tools=tools, chat_template=template, add_generation_prompt=False)
        == want
    )


def test_continue_final_message_matches_transformers(pair):
    ours, hf = pair
    conv = [
        {"role": "user", "content": "Tell a story"},
        {"role": "assistant", "content": "Once upon a time "},
    ]
    want = hf.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    assert ours.apply_chat_template(conv, add_generation_prompt=False, continue_final_message=True) == want
