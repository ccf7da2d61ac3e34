"""ESPSchedulerConfig: every knob of the scheduler, frozen, with two policy presets.

`policy="esp"` is ours: cost-model decode times, scale-up when the cost model says it
pays, migration instead of a pause when it is cheaper, optional chunked prefill.
`policy="loongserve"` reproduces the original's choices (facts file): a constant
decode-step time in its decisions, no chunking, no migration, scale-up at batch size
θ = 128 per instance, a 5 s prefill budget, prefill may borrow decode instances at most
every 10 decode steps, a per-dataset skip-ahead limit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

POLICIES = ("esp", "loongserve")

# LoongServe's skip-ahead limit (max_num_ooe) per dataset, from its artifact
LOONGSERVE_SKIP_AHEAD = {"sharegpt": 1, "l-eval": 8, "lv-eval": 8, "mixed": 4, "zipf": 64}


@dataclass(frozen=True)
class ESPSchedulerConfig:
    policy: str = "esp"
    # ---- finishing
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None  # None: bounded only by the pool
    # ---- admission (admission.py)
    max_skip_ahead: int = 4  # a blocked request may be passed at most this many times
    max_scan: int = 1024  # waiting requests examined per call (bounds decision time)
    max_prefill_time_s: float = 5.0  # budget of one prefill round (LoongServe: 5 s)
    max_prefill_requests: int = 256  # per call
    gain_vs_delay: bool = True  # borrow decode instances only when it pays
    # ---- batching DP bounds (None: batching.py's defaults, min(64, 4·instances) request
    # groups, a batch spanning max(2, 2·groups/instances) of them, plus its repairs;
    # set: that DP alone, exhaustive when both are >= the number of requests)
    dp_max_request_groups: int | None = None
    dp_max_batch_groups: int | None = None
    # ---- decode scaling
    decode_batch_threshold: int = 128  # θ: requests per master that make a step compute-bound
    constant_decode_time_s: float | None = None  # loongserve: fixed step time in decisions
    min_decode_steps_between_borrows: int = 0  # a group is not paused again before this
    # with no idle instance, a prefill round that would borrow decode instances is
    # considered at most every this many decode steps (loongserve: 10)
    prefill_check_interval_steps: int = 2
    allow_migration: bool = True
    headroom_tokens: int = 16  # slots left free per instance for decode growth at placement
    # ---- chunked (preemptible) prefill
    chunked_prefill: bool = False
    chunk_tokens: int = 16384
    long_request_max_wait_s: float = 30.0  # after this, a chunked request gets priority
    # short-request isolation (chunked prefill only): while short requests (prompts of
    # at most `short_prompt_tokens`) keep arriving, long prompts' chunk rings never take the last
    # `short_reserved_instances` instances, so a short request finds an instance that
    # no long prefill holds instead of waiting seconds for a chunk or a whole prompt
    short_reserved_instances: int = 1
    short_activity_window_s: float = 10.0  # "shorts are arriving": one arrived this recently
    # a "short request" (isolation is for it) has a prompt of at most this many tokens
    # (and at most one chunk). A longer prompt of one chunk is neither short nor chunked:
    # its own prefill takes a large part of a second anyway, so keeping an instance free
    # of long prompts for it costs capacity for nothing (Mixed's L-Eval part: stable rate
    # +1-6% over four seeds in the simulator, docs/results.md "What counts as short")
    short_prompt_tokens: int = 4096
    # when a long prompt's chunk must still take the shorts' instances (its KV is spread
    # over them), the chunk is cut so the cost model says it ends within this budget:
    # a short request arriving meanwhile waits at most about this long
    short_wait_budget_s: float = 0.05
    min_chunk_tokens: int = 256  # floor of a budget-cut chunk (per-chunk overhead)
    # short requests may keep KV on instances that hold a long prompt's earlier chunks
    # (else, once long prompts hold every instance, shorts wait for a whole prefill); a
    # later chunk then pauses the short's decode group for one chunk, never twice in a
    # row (the group steps in between)
    short_kv_on_long_holders: bool = True
    # a chunk's KV is split evenly over its ring (not packed on one instance), and later
    # chunks run on the holders only (more instances than holders cannot speed up the
    # attention to the cached prefix, which dominates long prompts; they would idle)
    spread_chunk_kv: bool = True
    # adaptive chunking: a long prompt whose first chunk finds no short request waiting
    # is prefilled whole on a ring of idle instances within the long prompts' cap
    # (its holders chosen with the whole prompt in view, no per-chunk cost), and
    # chunked only while short requests wait
    adaptive_chunking: bool = False
    # while no short request is arriving (none within `short_activity_window_s`) or
    # waiting, a long prompt not yet started is not chunked at all: it goes through
    # admission and the batching DP as LoongServe prefills a prompt (a ring sized for the
    # whole prompt, decode instances borrowed when it pays). Chunks exist to let short
    # requests in between; with none around they only cost (LV-Eval: stable rate
    # 0.144 -> 0.153 req/s in the simulator, docs/results.md "Whole prompts while no
    # short request is around")
    whole_prompts_without_shorts: bool = False
    # a long prompt that no other long prompt waits behind is not started on the few
    # instances idle now when waiting for running long prefills to end gives a wider
    # ring that the cost model says finishes it sooner (ring_lookahead.py)
    long_start_lookahead: bool = False
    # while other long prompts wait to start, a whole prompt's ring is the one with the
    # fewest instance-seconds (not the fastest): the other idle instances go to them
    backlog_min_ring: bool = False
    # a long prompt that finds no instance inside the long prompts' cap, while no short
    # request waits, starts on the shorts' reserved instance in chunks cut to
    # `short_wait_budget_s` (reserved_budget.py)
    reserved_budget_chunks: bool = False
    # a chunked prompt's next chunk may widen its ring onto idle instances inside the
    # cap, its cached KV rebalanced onto them by migrations, when the cost model says
    # the remaining chunks end sooner for it (widen.py; needs spread_chunk_kv). On: in
    # the simulator it keeps short-vs-long within 2x (1.48x; 14.3x without), lifts
    # Mixed's stable rate 0.351 -> 0.377 req/s and LV-Eval's 0.140 -> 0.144, and leaves
    # L-Eval and ShareGPT as they were (docs/results.md, "widen_chunk_ring by default")
    widen_chunk_ring: bool = True
    # decode merges (decode_merge.py): a small ready one-instance decode group moves
    # (KV migrated) onto another's instance when the cost model says the decode steps
    # saved pay for the move (chunked prefill leaves many one-request groups)
    merge_decode_groups: bool = False
    # decode narrowing (decode_narrow.py): a ready multi-instance decode group gathers its
    # KV onto fewer instances (migrations) when the cost model says its steps left save
    # more than the move costs (a long prompt's decode otherwise spans its whole chunk
    # ring); on in the server, off in the simulator (its results predate it)
    narrow_decode_groups: bool = False
    # decode packing (packing.py): a round of short prompts is prefilled on a running
    # one-instance decode group's instance and decodes with it, instead of starting a
    # new group on an idle instance, while the joint step stays within
    # `pack_step_slowdown` times a lone request's step (each instance's step pays a
    # fixed cost, whatever its batch)
    pack_decode: bool = False
    pack_step_slowdown: float = 2.0
    # a round waits for a target's running step or prefill that ends within this long
    # after the round's own prefill would have (a burst's later arrivals join the group
    # its first ones went to instead of starting groups of their own)
    pack_hold_s: float = 0.2
    # decode look-ahead (lookahead.py): while a one-instance decode group's step runs and
    # nothing else wants its instance, the next step is planned too (its input is "the
    # token you sampled", held by the instance), so the controller's round trip overlaps
    # the step; off in the simulator (it models no round trip)
    decode_lookahead: bool = False
    # ---- prefix cache (prefix_cache.py, cache_ops.py; needs chunked_prefill and
    # short_kv_on_long_holders, else off): finished
    # requests' KV stays as evictable entries that later requests with the same prompt
    # blocks adopt instead of prefilling them again
    prefix_cache: bool = False
    prefix_block_tokens: int = 64  # must equal the block size the request hashes use

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.max_skip_ahead < 0 or self.max_scan < 1:
            raise ValueError("max_skip_ahead must be >= 0 and max_scan >= 1")
        if self.chunk_tokens < 1 or self.min_chunk_tokens < 1:
            raise ValueError("chunk_tokens and min_chunk_tokens must be >= 1")
        if self.short_wait_budget_s <= 0:
            raise ValueError("short_wait_budget_s must be > 0")
        if self.short_reserved_instances < 0 or self.short_activity_window_s < 0:
            raise ValueError("short_reserved_instances and short_activity_window_s must be >= 0")
        if self.short_prompt_tokens < 1:
            raise ValueError("short_prompt_tokens must be >= 1")
        if any(x is not None and x < 1 for x in (self.dp_max_request_groups, self.dp_max_batch_groups)):
            raise ValueError("DP bounds must be >= 1")
        if self.pack_step_slowdown < 1:
            raise ValueError("pack_step_slowdown must be >= 1")
        if self.pack_hold_s < 0:
            raise ValueError("pack_hold_s must be >= 0")
        if self.prefix_block_tokens < 1:
            raise ValueError("prefix_block_tokens must be >= 1")
        if self.policy == "loongserve" and self.chunked_prefill:
            raise ValueError("the loongserve policy has no chunked prefill")

    @classmethod
    def loongserve(cls, dataset: str = "mixed", **overrides) -> ESPSchedulerConfig:
        """The original's constants (facts file); `dataset` picks the skip-ahead limit."""
        base = cls(
            policy="loongserve",
            max_skip_ahead=LOONGSERVE_SKIP_AHEAD.get(dataset, 4),
            max_prefill_time_s=5.0,
            decode_batch_threshold=128,
            constant_decode_time_s=0.025,
            prefill_check_interval_steps=10,
            allow_migration=False,
            chunked_prefill=False,
            widen_chunk_ring=False,  # (the original never migrates KV)
        )
        return replace(base, **overrides)

    @property
    def is_loongserve(self) -> bool:
        return self.policy == "loongserve"
