"""What travels between the ingress and the controller (through a DeploymentHandle).

Three controller methods carry a generation (app/group_stream.py is the ingress's side):

* `submit(GenerateRequest)` -> `Admission`: unary; admits the request (or says why not:
  queue full, context too long) and names the controller replica that took it;
* `subscribe(Pin, ingress_id)`: ONE long-lived stream per ingress replica and controller
  replica; each item is `{request_id: [TokenEvent, ...]}` for every request of that
  ingress with news since the last item (per engine step one item, not one per token per
  request), a request's last event carrying `finish_reason`;
* `cancel(Pin, request_id)`: unary; aborts the request and frees its KV.

`Pin` routes subscribe and cancel to the replica the submit went to (app/routing.py).
Errors travel as values, not exceptions, so the ingress can answer with the right HTTP
status before sending headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from esp_core.sched.plan import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    # W3C trace context of the ingress's request span ({"traceparent": ..., maybe
    # "tracestate": ...}), so that the controller's spans are its children; None: no trace
    trace_context: dict[str, str] | None = None
    # the prompt's block hash chain (esp_core.sched.prefix_cache.block_hash_chain, blocks of
    # prefix_cache.block_tokens), hashed once in the ingress: the router matches it against
    # what each group was sent, the controller's prefix cache looks it up; () when the
    # prefix cache is off
    block_hashes: tuple[int, ...] = ()
    # the ingress replica whose subscription receives this request's events
    ingress_id: str = ""
    # the request id of the first choice of the same prompt (n > 1): this choice waits for
    # that one's prompt KV and shares it, so the prompt is prefilled once; "" for the first
    prefill_after: str = ""


@dataclass(frozen=True)
class Pin:
    """Routes a call to one controller replica (Serve's ReplicaID.unique_id)."""

    replica_id: str


@dataclass(frozen=True)
class Admission:
    accepted: bool
    status: int = 200  # HTTP status to answer when not accepted
    code: str | None = None  # OpenAI error code, e.g. "queue_full", "context_length_exceeded"
    message: str = ""
    retry_after_s: int | None = None
    replica_id: str = ""  # the controller replica that admitted the request


@dataclass(frozen=True)
class TokenEvent:
    token_id: int | None  # None when the event only ends the request (abort, error)
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know about the served model (read from the instances)."""

    served_name: str
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class InstanceKV:
    instance: int
    free_slots: int
    total_slots: int


@dataclass(frozen=True)
class GroupStatus:
    instances: tuple[InstanceKV, ...]
    scheduler_free_slots: tuple[int, ...]
    waiting: int
    running: int
    extra: dict = field(default_factory=dict)
    # KV slots per instance held by prefix-cache entries (evictable); () without a cache
    cached_slots: tuple[int, ...] = ()

    def cached_on(self, instance: int) -> int:
        return self.cached_slots[instance] if instance < len(self.cached_slots) else 0

    @property
    def fully_free(self) -> bool:
        """No request holds KV (prefix-cache entries, evicted whenever needed, aside)."""
        return all(i.free_slots + self.cached_on(i.instance) == i.total_slots for i in self.instances)
