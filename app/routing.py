"""`HeadroomRequestRouter`: Serve's request router of the controller deployment. Each
`generate` call goes to the ESP group (replica) with the most KV headroom for its prompt
(app/saturation.py: rank_groups), from the load every replica reports through
`record_routing_stats` (every `request_routing_stats_period_s`). Other calls (status,
model_info, health) go to the emptiest group.

Known limit: the stats are periodic, so a burst between two reports goes to the same
group; Serve then still respects max_ongoing_requests and tries the next rank.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from esp_serve.app.saturation import GroupLoad, rank_groups

ROUTER_PATH = "esp_serve.app.routing:HeadroomRequestRouter"


def prompt_tokens_of(pending: PendingRequest | None) -> int:
    """The prompt length of a pending `generate(GenerateRequest)` call (0 otherwise)."""
    if pending is None:
        return 0
    for arg in (*pending.args, *pending.kwargs.values()):
        ids = getattr(arg, "prompt_token_ids", None)
        if ids is not None:
            return len(ids)
    return 0


def rank_replicas(candidates: list[Any], prompt_tokens: int) -> list[list[Any]]:
    """Candidates (anything with `routing_stats`) ranked by headroom for the prompt."""
    by_index = {i: GroupLoad.from_stats(getattr(r, "routing_stats", None)) for i, r in enumerate(candidates)}
    return [[candidates[i] for i in rank] for rank in rank_groups(by_index, prompt_tokens)]


class HeadroomRequestRouter(FIFOMixin, RequestRouter):
    """FIFOMixin: the base class hands a chosen replica only to the pending request with
    the same internal request id, and the `n` choices of one HTTP request share that id;
    without the FIFO fallback all but one of them would never be routed (found by
    tests/app's n=2 test)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        return rank_replicas(candidate_replicas, prompt_tokens_of(pending_request))
