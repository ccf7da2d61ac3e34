"""Long work on the shorts' reserved instance, in latency-budget chunks.

While short requests keep arriving, long prompts' rings leave the last
`short_reserved_instances` instances to them (chunked.py), and that instance idles
between short requests while long prompts wait (on Mixed, ~9 % of the instance-time
of a run near capacity). With `reserved_budget_chunks`, a long prompt that finds no
other instance and no short request waiting starts there anyway, chunk by chunk, each
chunk cut so the cost model says it ends within `short_wait_budget_s`: a short request
arriving meanwhile waits about that long, then goes first (the shorts' round is planned
before long prompts' chunks) and may keep its KV beside the long prompt's
(`short_kv_on_long_holders`). Such a prompt is "budget-mode"; its instances do not
count against the other long prompts' cap, which still leaves one more instance to
short requests, and its own chunks are cut as long as no instance is free of long work.
"""

from __future__ import annotations

from esp_core.sched.scheduler_state import SchedulerState
from esp_core.sched.state import Phase, SchedulerRequest

_ACTIVE = (Phase.WAITING, Phase.PREFILLING, Phase.PARTIAL)


def may_start_on_reserved(state: SchedulerState, num_extra: int) -> bool:
    """A long prompt with no instance inside the cap may start on the reserved ones
    (`num_extra` idle instances outside it): the switch is on and no short waits."""
    return state.config.reserved_budget_chunks and num_extra > 0 and not state.short_waiting()


def budget_mode_instances(state: SchedulerState, exclude: SchedulerRequest | None = None) -> set[int]:
    """Instances holding KV of budget-mode prompts (other than `exclude`); prompts that
    finished their prefill (or were dropped) leave the set."""
    out: set[int] = set()
    for rid in list(state.budget_longs):
        st = state.requests.get(rid)
        if st is None or st.phase not in _ACTIVE:
            state.budget_longs.discard(rid)
        elif st is not exclude:
            out.update(state.kv.holders(rid))
    return out
