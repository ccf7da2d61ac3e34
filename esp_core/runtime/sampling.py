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

Randomness is keyed on (request seed, output index) only: each row's draw is the
inverse CDF at one uniform u, 53 bits of a hash of the two, over the row's tokens in a
fixed order (the whole vocabulary by id; with top-k / top-p its nucleus, most likely
first), so the token does not depend on the batch it is in or on which instance samples
it. Everything is batched: a fixed number of tensor ops per call and one read back to
the host, never a per-row loop of ops over the vocabulary (on one CPU core a sort of a
49K-token row takes ~8 ms; on a GPU each row's read back would stall the step).
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


def _histograms(id_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Histograms [r, V] float32 of r lists of token ids, in one bincount (ids outside the
    vocab are ignored)."""
    flat = torch.tensor(
        [row * vocab + t for row, ids in enumerate(id_lists) for t in ids if 0 <= t < vocab],
        dtype=torch.int64,
        device=device,
    )
    return torch.bincount(flat, minlength=len(id_lists) * vocab).view(len(id_lists), vocab).float()


def process_logits(
    logits: torch.Tensor, rows: Sequence[SampleRow], eos_token_ids: Sequence[int] = ()
) -> torch.Tensor:
    """Steps 1-3 above. logits [n, V] fp32 -> processed copy [n, V] fp32. Each step runs
    on all the rows that need it at once (a row's steps keep their order)."""
    out = logits.to(torch.float32, copy=True)  # ours to change in place
    vocab, device = out.shape[1], out.device
    for i, row in enumerate(rows):
        bias = [(t, b) for t, b in row.params.logit_bias if 0 <= t < vocab]
        if bias:
            ids = torch.tensor([t for t, _ in bias], dtype=torch.int64, device=device)
            out[i].index_add_(0, ids, torch.tensor([b for _, b in bias], dtype=torch.float32, device=device))
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = _histograms([(*rows[i].prompt_ids, *rows[i].output_ids) for i in rep], vocab, device) > 0
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in rep], device=device)[:, None]
        sub = _take(out, rep)  # [r, V]
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        out[rep] = torch.where(seen, penalised, sub)
    freq = [i for i, r in enumerate(rows) if r.params.frequency_penalty or r.params.presence_penalty]
    if freq:
        counts = _histograms([rows[i].output_ids for i in freq], vocab, device)  # [f, V]
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in freq], device=device)[:, None]
        presence = torch.tensor([rows[i].params.presence_penalty for i in freq], device=device)[:, None]
        out[freq] = _take(out, freq) - (frequency * counts + presence * (counts > 0).float())
    for i, row in enumerate(rows):
        if row.output_index < row.params.min_tokens:
            stop = [t for t in (*eos_token_ids, *row.params.stop_token_ids) if 0 <= t < vocab]
            if stop:
                out[i, stop] = float("-inf")
    return out


# Candidates a top-k / top-p row starts with: its nucleus nearly always lies among the
# few hundred most likely tokens, and a top-k over them is far cheaper than sorting the
# whole vocabulary (a 49K-token row: ~8 ms to sort on one CPU core). A row whose nucleus
# reaches past them is redone with NUCLEUS_GROWTH times as many, up to the vocabulary.
NUCLEUS_CANDIDATES = 256
NUCLEUS_GROWTH = 8


def restricted(params: SamplingParams, vocab: int) -> bool:
    """Whether top-k or top-p removes any token of a `vocab`-token row."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def nucleus(
    scaled: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then the top-p nucleus, of each row of `scaled` [m, V] (logits already
    divided by the temperature; top_k <= 0 or >= V: no top-k).

    Returns (token ids [m, c], weights [m, c]): each row's most likely tokens in
    descending order and their probabilities, 0 for a token outside the row's top-k or
    nucleus (and for padding). Probabilities are taken over the row's top-k tokens when
    it has a top-k, else over the whole row; a token stays in the nucleus while the mass
    strictly before it is < top_p, so the most likely token always stays.

    Each row starts with NUCLEUS_CANDIDATES candidates (or its top-k) and grows by
    NUCLEUS_GROWTH until its nucleus ends among them. A row's candidates depend on its own
    parameters only, never on the other rows: its draw does not depend on its batch.
    """
    vocab = scaled.shape[1]
    k_limit = [k if 0 < k < vocab else vocab for k in top_k]
    pending: dict[int, list[int]] = {}  # candidate count -> rows to try with it
    for i, k in enumerate(k_limit):
        pending.setdefault(min(vocab, max(NUCLEUS_CANDIDATES, k if k < vocab else 0)), []).append(i)
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    while pending:
        count, members = pending.popitem()
        ids, weights, settled = _nucleus_among(
            _take(scaled, members), [k_limit[i] for i in members], [top_p[i] for i in members], count
        )
        if not done and len(members) == len(k_limit) and (count == vocab or bool(settled.all())):
            return ids, weights  # the usual call: every row settled in one pass
        for j, (i, ok) in enumerate(zip(members, settled.tolist())):
            if ok or count == vocab:
                done[i] = (ids[j], weights[j])
            else:
                pending.setdefault(min(vocab, count * NUCLEUS_GROWTH), []).append(i)
    width = max(done[i][0].numel() for i in done)
    ids = torch.zeros(len(done), width, dtype=torch.int64, device=scaled.device)
    weights = torch.zeros(len(done), width, dtype=torch.float32, device=scaled.device)
    for i, (row_ids, row_weights) in done.items():
        ids[i, : row_ids.numel()] = row_ids
        weights[i, : row_weights.numel()] = row_weights
    return ids, weights


def _nucleus_among(
    scaled: torch.Tensor, k_limit: list[int], top_p: list[float], count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`nucleus` of rows scaled [m, V] among their `count` most likely tokens: ids [m, c],
    weights [m, c] and whether each row's nucleus (or top-k) ends among them [m] bool."""
    vocab, device = scaled.shape[1], scaled.device
    k_tensor = torch.tensor(k_limit, device=device)  # [m]
    with_top_k = [k < vocab for k in k_limit]  # from the host's list: no device read
    logits, ids = torch.topk(scaled, count, dim=-1)  # [m, c], descending
    rank = torch.arange(count, device=device)[None, :]  # [1, c]
    in_top_k = rank < k_tensor[:, None]  # [m, c]
    logits = logits.masked_fill(~in_top_k, float("-inf"))
    # probabilities over the row's top-k, else over the whole row (softmax, as a row
    # without top-k or top-p is drawn: the same rounding at a nucleus boundary)
    if all(with_top_k):
        probs = torch.softmax(logits, dim=-1)  # [m, c]
    else:
        probs = torch.softmax(scaled, dim=-1).gather(1, ids)
        if any(with_top_k):
            has_top_k = torch.tensor(with_top_k, device=device)[:, None]  # [m, 1]
            probs = torch.where(has_top_k, torch.softmax(logits, dim=-1), probs)
    before = torch.zeros_like(probs)
    before[:, 1:] = torch.cumsum(probs, dim=-1)[:, :-1]  # mass strictly before each token
    p_tensor = torch.tensor(top_p, dtype=torch.float32, device=device)[:, None]
    keep = in_top_k & ((before < p_tensor) | (rank == 0))
    # settled: the candidates cover the top-k, or the last one is out of the nucleus
    # (then so is every token after it)
    settled = (k_tensor <= count) | ~keep[:, -1]
    return ids, probs * keep, settled


def _uniform(row: SampleRow) -> float:
    """The row's uniform in [0, 1): 53 bits of the hash of (request seed, output index)."""
    seed = row.params.seed if row.params.seed is not None else default_seed(row.request_id)
    return (draw_seed(seed, row.output_index) >> 10) / float(1 << 53)


def _inverse_cdf(weights: torch.Tensor, uniforms: Sequence[float]) -> torch.Tensor:
    """Column index [m] per row of `weights` [m, c] (>= 0, some > 0 in each row): the
    first column whose cumulative weight exceeds u x the row's total weight. Overwrites
    `weights` with its running sums (each fresh [m, V] tensor costs page faults here)."""
    cum = weights.cumsum_(dim=-1)  # [m, c]
    total = cum[:, -1:]  # [m, 1]
    target = torch.tensor(list(uniforms), dtype=cum.dtype, device=cum.device)[:, None] * total
    # u < 1, but u x total may round up to total: stay strictly below it
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target, right=True).squeeze(1)


def _draw(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """One draw per row of processed logits [m, V] (rows not greedy): temperature, then
    top-k / top-p, then the inverse CDF at the row's own uniform. Divides `logits` by
    the temperatures in place."""
    vocab = logits.shape[1]
    temperature = torch.tensor(
        [r.params.temperature for r in rows], dtype=torch.float32, device=logits.device
    )
    scaled = _no_nan_(logits.div_(temperature[:, None]))  # [m, V]; a tiny temperature may overflow
    uniforms = [_uniform(r) for r in rows]
    chosen = [0] * len(rows)
    cut_rows = [restricted(r.params, vocab) for r in rows]
    whole = [i for i, is_cut in enumerate(cut_rows) if not is_cut]
    if whole:
        probs = torch.softmax(_take(scaled, whole), dim=-1)  # [w, V]
        for i, token in zip(whole, _inverse_cdf(probs, [uniforms[i] for i in whole]).tolist()):
            chosen[i] = token
    cut = [i for i, is_cut in enumerate(cut_rows) if is_cut]
    if cut:
        ids, weights = nucleus(
            _take(scaled, cut), [rows[i].params.top_k for i in cut], [rows[i].params.top_p for i in cut]
        )
        column = _inverse_cdf(weights, [uniforms[i] for i in cut])  # [c]
        for i, token in zip(cut, ids.gather(1, column[:, None]).squeeze(1).tolist()):
            chosen[i] = token
    return chosen


def _take(rows: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """rows[idx], without the copy when idx is every row in order (the usual batch)."""
    return rows if idx == list(range(rows.shape[0])) else rows[idx]


def _no_nan_(logits: torch.Tensor) -> torch.Tensor:
    """`logits`, in place, where NaN can never pick a token: NaN -> -inf, +inf -> the
    largest float32. A row with no finite logit left is refused rather than sampled
    (argmax would say 0)."""
    logits.nan_to_num_(nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    # (a max per row: isfinite().any() over [n, V] is ~30x slower on CPU)
    if bool((logits.amax(dim=-1) == float("-inf")).any()):
        raise ValueError("a row of logits has no finite value (NaN or every token masked)")
    return logits


def _all_finite(logits: torch.Tensor) -> bool:
    """No NaN and no +-inf in `logits` (min and max propagate NaN: one pass, not an
    isfinite mask)."""
    low, high = torch.aminmax(logits)
    return bool(torch.isfinite(low) & torch.isfinite(high))


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
    """Sample one token per row. logits [n, V] fp32 (rows in the order of `rows`).

    Batched: a fixed number of tensor ops per call whatever n, and one read back to the
    host (a per-row loop of ops on 49K-152K-token rows cost more than a decode step)."""
    if logits.shape[0] != len(rows):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(rows)} sample rows")
    if not rows:
        return []
    if all(_plain_greedy(r) for r in rows) and _all_finite(logits):
        # the common decode step: two ops instead of a processed copy of the logits
        # (with every logit finite, `_no_nan_` and steps 1-3 leave the argmax unchanged)
        ids = logits.argmax(dim=-1).tolist()
        return [SampledToken(r.request_id, int(t)) for r, t in zip(rows, ids)]
    processed = _no_nan_(process_logits(logits, rows, eos_token_ids))  # [n, V], our own copy
    asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    # before the draw, which divides `processed` in place; over the processed rows (before
    # temperature, top-k and top-p), in row order
    logprobs = torch.log_softmax(_take(processed, asked), dim=-1) if asked else None  # [a, V]
    chosen = [0] * len(rows)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if greedy:
        for i, token in zip(greedy, _take(processed, greedy).argmax(dim=-1).tolist()):
            chosen[i] = token
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    if drawn:
        for i, token in zip(drawn, _draw(_take(processed, drawn), [rows[i] for i in drawn])):
            chosen[i] = token
    return _with_logprobs(logprobs, asked, rows, chosen)


def _with_logprobs(
    logprobs: torch.Tensor | None, asked: list[int], rows: Sequence[SampleRow], chosen: list[int]
) -> list[SampledToken]:
    """SampledTokens, with the chosen token's logprob and the top ones for the rows that
    asked (`asked`: their indices; `logprobs` [a, V]: their log_softmax, in that order)."""
    if logprobs is None:
        return [SampledToken(r.request_id, t) for r, t in zip(rows, chosen)]
    vocab = logprobs.shape[1]
    tokens = torch.tensor([chosen[i] for i in asked], device=logprobs.device)
    chosen_lp = logprobs.gather(1, tokens[:, None]).squeeze(1).tolist()
    widest = max(min(rows[i].params.logprobs or 0, vocab) for i in asked)
    top_lp, top_ids = torch.topk(logprobs, widest, dim=-1) if widest else (logprobs[:, :0], logprobs[:, :0])
    top_lp_rows, top_id_rows = top_lp.tolist(), top_ids.tolist()
    extra = {}
    for j, i in enumerate(asked):
        k = min(rows[i].params.logprobs or 0, vocab)
        top = tuple(TokenLogprob(int(t), float(v)) for t, v in zip(top_id_rows[j][:k], top_lp_rows[j][:k]))
        extra[i] = (chosen_lp[j], top)
    return [
        SampledToken(r.request_id, t, *extra[i]) if i in extra else SampledToken(r.request_id, t)
        for i, (r, t) in enumerate(zip(rows, chosen))
    ]
