"""A response choice: streaming text, stop strings across chunks, logprobs shapes."""

from __future__ import annotations

from esp_core.sched.plan import TokenLogprob
from esp_core.tokenizer import load_tokenizer
from esp_serve.app.choices import Choice, token_text
from esp_serve.app.protocol import TokenEvent
from esp_serve.app.streaming import cached_tokens, usage

TOK = load_tokenizer("builtin")


def feed_text(choice: Choice, text: str, finish: str = "length") -> list[str]:
    ids = list(text.encode())
    out = []
    for k, t in enumerate(ids):
        ev = TokenEvent(
            t,
            -0.5,
            (TokenLogprob(t, -0.5),),
            num_output_tokens=k + 1,
            finish_reason=finish if k == len(ids) - 1 else None,
        )
        out.append(choice.feed(ev)[0])
        if choice.done:
            break
    return out


def test_multibyte_characters_are_never_split():
    c = Choice(0, TOK, (256,), [])
    chunks = feed_text(c, "aé€😀b")
    assert "".join(chunks) == c.text == "aé€😀b"
    assert all("\ufffd" not in ch for ch in chunks)
    assert c.finish_reason == "length" and c.num_output_tokens == len("aé€😀b".encode())


def test_stop_string_spanning_tokens_truncates_and_finishes():
    c = Choice(0, TOK, (256,), ["STOP", "zz"])
    chunks = feed_text(c, "hello STOP and more")
    assert c.text == "".join(chunks) == "hello "
    assert c.finish_reason == "stop"
    assert c.num_output_tokens == len("hello STOP")  # consumed up to the stop string


def test_held_back_prefix_is_released_at_the_end():
    c = Choice(0, TOK, (256,), ["STOP"])
    feed_text(c, "ends with STO")
    assert c.text == "ends with STO" and c.finish_reason == "length"


def test_eos_is_not_text_and_finishes():
    c = Choice(0, TOK, (256,), [])
    c.feed(TokenEvent(104, num_output_tokens=1))
    c.feed(TokenEvent(257, num_output_tokens=2, finish_reason="stop"))
    assert c.text == "h" and c.finish_reason == "stop" and c.num_output_tokens == 2


def test_logprob_shapes():
    c = Choice(0, TOK, (256,), [], want_logprobs=True)
    c.feed(TokenEvent(104, -0.1, (TokenLogprob(104, -0.1), TokenLogprob(0xC3, -2.0))))
    c.feed(TokenEvent(105, -0.2, (TokenLogprob(105, -0.2),), finish_reason="length"))
    comp = c.completion_logprobs()
    assert comp == {
        "tokens": ["h", "i"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"h": -0.1, "bytes:\\xc3": -2.0}, {"i": -0.2}],
        "text_offset": [0, 1],
    }
    chat = c.chat_logprobs(start=1)
    assert chat == {
        "content": [
            {
                "token": "i",
                "logprob": -0.2,
                "bytes": [105],
                "top_logprobs": [{"token": "i", "bytes": [105], "logprob": -0.2}],
            }
        ],
        "refusal": None,
    }
    ids = Choice(0, TOK, (256,), [], want_logprobs=True, tokens_as_ids=True)
    ids.feed(TokenEvent(104, -0.1, (), finish_reason="length"))
    assert ids.completion_logprobs()["tokens"] == ["token_id:104"]
    assert token_text(TOK, 257) == ("</s>", list(b"</s>"))
    assert Choice(0, TOK, (), []).completion_logprobs() is None


def test_hf_tokenizers_stream_the_same_text_as_a_full_decode(tmp_path):
    from tests.support.tokenizer import build_hf_tokenizer_dir

    text = "Naïve café — 日本語 😀 The quick brown fox STOP jumps."
    for kind in ("byte_level", "sentencepiece"):
        path = build_hf_tokenizer_dir(tmp_path / kind, kind=kind)
        tok = load_tokenizer(str(path))
        prompt = tok.encode("Hello, world!")
        ids = tok.encode(text, add_special_tokens=False)
        whole = Choice(0, tok, tuple(prompt), [])
        stopped = Choice(1, tok, tuple(prompt), ["STOP"])
        for k, t in enumerate(ids):
            ev = TokenEvent(t, num_output_tokens=k + 1, finish_reason="length" if k == len(ids) - 1 else None)
            whole.feed(ev)
            stopped.feed(ev)
        assert whole.text == tok.decode(prompt + ids)[len(tok.decode(prompt)) :], kind
        assert stopped.finish_reason == "stop"
        assert stopped.text == whole.text[: whole.text.index("STOP")], kind


def test_text_offsets_follow_the_emitted_text():
    c = Choice(0, TOK, (256,), [], want_logprobs=True)
    for k, t in enumerate("aé".encode() + b"b"):  # é is two tokens: one offset for both
        c.feed(TokenEvent(t, -0.1, (), num_output_tokens=k + 1))
    c.feed(TokenEvent(None, finish_reason="length"))
    assert c.text == "aéb"
    assert c.completion_logprobs()["text_offset"] == [0, 1, 1, 2]
    assert c.completion_logprobs(base_offset=5)["text_offset"] == [5, 6, 6, 7]


def test_non_finite_logprobs_render_as_a_floor_never_as_nan():
    import json

    c = Choice(0, TOK, (256,), [], want_logprobs=True)
    c.feed(TokenEvent(104, float("-inf"), (TokenLogprob(104, float("nan")),)))
    c.feed(TokenEvent(105, float("nan"), (), finish_reason="length"))
    comp = c.completion_logprobs()
    assert comp["token_logprobs"] == [-9999.0, -9999.0] and comp["top_logprobs"][0] == {"h": -9999.0}
    chat = c.chat_logprobs()
    assert [e["logprob"] for e in chat["content"]] == [-9999.0, -9999.0]
    json.dumps([comp, chat], allow_nan=False)  # serialisable as strict JSON


def test_cached_tokens_count_each_prompt_once_like_prompt_tokens():
    # two prompts, n = 2: the second choice of each read its sibling's prompt KV (not a
    # cache hit of the request); prompt 1's first choice did hit the cache for 64 tokens
    choices = [Choice(j, TOK, (256, 65), [], prompt_index=j // 2) for j in range(4)]
    for c, cached in zip(choices, (0, 128, 64, 128)):
        c.feed(TokenEvent(1, finish_reason="length", num_output_tokens=1, num_cached_tokens=cached))
    assert cached_tokens(choices) == 64
    assert usage(4, 4, cached_tokens(choices))["prompt_tokens_details"] == {"cached_tokens": 64}
