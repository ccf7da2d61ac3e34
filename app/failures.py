"""Failure accounting of an ESP group: who is charged for a failed batch, when a request
has used up its retries, when the group has recovered too often, and how long a batch may
run before the watchdog calls it hung. Plain Python (no Ray, no asyncio): the controller
(app/recovery.py, app/engine_loop.py) drives it and the unit tests drive it alone.

Without it a deterministic failure (a "poison" request that crashes every batch it is in)
loops for ever: recover, resume, crash, recover, and every request batched with it fails
or waits with it. The rules:

* a request is *proven* once it produced `PROVEN_TOKENS` tokens (a prefill and a decode
  step) since it was last charged;
* a failed batch (or a dead or hung instance) charges one retry to each unproven request
  in it (with KV on it), or to all of them when every one is proven (a failure late in a
  generation); a charged request becomes a *suspect*;
* suspects re-enter the scheduler one at a time (their *trial*): the next one only when
  the one on trial is proven or gone. Other requests resume at once, new ones are admitted;
* a request charged more than `request_retries` times fails alone, with an error naming
  the cause class; the group serves the rest.

A poison request is therefore dropped after at most request_retries + 1 failures (a
suspect charged again is tried first). An innocent request batched with it is charged at
most once for it: after its charge it waits for its own trial, and it is proven before
the poison request runs again (or waits behind it). `request_retries: 0` fails every
request of a failed batch at once.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

# tokens that prove a request innocent: the first comes from its prefill, the second
# from a decode step
PROVEN_TOKENS = 2


def cause_of(error: str | None) -> str:
    """The cause class of a batch error ("RuntimeError: boom" -> "RuntimeError")."""
    head = (error or "unknown").partition(":")[0].strip()
    return head[:60] if head and " " not in head else "error"


# A client sees an error event's text up to its first colon, cut to 80 characters
# (app/streaming.py:generation_failed): these messages have no colon and fit.


def retries_exhausted_message(cause: str, failures: int) -> str:
    """A request that failed past its retries."""
    return f"ESP batch failed ({cause}) {failures} times with this request in it; not retried"


def too_many_recoveries_message() -> str:
    """Every request of a group that stopped after too many rebuilds (the log has the
    numbers)."""
    return "ESP group stopped after too many rebuilds (recovery.max_recoveries_per_minute)"


@dataclass
class RetryLedger:
    """Per-request retry charges, proof of innocence and the one-at-a-time trials."""

    retries: int
    charges: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # produced since the last charge
    suspects: collections.deque[str] = field(default_factory=collections.deque)  # held, in order
    # the tokens each held suspect streamed (it is in no scheduler): it resumes over them
    streamed: dict[str, list[int]] = field(default_factory=dict)
    on_trial: str | None = None
    charged_total: int = 0  # retries charged, ever (status)
    dropped_total: int = 0  # requests failed past their budget, ever (status)

    def proven(self, request_id: str) -> bool:
        return self.tokens.get(request_id, 0) >= PROVEN_TOKENS

    def charge(self, request_ids: Iterable[str]) -> list[str]:
        """Charge one failure to the unproven of `request_ids` (to all when all are
        proven). Returns those now past their budget; the others charged become
        suspects, one charged before at the head of the queue (it is tried first)."""
        ids = list(dict.fromkeys(request_ids))
        blamed = [r for r in ids if not self.proven(r)] or ids
        over: list[str] = []
        for rid in blamed:
            self.charges[rid] = self.charges.get(rid, 0) + 1
            self.charged_total += 1
            self.tokens[rid] = 0
            if rid in self.suspects:
                self.suspects.remove(rid)
            if self.on_trial == rid:
                self.on_trial = None
            if self.charges[rid] > self.retries:
                over.append(rid)
                self.dropped_total += 1
            elif self.charges[rid] > 1:
                self.suspects.appendleft(rid)
            else:
                self.suspects.append(rid)
        return over

    def is_held(self, request_id: str) -> bool:
        """True for a suspect waiting for its trial (it must not enter the scheduler)."""
        return request_id in self.suspects

    def next_trial(self) -> str | None:
        """The suspect to let into the scheduler now (None: one is on trial, or none)."""
        if self.on_trial is not None or not self.suspects:
            return None
        self.on_trial = self.suspects.popleft()
        return self.on_trial

    def on_token(self, request_id: str) -> bool:
        """Record a token; True when it proves the request on trial (the next may start)."""
        self.tokens[request_id] = self.tokens.get(request_id, 0) + 1
        if request_id != self.on_trial or not self.proven(request_id):
            return False
        self.on_trial = None
        return True

    def forget(self, request_id: str) -> bool:
        """The request finished or left; True when it was on trial (the next may start)."""
        self.charges.pop(request_id, None)
        self.tokens.pop(request_id, None)
        self.streamed.pop(request_id, None)
        if request_id in self.suspects:
            self.suspects.remove(request_id)
        if self.on_trial == request_id:
            self.on_trial = None
            return True
        return False

    def failures(self, request_id: str) -> int:
        return self.charges.get(request_id, 0)

    def summary(self) -> dict[str, int]:
        return {
            "suspects_waiting": len(self.suspects),
            "on_trial": int(self.on_trial is not None),
            "retries_charged": self.charged_total,
            "requests_failed_after_retries": self.dropped_total,
        }


@dataclass
class RecoveryRate:
    """At most `per_minute` recoveries in any 60 s: past it the group gives up (fails its
    requests, turns unhealthy) and Serve replaces the replica."""

    per_minute: int
    window_s: float = 60.0
    times: collections.deque[float] = field(default_factory=collections.deque)

    def allow(self, now: float) -> bool:
        """Record a recovery at `now`; False when it is one too many."""
        while self.times and now - self.times[0] >= self.window_s:
            self.times.popleft()
        self.times.append(now)
        return len(self.times) <= self.per_minute


def watchdog_deadline_s(floor_s: float, factor: float, estimate_s: float | None) -> float:
    """How long one instance's sub-plan may run: the floor, or `factor` times the cost
    model's estimate of its batches when that is longer (a long prefill is not a hang)."""
    if estimate_s is None or estimate_s <= 0:
        return floor_s
    return max(floor_s, factor * estimate_s)
