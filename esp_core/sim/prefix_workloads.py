"""Workloads whose prompts share prefixes, with the block hash chains a prefix cache keys on.

A prompt is cut into full blocks of `block_tokens` tokens (a partial last block has no
hash); block i's hash is `chain(h_{i-1}, content of block i)`, so equal hashes at block i
mean equal tokens in blocks 0..i (`NewRequest.block_hashes`). The simulator has no token
ids, so "content" is an integer naming what the block holds (document d's block i, a
question's own text, ...); two blocks get the same content id exactly when a real
tokenizer would give them the same tokens.

* `docqa`: documents with L-Eval-length prompts, `questions` (default 4) questions per
  document. Question j's prompt = the whole document + its own short question (20-80
  tokens, uniform). Blocks entirely inside the document share hashes across the
  document's questions; the block holding the document/question boundary and later ones
  are the question's own. The first question arrives with the document (documents are a
  Poisson process of rate / questions); each other question arrives an independent
  exponential gap after it, of mean `question_gap` (default 20) mean inter-arrival times
  (20 s at 1 question/s). Answers: L-Eval output lengths. `rate` counts questions
  (requests) per second.
* `multiturn`: conversations of `turns` (default 4) turns. Turn 1's prompt has a
  ShareGPT-like length; turn t's prompt = turn t-1's prompt + turn t-1's answer + new user
  text (lognormal, median 100 tokens, 4-1000). A conversation is one token stream, so every
  full block of turn t's prompt is also a block of turn t+1's. Conversations start as a
  Poisson process of rate / turns; each turn comes an exponential gap (mean `turn_gap`,
  default 30, mean inter-arrival times) after the previous one's arrival (the simulator
  fixes arrivals in advance, so a turn may arrive before the previous answer ended under
  load).
  Answers: ShareGPT output lengths.
* Mooncake traces (`read_mooncake_trace`): JSONL lines with `timestamp` (ms),
  `input_length`, `output_length`, `hash_ids` (one id per 512-token block, the last one
  possibly partial). The ids of the full blocks are chained into block hashes.

Gaps are in mean inter-arrival times so that a workload generated at rate r and one
generated at another rate and re-timed to r (sweeps: `workloads.with_rate`, which keeps
the requests' order) interleave documents (conversations) alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esp_core.sim.workloads import (
    LengthRange,
    RequestSpec,
    _leval_out,
    _lognormal_clipped,
    _sharegpt_out,
    read_jsonl_requests,
    sample_leval,
    sample_sharegpt,
)

PREFIX_WORKLOADS = ("docqa", "multiturn")
DEFAULT_BLOCK_TOKENS = 256
MOONCAKE_BLOCK_TOKENS = 512

# content-id namespaces (first element of the tuple a block's content is named by)
_DOC, _QUESTION, _CONV, _TRACE = 1, 2, 3, 4


def chain_hashes(contents: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
    """The hash chain of blocks named by `contents`: h_i = H(h_{i-1}, content_i).

    blake2b, not Python's hash(), so hashes are the same in every process (traces written
    by one run are read by another)."""
    out: list[int] = []
    prev = 0
    for content in contents:
        data = ",".join(str(x) for x in (prev, *content)).encode()
        prev = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
        out.append(prev)
    return tuple(out)


@dataclass(frozen=True)
class DocQAConfig:
    questions: int = 4  # questions per document
    question_tokens: LengthRange = LengthRange(20, 80)
    question_gap: float = 20.0  # mean gap of a follow-up question after the first (x 1/rate)
    block_tokens: int = DEFAULT_BLOCK_TOKENS


@dataclass(frozen=True)
class MultiTurnConfig:
    turns: int = 4
    user_tokens_median: float = 100.0
    user_tokens: LengthRange = LengthRange(4, 1000)
    turn_gap: float = 30.0  # mean gap between a conversation's turn arrivals (x 1/rate)
    block_tokens: int = DEFAULT_BLOCK_TOKENS


def _sorted(requests: list[RequestSpec]) -> list[RequestSpec]:
    return sorted(requests, key=lambda r: (r.arrival_s, r.request_id))


def docqa_hashes(doc: int, question: int, doc_tokens: int, prompt_tokens: int, block: int) -> tuple[int, ...]:
    """Blocks wholly inside the document are the document's; the rest the question's own."""
    shared = doc_tokens // block
    contents = [
        (_DOC, doc, i) if i < shared else (_QUESTION, doc, question, i) for i in range(prompt_tokens // block)
    ]
    return chain_hashes(contents)


def generate_docqa(
    num_requests: int, rate: float, seed: int = 0, config: DocQAConfig = DocQAConfig()
) -> list[RequestSpec]:
    """`num_requests` questions (the last document may have fewer) at `rate` questions/s."""
    k = config.questions
    num_docs = -(-num_requests // k)
    rng = np.random.default_rng([seed, 10])
    doc_tokens, _ = sample_leval(rng, num_docs)
    q_lo, q_hi = config.question_tokens.lo, config.question_tokens.hi
    q_tokens = rng.integers(q_lo, q_hi + 1, size=(num_docs, k))
    answers = _leval_out(rng, num_docs * k).reshape(num_docs, k)
    arr_rng = np.random.default_rng([seed, 11])
    doc_arrivals = np.cumsum(arr_rng.exponential(k / rate, size=num_docs))
    gaps = arr_rng.exponential(config.question_gap / rate, size=(num_docs, k))
    out = []
    for d in range(num_docs):
        for j in range(min(k, num_requests - d * k)):
            prompt = int(doc_tokens[d] + q_tokens[d, j])
            arrival = float(doc_arrivals[d] + (gaps[d, j] if j else 0.0))
            hashes = docqa_hashes(d, j, int(doc_tokens[d]), prompt, config.block_tokens)
            out.append(RequestSpec(f"d{d}q{j}", arrival, prompt, int(answers[d, j]), hashes))
    return _sorted(out)


def generate_multiturn(
    num_requests: int, rate: float, seed: int = 0, config: MultiTurnConfig = MultiTurnConfig()
) -> list[RequestSpec]:
    """`num_requests` turns (the last conversation may have fewer) at `rate` turns/s."""
    t_max = config.turns
    num_convs = -(-num_requests // t_max)
    rng = np.random.default_rng([seed, 20])
    first, _ = sample_sharegpt(rng, num_convs)
    users = _lognormal_clipped(rng, num_convs * t_max, config.user_tokens_median, 0.9, config.user_tokens)
    answers = _sharegpt_out(rng, num_convs * t_max).reshape(num_convs, t_max)
    users = users.reshape(num_convs, t_max)
    arr_rng = np.random.default_rng([seed, 21])
    starts = np.cumsum(arr_rng.exponential(t_max / rate, size=num_convs))
    gaps = arr_rng.exponential(config.turn_gap / rate, size=(num_convs, t_max))
    block = config.block_tokens
    out = []
    for c in range(num_convs):
        prompt, arrival = int(first[c]), float(starts[c])
        for t in range(min(t_max, num_requests - c * t_max)):
            if t:
                prompt += int(answers[c, t - 1] + users[c, t])
                arrival += float(gaps[c, t])
            hashes = chain_hashes((_CONV, c, i) for i in range(prompt // block))
            out.append(RequestSpec(f"c{c}t{t}", arrival, prompt, int(answers[c, t]), hashes))
    return _sorted(out)


def generate_prefix_workload(
    workload: str, num_requests: int, rate: float, seed: int = 0, block_tokens: int = DEFAULT_BLOCK_TOKENS
) -> list[RequestSpec]:
    """`docqa` or `multiturn` with their default settings and `block_tokens`-token blocks."""
    if workload == "docqa":
        return generate_docqa(num_requests, rate, seed, DocQAConfig(block_tokens=block_tokens))
    if workload == "multiturn":
        return generate_multiturn(num_requests, rate, seed, MultiTurnConfig(block_tokens=block_tokens))
    raise ValueError(f"unknown prefix workload {workload!r}; choose from {PREFIX_WORKLOADS}")


# --------------------------------------------------------------------------------------
# Mooncake traces
# --------------------------------------------------------------------------------------


def is_mooncake_trace(path: str | Path) -> bool:
    """True when the first non-empty line has Mooncake's fields."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return "hash_ids" in json.loads(line)
    return False


def _mooncake_request(d: dict, index: int, block: int) -> RequestSpec:
    prompt = int(d["input_length"])
    ids = [int(x) for x in d["hash_ids"]][: prompt // block]  # full blocks only
    return RequestSpec(
        str(d.get("id", f"m{index}")),
        float(d["timestamp"]) / 1000.0,
        prompt,
        int(d["output_length"]),
        chain_hashes((_TRACE, x) for x in ids),
    )


def read_mooncake_trace(
    path: str | Path, limit: int | None = None, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> list[RequestSpec]:
    """Requests of a Mooncake JSONL trace, sorted by arrival; arrivals start where the
    trace's timestamps do (ms -> s). A bad line is a ValueError naming file and line."""
    return _sorted(read_jsonl_requests(path, limit, lambda d, i: _mooncake_request(d, i, block_tokens)))


def write_mooncake_trace(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows (timestamp, input_length, output_length, hash_ids) as Mooncake JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
