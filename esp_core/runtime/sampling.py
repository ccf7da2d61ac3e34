"""Batched sampling from fp32 logits with per-request `SamplingParams`.

Order of processing for one row (vLLM semantics):
1. `logit_bias` is added;
2. penalties from the request's history: repetition (prompt + output tokens: positive
   logits divided by the penalty, negative ones multiplied), frequency (minus
   penalty x count of the token in the *output*), presence (minus penalty if the token
   appears in the output);
3. `min_tokens`: EOS and stop token ids get -inf while fewer outputs exist;
4. logprobs are taken here: `log_softmax` of these processed logits, i.e. after bias,
   penalties and min_tokens, *before* temperature, top-k and top-p;
5. greedy (temperature 0) picks the argmax; otherwise logits / temperature, top-k, top-p
   (smallest set of most likely tokens whose mass reaches p; the top token always stays),
   then one draw.

Randomness is keyed on (request seed, output index) only: each row draws its own
exponential noise from a generator seeded with a mix of the two, so the token does not
depend on the batch it is in or on which instance samples it. A draw is
`argmax(probs / E)` with E ~ Exp(1) i.i.d. per token (exponential race == categorical).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esp_core.sched.plan import SampledToken, SamplingParams, TokenLogprob

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 31)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def draw_seed(seed: int, output_index: int) -> int:
    """The generator seed of one draw: a hash of (request seed, output index), 63 bits."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (output_index & _MASK64)) >> 1


def default_seed(request_id: str) -> int:
    """Seed for a request that arrived without one (normally the controller sets it)."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class SampleRow:
    """One row to sample: the request, its params and history up to this draw.

    `prompt_ids` and `output_ids` are the request's tokens so far (penalties read them);
    `output_index` is the index of the token being sampled among the outputs (0 for the
    first output), which keys the randomness.
    """

    request_id: str
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    output_index: int


def _token_counts(ids: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Histogram [V] float32 of token ids (ids outside the vocab are ignored)."""
    t = torch.as_tensor(list(ids), dtype=torch.int64, device=device)
    t = t[(t >= 0) & (t < vocab)]
    return torch.bincount(t, minlength=vocab).float()


def process_logits(
    logits: torch.Tensor, rows: Sequence[SampleRow], eos_token_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Steps 1-3 above. logits [n, V] fp32 -> processed copy [n, V] fp32."""
    out = logits.float().clone()
    vocab = out.shape[1]
    for i, row in enumerate(rows):
        p = row.params
        if p.logit_bias:
            ids = torch.tensor(
                [t for t, _ in p.logit_bias if 0 <= t < vocab], dtype=torch.int64, device=out.device
            )
            vals = torch.tensor(
                [b for t, b in p.logit_bias if 0 <= t < vocab], dtype=torch.float32, device=out.device
            )
            out[i].index_add_(0, ids, vals)
        if p.repetition_penalty != 1.0:
            seen = (
                _token_counts(row.prompt_ids, vocab, out.device)
                + _token_counts(row.output_ids, vocab, out.device)
            ) > 0
            r = out[i]
            penalised = torch.where(r > 0, r / p.repetition_penalty, r * p.repetition_penalty)
            out[i] = torch.where(seen, penalised, r)
        if p.frequency_penalty or p.presence_penalty:
            counts = _token_counts(row.output_ids, vocab, out.device)
            out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if row.output_index < p.min_tokens:
            stop = [t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab]
            if stop:
                out[i, stop] = float("-inf")
    return out


def _restrict_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k and outside the top-p nucleus. logits [V]."""
    vocab = logits.shape[0]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token; a token stays if that mass is < p (the top
        # token always stays since its prior mass is 0).
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[0] = False  # the most likely token always stays (even for top_p <= 0)
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _no_nan(logits: torch.Tensor) -> torch.Tensor:
    """Logits where NaN can never pick a token: NaN -> -inf, +inf -> the largest float32.
    A row with no finite logit left is refused rather than sampled (argmax would say 0)."""
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    if not bool(torch.isfinite(logits).any(dim=-1).all()):
        raise ValueError("a row of logits has no finite value (NaN or every token masked)")
    return logits


def _draw(probs: torch.Tensor, seed: int) -> int:
    """One categorical draw from probs [V] with a generator seeded by `seed`."""
    gen = torch.Generator(device=probs.device).manual_seed(seed)
    noise = torch.empty(probs.shape, dtype=torch.float32, device=probs.device).exponential_(generator=gen)
    # exponential_ may return exactly 0; p / 0 would be inf (or nan for p = 0).
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    return int(torch.argmax(probs / noise))


def _plain_greedy(row: SampleRow) -> bool:
    """Greedy, no logprobs, and steps 1-3 change nothing: the token is the raw argmax."""
    p = row.params
    return (
        p.greedy
        and p.logprobs is None
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and not p.frequency_penalty
        and not p.presence_penalty
        and row.output_index >= p.min_tokens
    )


def sample(
    logits: torch.Tensor, rows: Sequence[SampleRow], eos_token_ids: Sequence[int] = ()
) -> list[SampledToken]:
    """Sample one token per row. logits [n, V] fp32 (rows in the order of `rows`)."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sample rows")
    if not rows:
        return []
    if all(_plain_greedy(r) for r in rows) and bool(torch.isfinite(logits).all()):
        # the common decode step: two ops instead of a processed copy of the logits
        # (with every logit finite, `_no_nan` and steps 1-3 leave the argmax unchanged)
        ids = logits.argmax(dim=-1).tolist()
        return [SampledToken(r.request_id, int(t)) for r, t in zip(rows, ids)]
    processed = _no_nan(process_logits(logits, rows, eos_token_ids))  # [n, V]
    want_logprobs = any(r.params.logprobs is not None for r in rows)
    logprobs = torch.log_softmax(processed, dim=-1) if want_logprobs else None
    chosen: list[int] = []
    greedy_idx = [i for i, r in enumerate(rows) if r.params.greedy]
    greedy_ids = processed[greedy_idx].argmax(dim=-1).tolist() if greedy_idx else []
    greedy_map = dict(zip(greedy_idx, greedy_ids))
    for i, row in enumerate(rows):
        if i in greedy_map:
            chosen.append(int(greedy_map[i]))
            continue
        p = row.params
        scaled = _restrict_top_k_top_p(_no_nan(processed[i] / p.temperature), p.top_k, p.top_p)
        probs = torch.softmax(scaled, dim=-1)
        seed = p.seed if p.seed is not None else default_seed(row.request_id)
        chosen.append(_draw(probs, draw_seed(seed, row.output_index)))
    results = []
    for i, (row, tok) in enumerate(zip(rows, chosen)):
        k = row.params.logprobs
        if k is None or logprobs is None:
            results.append(SampledToken(row.request_id, tok))
            continue
        top: tuple[TokenLogprob, ...] = ()
        if k > 0:
            vals, ids = torch.topk(logprobs[i], min(k, logprobs.shape[1]))
            top = tuple(TokenLogprob(int(t), float(v)) for t, v in zip(ids.tolist(), vals.tolist()))
        results.append(SampledToken(row.request_id, tok, float(logprobs[i, tok]), top))
    return results
