"""The OpenAI API end to end: real Ray Serve app, real HTTP, the official `openai` client."""

from __future__ import annotations

import json

import pytest

from .conftest import MAX_MODEL_LEN

pytestmark = pytest.mark.slow

MODEL = "builtin"
PROMPT = "The quick brown fox"


def _ids(logprobs_tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in logprobs_tokens)
    return [int(t.split(":", 1)[1]) for t in logprobs_tokens]


def greedy(client, prompt=PROMPT, n_tokens=24, **extra):
    return client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=n_tokens,
        temperature=0,
        extra_body={"ignore_eos": True, **extra},
    )


def test_health_and_models(server):
    with server.http() as c:
        assert c.get("/health").status_code == 200
    models = server.openai().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert server.openai().models.retrieve(MODEL).id == MODEL


def test_completion_and_usage(server):
    out = greedy(server.openai(), n_tokens=12)
    assert out.object == "text_completion" and out.model == MODEL
    (choice,) = out.choices
    assert choice.finish_reason == "length" and choice.index == 0
    prompt_ids = server.http().post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert out.usage.prompt_tokens == prompt_ids["count"] == len(PROMPT.encode()) + 1  # + BOS
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert greedy(server.openai(), n_tokens=12).choices[0].text == choice.text  # greedy


def test_prompt_as_token_ids_and_echo(server):
    ids = server.http().post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_text = greedy(server.openai(), n_tokens=8)
    by_ids = greedy(server.openai(), prompt=ids, n_tokens=8)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = greedy(server.openai(), n_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPT + by_text.choices[0].text


def test_greedy_over_http_equals_the_worker_in_process(server):
    """The serving path adds nothing: same tokens as InstanceWorker run directly."""
    from esp_core.runtime.config import WorkerConfig
    from esp_core.runtime.worker import InstanceWorker
    from tests.support.runtime import generate

    prompts = ["Hello, world", "Ray Serve runs elastic instances", "x"]
    worker = InstanceWorker(WorkerConfig(model="builtin", kv_slots=512, num_threads=1))
    client = server.openai()
    for prompt in prompts:
        ids = server.http().post("/tokenize", json={"prompt": prompt}).json()["tokens"]
        expected = generate(worker, {"r": ids}, max_new_tokens=20)["r"]
        out = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
        assert _ids(out.choices[0].logprobs.tokens) == expected
        assert out.usage.completion_tokens == 20
        assert (
            out.choices[0].text
            == server.http().post("/detokenize", json={"tokens": expected}).json()["prompt"]
        )


def test_chat_completion(server):
    client = server.openai()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "chat.completion"
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    tokenized = server.http().post("/tokenize", json={"messages": messages}).json()
    assert out.usage.prompt_tokens == tokenized["count"]
    assert out.usage.completion_tokens == 10
    # the same prompt through /v1/completions as token ids gives the same greedy text
    same = greedy(client, prompt=tokenized["tokens"], n_tokens=10)
    assert same.choices[0].text == choice.message.content


def test_streaming_completion_chunks_usage_and_done(server):
    client = server.openai()
    full = greedy(client, n_tokens=16).choices[0].text
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2
    assert "".join(c.choices[0].text for c in text_chunks) == full
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    assert all(c.usage is None for c in text_chunks)


def test_streaming_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True, "ignore_eos": True}
    with server.http() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_streaming_chat(server):
    client = server.openai()
    messages = [{"role": "user", "content": "tell me a story"}]
    full = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def _stop_string(text: str) -> tuple[str, int]:
    """A piece of greedy output (3 characters, else fewer; no U+FFFD) first occurring at
    index >= 4. 40 tokens of output always have one: its absence is a failure."""
    for size in (3, 2, 1):
        for i in range(4, len(text) - size):
            piece = text[i : i + size]
            if "\ufffd" not in piece and text.find(piece) == i:
                return piece, i
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_strings_non_streaming_and_streaming(server):
    client = server.openai()
    full = greedy(client, n_tokens=40).choices[0].text
    stop, at = _stop_string(full)
    out = greedy(client, n_tokens=40, stop=[stop, "never-appears"])
    assert out.choices[0].text == full[:at]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 40
    # streaming: the stop string spans several token chunks (one byte per token here)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=40,
            temperature=0,
            stream=True,
            stop=stop,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # stopping early aborts the request: its KV is released
    server.wait_pool_free()


def test_seeds_reproducible_and_distinct(server):
    client = server.openai()

    def sample(seed):
        return (
            client.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=24,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    a, b, c = sample(1234), sample(1234), sample(98765)
    assert a == b
    assert a != c


def test_n_choices_with_derived_seeds(server):
    client = server.openai()
    kw = dict(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=16,
        temperature=1.0,
        n=2,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1]
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]
    assert first.usage.completion_tokens == 32
    chat = client.chat.completions.create(
        model=MODEL,
        n=2,
        max_tokens=8,
        seed=3,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_n_choices_prefill_the_prompt_once(server):
    """n = 3 greedy choices of a prompt no other test sends: the first choice computes it,
    the other two read its KV (whole 64-token blocks) and compute only the last partial
    block; all three equal the n = 1 answer."""
    prompt = "Siblings share one prompt. " * 11  # 297 bytes + BOS: 4 whole blocks, 42 tokens after
    before = server.status()["prefix_cache"]
    assert before["enabled"]
    out = greedy(server.openai(), prompt=prompt, n_tokens=16, n=3)
    after = server.status()["prefix_cache"]
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and texts[0] == texts[1] == texts[2]
    assert out.usage.prompt_tokens == 298 and out.usage.completion_tokens == 48
    assert out.usage.prompt_tokens_details.cached_tokens == 0  # the prompt was computed (once)
    # choices 1 and 2 took choice 0's 256 whole-block tokens (while it ran, or its entry)
    assert after["hits"] - before["hits"] == 2
    assert after["hit_tokens"] - before["hit_tokens"] == 2 * 256
    single = greedy(server.openai(), prompt=prompt, n_tokens=16)
    assert single.choices[0].text == texts[0]
    assert single.usage.prompt_tokens_details.cached_tokens == 256  # the entry the choices left


def test_logprobs_completions_and_chat(server):
    client = server.openai()
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert len(lp.text_offset) == 8 and lp.text_offset == sorted(lp.text_offset)
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token_lp <= 0.0
        assert 1 <= len(top) <= 3
        # greedy: the sampled token is the most likely one
        assert max(top.values()) == pytest.approx(token_lp, abs=1e-5)
        assert top[token] == pytest.approx(token_lp, abs=1e-5)

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert isinstance(entry.bytes, list)
    plain = client.chat.completions.create(
        model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert plain.choices[0].logprobs is None


def test_vllm_extras_accepted(server):
    client = server.openai()
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"65": 5.0},
        extra_body={
            "top_k": 5,
            "repetition_penalty": 1.2,
            "min_tokens": 4,
            "stop_token_ids": [10],
            "ignore_eos": False,
        },
    )
    assert out.usage.completion_tokens >= 4
    assert out.choices[0].finish_reason in ("stop", "length")
    # a stop token id ends generation: force it with logit_bias
    forced = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        logit_bias={"65": 100.0},
        extra_body={"stop_token_ids": [65]},
    )
    assert forced.choices[0].finish_reason == "stop"
    assert forced.usage.completion_tokens == 1 and forced.choices[0].text == "A"


def test_tokenize_detokenize_vllm_format(server):
    with server.http() as c:
        r = c.post("/tokenize", json={"model": MODEL, "prompt": "héllo"}).json()
        assert r == {
            "count": 7,
            "max_model_len": MAX_MODEL_LEN,
            "tokens": [256, *"héllo".encode()],
            "token_strs": None,
        }
        r2 = c.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
        assert r2["tokens"] == list(b"hi")
        d = c.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
        assert d == {"prompt": "héllo"}
        chat = c.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["count"] > 2


def test_streaming_logprobs_one_entry_per_token_chunk(server):
    client = server.openai()
    whole = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            logprobs=1,
            stream=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )
    )
    streamed = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert streamed == whole.choices[0].logprobs.tokens
    assert all(len(c.choices[0].logprobs.tokens) == 1 for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 9 + ["length"]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == whole.choices[0].logprobs.text_offset
