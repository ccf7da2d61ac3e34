"""How full an ESP group is, for Serve's replica autoscaling and request routing.

One Serve replica of the controller deployment is one ESP group. Serve's default signal
(ongoing requests per replica) says little about an ESP group: one 500K-token prompt can
saturate a group that holds a single request, while 200 short chats barely touch it. The
signal here is KV demand: slots in use plus prompt tokens still queued (waiting requests
will need at least their prompt's KV), over the group's KV capacity.

    saturation = (kv_used + queued_prompt_tokens) / kv_total     (>= 0; > 1: oversubscribed)
    headroom(prompt) = kv_total - kv_used - queued_prompt_tokens - prompt_tokens

`GroupLoad` is what a controller replica reports (`record_routing_stats` and
`record_autoscaling_stats`), `rank_groups` orders groups for a request (most headroom
first) and `desired_groups` is the autoscaler's arithmetic. Pure Python: no Ray here, so
the choices are unit-tested alone (app/routing.py and app/autoscaling.py adapt them to
Serve's APIs).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

SATURATION_METRIC = "esp_saturation"  # the custom autoscaling metric's name

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class GroupLoad:
    kv_used: int  # slots holding KV (the scheduler's accounting)
    kv_total: int  # slots of all instances of the group
    queued_prompt_tokens: int  # prompt tokens of requests without a first token yet
    waiting: int = 0  # requests without a first token
    running: int = 0  # requests decoding

    @property
    def saturation(self) -> float:
        if self.kv_total <= 0:
            return math.inf
        return (self.kv_used + self.queued_prompt_tokens) / self.kv_total

    def headroom(self, prompt_tokens: int = 0) -> int:
        """KV slots left after everything queued and this prompt (negative: it would
        wait for others to finish)."""
        return self.kv_total - self.kv_used - self.queued_prompt_tokens - int(prompt_tokens)

    def to_stats(self) -> dict[str, float]:
        """For Serve (routing stats / autoscaling metrics): numbers only."""
        return {**{k: float(v) for k, v in asdict(self).items()}, SATURATION_METRIC: float(self.saturation)}

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> GroupLoad | None:
        """None when the replica has not reported yet (or reported something else)."""
        if not stats:
            return None
        try:
            return cls(
                int(stats["kv_used"]),
                int(stats["kv_total"]),
                int(stats["queued_prompt_tokens"]),
                int(stats.get("waiting", 0)),
                int(stats.get("running", 0)),
            )
        except (KeyError, TypeError, ValueError):
            return None


def rank_groups(loads: Mapping[K, GroupLoad | None], prompt_tokens: int) -> list[list[K]]:
    """Groups in order of preference for a request of `prompt_tokens`: the one with the
    most headroom first (ties: fewer waiting requests, then fewer running). A group that
    has not reported its load yet (just started) comes after every group that fits the
    prompt and before those that do not: it is probably empty, but unknown."""
    known = sorted(
        ((k, l) for k, l in loads.items() if l is not None),
        key=lambda kl: (-kl[1].headroom(prompt_tokens), kl[1].waiting, kl[1].running),
    )
    unknown = [k for k, l in loads.items() if l is None]
    fits = [k for k, l in known if l.headroom(prompt_tokens) >= 0]
    short = [k for k, l in known if l.headroom(prompt_tokens) < 0]
    return [[k] for k in fits] + ([unknown] if unknown else []) + [[k] for k in short]


def desired_groups(
    saturations: Sequence[float], current: int, target: float, min_groups: int, max_groups: int
) -> int:
    """Groups needed so that the mean saturation is `target`: the total KV demand
    (sum of saturations, in units of one group) over the target per group. With no
    report yet, keep the current count."""
    if not saturations:
        return max(min_groups, min(max_groups, current))
    demand = sum(s for s in saturations if math.isfinite(s))
    want = math.ceil(demand / target - 1e-9) if demand > 0 else min_groups
    return max(min_groups, min(max_groups, want))
