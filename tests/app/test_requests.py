"""OpenAI request -> token ids + SamplingParams (ingress side, with the real byte tokenizer)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from esp_core.tokenizer import load_tokenizer
from esp_serve.app.errors import APIError, from_validation_error
from esp_serve.app.openai_models import ChatCompletionRequest, CompletionRequest
from esp_serve.app.protocol import ModelInfo
from esp_serve.app.requests import (
    Limits,
    chat_sub_requests,
    completion_sub_requests,
    derive_seed,
    resolve_max_tokens,
)

TOK = load_tokenizer("builtin")
INFO = ModelInfo("builtin", 258, 100, (257,))
LIMITS = Limits(INFO, default_max_tokens=16, max_n=4, max_logprobs=5)


def completion(**kw):
    kw.setdefault("model", "builtin")
    kw.setdefault("prompt", "hi")
    return CompletionRequest.model_validate(kw)


def test_sampling_params_from_openai_and_vllm_fields():
    req = completion(
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        seed=42,
        top_k=7,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        repetition_penalty=1.3,
        logit_bias={"65": 2.0, "10": -1.0},
        stop_token_ids=[66],
        ignore_eos=True,
        min_tokens=2,
        logprobs=3,
    )
    (sub,), prompts = completion_sub_requests(req, TOK, LIMITS)
    assert prompts == [[256, 104, 105]] and sub.prompt_ids == (256, 104, 105)
    sp = sub.sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (5, 0.5, 0.9, 7, 42)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (0.1, 0.2, 1.3)
    assert sp.logit_bias == ((10, -1.0), (65, 2.0))
    assert sp.stop_token_ids == (66,) and sp.ignore_eos and sp.min_tokens == 2
    assert sp.logprobs == 3


def test_defaults_follow_openai():
    (sub,), _ = completion_sub_requests(completion(), TOK, LIMITS)
    sp = sub.sampling
    assert sp.max_tokens == 16 and sp.temperature == 1.0 and sp.top_p == 1.0
    assert sp.top_k == -1 and sp.logprobs is None and sp.seed is not None
    # chat: no default cap (None) -> the rest of the context
    chat = ChatCompletionRequest.model_validate(
        {"model": "builtin", "messages": [{"role": "user", "content": "hi"}]}
    )
    (sub,), (ids,) = chat_sub_requests(chat, TOK, Limits(INFO, None, 4, 5))
    assert sub.sampling.max_tokens == 100 - len(ids)
    assert ids == TOK.encode_chat([{"role": "user", "content": "hi"}])


def test_n_choices_get_distinct_seeds_derived_from_the_request_seed():
    subs, _ = completion_sub_requests(completion(n=3, seed=5), TOK, LIMITS)
    seeds = [s.sampling.seed for s in subs]
    assert [s.index for s in subs] == [0, 1, 2]
    assert seeds == [derive_seed(5, j) for j in range(3)] and len(set(seeds)) == 3
    again, _ = completion_sub_requests(completion(n=3, seed=5), TOK, LIMITS)
    assert [s.sampling.seed for s in again] == seeds
    batched, prompts = completion_sub_requests(completion(prompt=["a", "bc"], n=2), TOK, LIMITS)
    assert [(s.index, s.prompt_index) for s in batched] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    # each prompt's first choice prefills it; the others share its KV
    assert [s.sibling for s in batched] == [None, 0, None, 2]
    assert len(prompts) == 2


def test_context_length_checks():
    assert resolve_max_tokens(None, 16, 90, 100, "max_tokens") == 10  # clipped default
    assert resolve_max_tokens(10, 16, 90, 100, "max_tokens") == 10
    with pytest.raises(APIError) as e:
        resolve_max_tokens(11, 16, 90, 100, "max_tokens")
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert "100" in e.value.message and "101" in e.value.message
    with pytest.raises(APIError) as e:
        resolve_max_tokens(None, 16, 100, 100, "max_tokens")
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    "kw, status, param",
    [
        (dict(model="other"), 404, "model"),
        (dict(n=5), 400, "n"),
        (dict(logprobs=6), 400, "logprobs"),
        (dict(prompt=[1, 258]), 400, "prompt"),
        (dict(logit_bias={"300": 1.0}), 400, "logit_bias"),
        (dict(stop_token_ids=[999]), 400, "stop_token_ids"),
        (dict(top_k=1000), 400, "top_k"),
        (dict(min_p=0.1), 400, "min_p"),
        (dict(echo=True, logprobs=1), 400, "echo"),
        (dict(max_tokens=3, min_tokens=5), 400, None),
    ],
)
def test_model_dependent_rejections(kw, status, param):
    with pytest.raises((APIError, ValidationError)) as e:
        completion_sub_requests(completion(**kw), TOK, LIMITS)
    err = e.value if isinstance(e.value, APIError) else from_validation_error(e.value)
    assert err.status == status
    if param:
        assert err.param == param


def test_validation_errors_become_400_naming_the_parameter():
    with pytest.raises(ValidationError) as e:
        completion(temperature=3)
    err = from_validation_error(e.value)
    assert (err.status, err.param, err.type) == (400, "temperature", "invalid_request_error")
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m"})
    assert from_validation_error(e.value).param == "prompt"
    with pytest.raises(ValidationError) as e:
        completion(unknown_thing=1)
    err = from_validation_error(e.value)
    assert err.param == "unknown_thing" and "Unrecognized" in err.message


def test_chat_checks():
    base = {"model": "builtin", "messages": [{"role": "user", "content": "x"}]}
    for bad in (
        {"top_logprobs": 2},
        {"tools": [{"type": "function"}]},
        {"response_format": {"type": "json_object"}},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"max_tokens": 3, "max_completion_tokens": 4},
    ):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**base, **bad})
    req = ChatCompletionRequest.model_validate(
        {
            **base,
            "logprobs": True,
            "top_logprobs": 2,
            "max_completion_tokens": 4,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        }
    )
    (sub,), (ids,) = chat_sub_requests(req, TOK, LIMITS)
    assert sub.sampling.logprobs == 2 and sub.sampling.max_tokens == 4
    assert bytes(i for i in ids if i < 256).decode().count("ab") == 1


def test_chat_template_errors_are_400(tmp_path):
    from tests.support.tokenizer import build_hf_tokenizer_dir

    tok = load_tokenizer(str(build_hf_tokenizer_dir(tmp_path / "tok")))
    info = ModelInfo("m", tok.vocab_size, 1000, tok.eos_token_ids)
    limits = Limits(info, 16, 4, 5)
    ok = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    (sub,), (ids,) = chat_sub_requests(ok, tok, limits)
    assert ids == tok.encode_chat([{"role": "user", "content": "hi"}])
    bad = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "tool", "content": "x"}]}
    )  # template refuses
    with pytest.raises(APIError) as e:
        chat_sub_requests(bad, tok, limits)
    assert e.value.status == 400 and e.value.param == "messages"


def test_text_that_encodes_outside_the_models_vocabulary_is_a_400():
    """A tokenizer whose ids reach past the model's vocabulary (added tokens the model
    lacks) would fail the whole batch in the model: the request is refused instead."""
    small = Limits(ModelInfo("builtin", 200, 100, (257,)), default_max_tokens=16, max_n=4, max_logprobs=5)
    req = CompletionRequest(model="builtin", prompt="x", max_tokens=2)
    with pytest.raises(APIError) as e:
        completion_sub_requests(req, TOK, small)  # the byte tokenizer's BOS is id 256
    assert e.value.status == 400 and e.value.code == "token_out_of_vocabulary" and e.value.param == "prompt"
    chat = ChatCompletionRequest(model="builtin", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(APIError) as e:
        chat_sub_requests(chat, TOK, small)
    assert e.value.code == "token_out_of_vocabulary" and e.value.param == "messages"
