"""Turn validated OpenAI requests into token ids + `SamplingParams` for the controller.

Model-dependent checks live here (vocabulary range, context length, `n` and logprobs
limits); everything raises `APIError` with OpenAI's codes. Torch-free (ingress side).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from esp_core.sched.plan import SamplingParams
from esp_core.sched.prefix_cache import block_hash_chain
from esp_serve.app.config import LimitsSection
from esp_serve.app.errors import APIError, bad_request, context_length_exceeded
from esp_serve.app.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    _SamplingFields,
)
from esp_serve.app.protocol import ModelInfo

_SEED_MOD = 2**63
_GOLDEN = 0x9E3779B97F4A7C15  # spreads derived seeds of n > 1 choices


@dataclass(frozen=True)
class Limits:
    """Server-side limits the ingress enforces (from ServerSection + ModelInfo)."""

    info: ModelInfo
    default_max_tokens: int | None  # None: the rest of the context
    max_n: int
    max_logprobs: int
    work: LimitsSection = LimitsSection()  # the config's `limits:` (bounds on one request's work)


@dataclass(frozen=True)
class SubRequest:
    """One choice of the response: a prompt and how to sample it."""

    index: int  # choice index in the response
    prompt_index: int
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    block_hashes: tuple[int, ...] = ()  # the prompt's block hash chain (with_block_hashes)
    # the choice index of the prompt's first choice, which prefills the prompt that this
    # one then shares (n > 1); None for that first choice
    sibling: int | None = None


def with_block_hashes(subs: list[SubRequest], block_tokens: int) -> list[SubRequest]:
    """The sub-requests with their prompt's block hash chain, hashed once per prompt (the
    `n` choices of a prompt share it). Block size: prefix_cache.block_tokens."""
    chains: dict[int, tuple[int, ...]] = {}
    out = []
    for s in subs:
        if s.prompt_index not in chains:
            chains[s.prompt_index] = block_hash_chain(s.prompt_ids, block_tokens)
        out.append(replace(s, block_hashes=chains[s.prompt_index]))
    return out


def derive_seed(base: int, choice: int) -> int:
    """Seed of choice j of an n > 1 request: distinct per choice, fixed by the request seed."""
    return (base + choice * _GOLDEN) % _SEED_MOD


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if ids and 0 <= min(ids) and max(ids) < vocab_size:  # the common case, at C speed
        return
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is out of range [0, {vocab_size})", param=param)


def check_encoded_ids(ids: list[int], vocab_size: int, param: str) -> None:
    """Ids the tokenizer made from text must be inside the model's vocabulary too (a
    tokenizer with added tokens the model lacks would otherwise fail the whole batch)."""
    if ids and max(ids) >= vocab_size:
        raise bad_request(
            f"the text encodes to token id {max(ids)}, outside the model's vocabulary [0, {vocab_size})",
            param=param,
            code="token_out_of_vocabulary",
        )


def resolve_max_tokens(
    requested: int | None, default: int | None, prompt_len: int, max_model_len: int, param: str
) -> int:
    room = max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise context_length_exceeded(
                f"This model's maximum context length is {max_model_len} tokens. However, "
                f"your prompt has {prompt_len} tokens, which leaves no room for output. "
                "Please reduce the length of the prompt.",
                param="prompt",
            )
        return room if default is None else min(default, room)
    if prompt_len + requested > max_model_len:
        raise context_length_exceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} in the completion). Please reduce the length of the prompt or "
            "the completion.",
            param=param,
        )
    return requested


def _sampling(
    req: _SamplingFields, *, max_tokens: int, seed: int, logprobs: int | None, limits: Limits
) -> SamplingParams:
    vocab = limits.info.vocab_size
    # keys are canonical decimals (openai_models), so no two keys name the same token
    bias = sorted((int(key), float(value)) for key, value in (req.logit_bias or {}).items())
    check_token_ids([t for t, _ in bias], vocab, "logit_bias")
    stop_ids = list(req.stop_token_ids or [])
    check_token_ids(stop_ids, vocab, "stop_token_ids")
    if req.min_tokens > max_tokens:
        raise bad_request("min_tokens must be <= max_tokens", param="min_tokens")
    top_k = req.top_k if req.top_k not in (None, 0) else -1
    if top_k > vocab:
        raise bad_request(f"top_k must be <= the vocabulary size {vocab}", param="top_k")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        min_tokens=req.min_tokens,
        seed=seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=tuple(bias),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


def _common_checks(req: _SamplingFields, logprobs: int | None, limits: Limits, logprobs_param: str) -> None:
    if req.model != limits.info.served_name:
        from esp_serve.app.errors import model_not_found

        raise model_not_found(req.model)
    if req.n > limits.max_n:
        raise bad_request(f"n must be <= {limits.max_n}", param="n")
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise bad_request(f"{logprobs_param} must be <= {limits.max_logprobs}", param=logprobs_param)
    if req.min_p:
        raise bad_request("min_p is not supported", param="min_p")


def build_sub_requests(
    req: _SamplingFields,
    prompts: list[list[int]],
    *,
    requested_max_tokens: int | None,
    logprobs: int | None,
    limits: Limits,
    max_tokens_param: str = "max_tokens",
) -> list[SubRequest]:
    """n choices per prompt; choice j of an n > 1 request gets a seed derived from the
    request's (or a random) base seed, so `seed` makes the whole response reproducible."""
    base = random.getrandbits(62) if req.seed is None else req.seed % _SEED_MOD
    out = []
    for p, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            requested_max_tokens,
            limits.default_max_tokens,
            len(ids),
            limits.info.max_model_len,
            max_tokens_param,
        )
        for j in range(req.n):
            seed = base if req.n == 1 else derive_seed(base, j)
            sampling = _sampling(req, max_tokens=max_tokens, seed=seed, logprobs=logprobs, limits=limits)
            sibling = p * req.n if j else None
            out.append(SubRequest(p * req.n + j, p, tuple(ids), sampling, sibling=sibling))
    return out


def completion_sub_requests(
    req: CompletionRequest, tokenizer, limits: Limits
) -> tuple[list[SubRequest], list[list[int]]]:
    """Returns the sub-requests and the token ids of each prompt."""
    _common_checks(req, req.logprobs, limits, "logprobs")
    if req.echo and req.logprobs is not None:
        raise bad_request("echo with logprobs (prompt logprobs) is not supported", param="echo")
    prompts: list[list[int]] = []
    for p in req.prompts():
        if isinstance(p, str):
            ids = tokenizer.encode(p, add_special_tokens=True)
            check_encoded_ids(ids, limits.info.vocab_size, "prompt")
        else:
            ids = list(p)
            check_token_ids(ids, limits.info.vocab_size, "prompt")
        if not ids:
            raise bad_request("the prompt encodes to no tokens", param="prompt")
        prompts.append(ids)
    subs = build_sub_requests(
        req, prompts, requested_max_tokens=req.max_tokens, logprobs=req.logprobs, limits=limits
    )
    return subs, prompts


def _chat_messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict]:
    messages = [m.model_dump(exclude_none=True) for m in req.messages or ()]
    for m, original in zip(messages, req.messages or ()):
        m["content"] = original.text()
    return messages


def chat_prompt_ids(req: ChatCompletionRequest | TokenizeRequest, tokenizer) -> list[int]:
    """The prompt of a chat with the model's own template (and documented kwargs only:
    app/bounds.py refused the rest)."""
    from esp_core.tokenizer import TokenizerError

    kwargs = dict(getattr(req, "chat_template_kwargs", None) or {})
    kwargs.pop("chat_template", None)
    try:
        return list(tokenizer.encode_chat(_chat_messages(req), req.add_generation_prompt, **kwargs))
    except TokenizerError as err:
        raise bad_request(f"cannot apply the chat template: {err}", param="messages") from None


async def client_template_prompt(req: ChatCompletionRequest, tokenizer, work: LimitsSection) -> list[int]:
    """The prompt of a chat rendered with the client's own template, in a child process
    within `limits.chat_template_timeout_s` and `limits.chat_template_max_chars`."""
    from esp_serve.app.client_template import render_client_template

    kwargs = dict(req.chat_template_kwargs or {})
    messages = _chat_messages(req)

    def render() -> str:
        return tokenizer.apply_chat_template(messages, req.add_generation_prompt, **kwargs)

    text = await render_client_template(render, work.chat_template_timeout_s, work.chat_template_max_chars)
    return list(tokenizer.encode_rendered_chat(text))


def _chat_logprobs(req: ChatCompletionRequest) -> int | None:
    return (req.top_logprobs or 0) if req.logprobs else None


def check_chat(req: ChatCompletionRequest, limits: Limits) -> None:
    """The checks of a chat request that need no tokenizer (cheap: run them first)."""
    _common_checks(req, _chat_logprobs(req), limits, "top_logprobs")


def chat_sub_requests(
    req: ChatCompletionRequest, tokenizer, limits: Limits, ids: list[int] | None = None
) -> tuple[list[SubRequest], list[list[int]]]:
    """`ids`: the prompt, when it was rendered already (a client's template)."""
    logprobs = _chat_logprobs(req)
    check_chat(req, limits)
    if ids is None:
        ids = chat_prompt_ids(req, tokenizer)
    check_encoded_ids(ids, limits.info.vocab_size, "messages")
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    subs = build_sub_requests(
        req,
        [ids],
        requested_max_tokens=req.requested_max_tokens,
        logprobs=logprobs,
        limits=limits,
        max_tokens_param=param,
    )
    return subs, [ids]


__all__ = [
    "APIError",
    "Limits",
    "SubRequest",
    "build_sub_requests",
    "chat_sub_requests",
    "completion_sub_requests",
    "derive_seed",
    "resolve_max_tokens",
]
