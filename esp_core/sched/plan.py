"""The one contract between deciding and executing: `IterationPlan` and its results.

The scheduler (`esp_core.sched`) emits an `IterationPlan`; the live executors
(`esp_core.runtime`, driven by the controller in `app/`) and the simulated executor
(`esp_core.sim`) consume the very same object. Everything here is a frozen, picklable
dataclass of plain values (ints, floats, strings, tuples), convertible to JSON with
`plan_to_json` for debugging and logs.

Vocabulary
----------
* instance: an elastic instance, identified by its index 0..N-1 in the ESP group.
* global position g: index of a token in its request's sequence (prompt tokens first,
  then generated tokens). Positions drive RoPE and the causal mask.
* ring: the ordered instance list of a prefill batch; logical rank r = index in it.
* striping: token g of a prefill item lives on logical rank `(g + stripe_offset) % P`.

Execution model (docs/architecture.md §2, §4): there is no global lock-step. Batches start on idle
instances and complete independently; `Scheduler.schedule(state)` returns a plan with
only the *new* work to start now, and each batch's completion comes back as a
`BatchResult` fed to `Scheduler.update`.

A 3-instance example
--------------------
Request A (prompt 8 tokens) is prefilled on ring [0, 1, 2] with stripe_offset 1, its
KV kept on decode set {0} (scale-down); request B (decode, 5000 tokens of KV on 1 and
2) steps with master 2, storing its new token on 2::

      instance 0            instance 1              instance 2
    +---------------+     +----------------+     +----------------+
    | prefill A     |     | prefill A      |     | prefill A      |  PrefillBatch(
    | rank 0:       |     | rank 1:        |     | rank 2:        |   instances=(0,1,2),
    |  g = 2, 5     |     |  g = 0, 3, 6   |     |  g = 1, 4, 7   |   items=[A: range [0,8),
    | keeps g 0..7  |<-KV-| K/V blocks pass through the ring; 0 |   stripe_offset=1,
    | (decode set)  |     | copies what it must keep            |   keep={0: [0,8)}])
    +---------------+     +----------------+     +----------------+
                          | decode B       |     | decode B       |  DecodeBatch(
                          | holder: KV     |<-q--| master: dense,  |   instances=(1,2),
                          | 0..2999        |--o,lse->| KV 3000..4999 |   items=[B: master=2,
                          |                |     | + new token    |   holders=(1,2), new_kv_instance=2])
                          +----------------+     +----------------+

Logical rank r of a token g is `(g + stripe_offset) % P`: with offset 1 and P = 3,
g = 0 -> rank 1, g = 1 -> rank 2, g = 2 -> rank 0, and so on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

_Frozen = TypeVar("_Frozen")

# --------------------------------------------------------------------------------------
# Requests and sampling
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token of one request (one OpenAI choice).

    Randomness is keyed on (seed, output index), never on which instance samples, so a
    request's output does not depend on where its master runs. `seed=None` means the
    controller picks one at admission (so it is still fixed for the request's lifetime).
    """

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = disabled
    min_tokens: int = 0  # EOS / stop tokens are ignored before this many outputs
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled + top-k logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class NewRequest:
    """Sent to each instance once, in the plan where it joins the request (`RequestJoin`).

    The scheduler reserves KV for the prompt plus `sampling.max_tokens`; benchmarks that
    know the exact output length send it as max_tokens with `ignore_eos`, so the
    reservation is exact there.

    `block_hashes` is the prefix cache's view of the prompt: a hash chain over its full
    blocks of `block_tokens` tokens (h_i = hash((h_{i-1}, block i))), so equal hashes at
    index i mean equal prompts up to the end of block i. The controller computes it from
    the token ids; the simulator passes trace hash ids. Empty: no cache lookup. (Left out
    of `repr`, so plans of requests without hashes print as before.)

    `prefill_after` names a sibling with the same prompt (the first choice of an n > 1
    request): with the prefix cache on, this request waits until the sibling's prompt KV
    is written, then shares it and computes only the prompt's last partial block. A
    sibling that finished, failed, was aborted or is unknown holds nothing back. Only the
    scheduler reads it (left out of `repr` too).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float = 0.0
    block_hashes: tuple[int, ...] = field(default=(), repr=False)
    prefill_after: str = field(default="", repr=False)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


# --------------------------------------------------------------------------------------
# Token ranges and KV placement
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class TokenRange:
    """Half-open range [start, end) of global token positions of one request."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start <= self.end):
            raise ValueError(f"invalid TokenRange [{self.start}, {self.end})")

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, position: object) -> bool:
        return isinstance(position, int) and self.start <= position < self.end

    def intersect(self, other: TokenRange) -> TokenRange | None:
        lo, hi = max(self.start, other.start), min(self.end, other.end)
        return TokenRange(lo, hi) if lo < hi else None


@dataclass(frozen=True)
class KVKeep:
    """Scale-down: instance `instance` keeps these global positions of a request's KV."""

    instance: int
    ranges: tuple[TokenRange, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.ranges)


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def frozen_from_fields(cls: type[_Frozen], fields: dict[str, Any]) -> _Frozen:
    """The frozen dataclass `cls` with exactly `fields` (every field, in any order; no
    `__post_init__`): equal to `cls(**fields)`. For hot paths building many plan objects
    in one call (a prefill round: one `PrefillItem` per request): the generated
    `__init__` of a frozen dataclass sets each field with `object.__setattr__`, which
    makes a 7-field item cost ~2x this."""
    obj = object.__new__(cls)
    object.__setattr__(obj, "__dict__", fields)
    return obj


@dataclass(frozen=True)
class PrefillItem:
    """One request's share of a prefill batch: a chunk of its tokens.

    * `tokens` is the range of global positions computed by this batch. `start > 0`
      means earlier tokens are already cached (chunked prefill, or re-prefill after
      preemption of a request whose KV was dropped is `start == 0` over prompt +
      generated tokens): the chunk's queries also attend to that cached KV on
      `cached_holders`, merged by LSE.
    * The chunk's own tokens are striped over the ring with `stripe_offset`.
    * `keep` says which instance of the decode set stores which positions of this
      chunk's KV (scale-down). Instances not named keep nothing. The ranges of all
      `keep` entries partition `tokens` exactly.
    * `sample` is True when `tokens.end` is the end of the sequence to prefill: the rank
      holding the last token runs the LM head and samples the first output token.
    * `extra_token_ids` carries the ids of this chunk's positions past the prompt
      (re-prefill of generated tokens after preemption), which instances may not know;
      empty otherwise. Prompt ids travel once, in `IterationPlan.new_requests`.
    """

    request_id: str
    tokens: TokenRange
    stripe_offset: int
    keep: tuple[KVKeep, ...]
    cached_holders: tuple[int, ...] = ()
    sample: bool = True
    extra_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillBatch:
    """Prefill of several requests on an ordered ring of instances (striped ring attention)."""

    batch_id: int
    instances: tuple[int, ...]  # ring order; logical rank = index
    items: tuple[PrefillItem, ...]

    @property
    def dop(self) -> int:
        return len(self.instances)

    @property
    def num_tokens(self) -> int:
        return sum(len(it.tokens) for it in self.items)


@dataclass(frozen=True)
class DecodeItem:
    """One request's decode step.

    `input_token` (sampled by the previous step) sits at global position `position` =
    prompt_len + outputs so far - 1. `master` runs the dense layers and sampling;
    `holders` hold the request's KV *before* this step; the new token's K/V is stored on
    `new_kv_instance` (the master or another instance of the batch: choosing an instance
    outside the holders is scale-up). The new token attends to itself exactly once.

    Sampling state (penalty counts, stop handling) must not live on one master, since
    masters may change every step: every instance of a batch records `input_token` of
    each item. `output_prefix` carries the output tokens *before* `input_token` to an
    instance that has not seen them all (e.g. a new master); the scheduler leaves it
    `()` when every instance of the batch has seen them all. The scheduler sets it (the
    same for all instances of the batch, which record it alike) exactly where one has not.

    A *look-ahead* item (`input_token=None`, esp_core/sched/lookahead.py) is planned
    while the request's previous step still runs on the same single instance: its input
    is "the token you sampled at `position`", which that instance (the previous step's
    master) holds; only a one-instance batch of look-ahead items carries them.
    """

    request_id: str
    input_token: int | None
    position: int
    master: int
    holders: tuple[int, ...]
    new_kv_instance: int
    output_prefix: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecodeBatch:
    """One decode step of several requests over instance list `instances`."""

    batch_id: int
    instances: tuple[int, ...]
    items: tuple[DecodeItem, ...]

    @property
    def is_lookahead(self) -> bool:
        """Planned while the group's previous step still runs (its items' inputs are
        the tokens that step samples)."""
        return bool(self.items) and self.items[0].input_token is None


@dataclass(frozen=True)
class Migration:
    """Copy KV of `ranges` of a request from instance `src` to `dst`, then free it on `src`.

    The one place KV moves (compaction when the cost model says it beats a pause).
    """

    request_id: str
    src: int
    dst: int
    ranges: tuple[TokenRange, ...]


class ReleaseReason(str, Enum):
    FINISHED = "finished"
    ABORTED = "aborted"
    PREEMPTED = "preempted"  # KV dropped; the request is re-prefilled later


@dataclass(frozen=True)
class Release:
    """Free every KV slot of a request on the named instances (finish/abort/preempt)."""

    request_id: str
    instances: tuple[int, ...]
    reason: ReleaseReason


@dataclass(frozen=True)
class KVAdoption:
    """A prefix-cache hit: request `dst_rid` takes the KV slots of positions [0, keep_len)
    of the finished request `src_rid` (a cache entry) where they lie; `src_rid`'s other
    positions are freed and it is gone. Every instance of `instances` (those holding
    `src_rid`'s KV) applies it, right after the plan's releases. `kept` says which
    instance keeps which of those positions (they partition [0, keep_len)): the
    executors need only `keep_len`, validators (plan_check, the simulator's ledger) the
    per-instance counts.

    `share=True` is a reader of an entry that stays cached or that another request
    adopts in the same plan, or of a running request's written prompt: `dst_rid` refers
    to the very same slots (no copy, no new slot) and `src_rid` keeps them too; each
    slot is freed when the last request holding it is released. `instances` are then
    those holding `src_rid`'s [0, keep_len). Shares come before the adoption of the same
    source in `IterationPlan.adoptions`, which run in order."""

    src_rid: str
    dst_rid: str
    keep_len: int
    instances: tuple[int, ...]
    kept: tuple[KVKeep, ...] = ()
    share: bool = False


@dataclass(frozen=True)
class RequestJoin:
    """Instances that take up a request in this plan without having its state: its first
    prefill ring, a re-prefill or later chunk on other instances, a new master or holder
    of its decode after a merge, a migration or a scale-up. Each applies the request's
    `NewRequest` (in `IterationPlan.new_requests`) before the plan's batches. An instance
    keeps a request's state until the request finishes, is aborted or adopted (a
    preemption keeps it), so it joins a request at most once."""

    request_id: str
    instances: tuple[int, ...]


@dataclass(frozen=True)
class IterationPlan:
    """New work to start now. Work already running is never re-planned.

    Order of execution on each instance: `releases`, then `adoptions` (prefix-cache hits),
    then `migrations`, then batches.
    Batches of one plan normally use disjoint instances and run concurrently; batches
    that share an instance run there back to back in plan order (prefills, then decodes):
    that is how one instance mixes new prefills with running decodes in a round. An
    instance is busy until all its batches of the plan completed. `paused` lists the
    requests of decode batches that stop stepping because their instances were lent to
    a prefill; a later plan resumes (and possibly merges) them.

    The plan is the whole contract: executors run it as decided. `joins` say which
    instances receive which of `new_requests` (every instance of a batch knows each of
    its requests: it had the request's state before, or a join of this plan names it),
    and decode items carry the `output_prefix` an instance lacks.
    """

    plan_id: int
    new_requests: tuple[NewRequest, ...] = ()
    prefills: tuple[PrefillBatch, ...] = ()
    decodes: tuple[DecodeBatch, ...] = ()
    migrations: tuple[Migration, ...] = ()
    releases: tuple[Release, ...] = ()
    paused: tuple[str, ...] = ()
    # (left out of repr: plans without cache hits print as before)
    adoptions: tuple[KVAdoption, ...] = field(default=(), repr=False)
    joins: tuple[RequestJoin, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (self.prefills or self.decodes or self.migrations or self.releases or self.adoptions)

    def batches(self) -> tuple[PrefillBatch | DecodeBatch, ...]:
        return (*self.prefills, *self.decodes)

    def instances_used(self) -> set[int]:
        return {i for b in self.batches() for i in b.instances}


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class SampledToken:
    """The token one request produced in a batch (prefill with sample=True, or decode)."""

    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class BatchResult:
    """Completion event of one batch. `elapsed_s` is measured wall time (live) or the
    cost-model time (simulator); the live server refits the cost model from it."""

    batch_id: int
    kind: str  # "prefill" | "decode"
    instances: tuple[int, ...]
    sampled: tuple[SampledToken, ...] = ()
    elapsed_s: float = 0.0
    error: str | None = None  # set when the batch failed (e.g. an instance died)


# --------------------------------------------------------------------------------------
# JSON (debugging, logs, traces)
# --------------------------------------------------------------------------------------

_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        SamplingParams,
        NewRequest,
        TokenRange,
        KVKeep,
        PrefillItem,
        PrefillBatch,
        DecodeItem,
        DecodeBatch,
        Migration,
        Release,
        KVAdoption,
        RequestJoin,
        IterationPlan,
        TokenLogprob,
        SampledToken,
        BatchResult,
    )
}


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {"__type__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = _encode(getattr(obj, f.name))
        return out
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (tuple, list)):
        return [_encode(x) for x in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict) and "__type__" in obj:
        cls = _TYPES[obj["__type__"]]
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in obj:
                kwargs[f.name] = _decode(obj[f.name])
        if cls is Release:
            kwargs["reason"] = ReleaseReason(kwargs["reason"])
        return cls(**kwargs)
    if isinstance(obj, list):
        return tuple(_decode(x) for x in obj)
    return obj


def to_json(obj: Any, **dumps_kwargs: Any) -> str:
    """Serialise a plan, batch or result (any dataclass of this module) to JSON."""
    return json.dumps(_encode(obj), **dumps_kwargs)


def from_json(text: str) -> Any:
    """Inverse of `to_json`: rebuilds the frozen dataclasses."""
    return _decode(json.loads(text))


def iter_ranges(ranges: Iterable[TokenRange]) -> Iterable[int]:
    """All positions of a collection of ranges, in order."""
    for r in ranges:
        yield from range(r.start, r.end)
