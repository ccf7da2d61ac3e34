"""`HeadroomRequestRouter`: Serve's request router of the controller deployment. Each
`submit` call goes to the ESP group (replica) with the most KV headroom for its prompt
(app/saturation.py: rank_groups), from the load every replica reports through
`record_routing_stats` (every `request_routing_stats_period_s`), unless a group was sent
most of the prompt's prefix before and has room for the rest: then that group, whose
prefix cache probably holds it (app/affinity.py). A call with a `Pin` argument
(`subscribe`, `cancel`) goes to the replica it names: the one its requests were submitted
to; if that replica is gone, the call goes anywhere and the controller refuses it (a
subscription to a gone replica fails, so its requests fail clearly). Other calls (status,
model_info, health) go to the emptiest group.

The router remembers the block hashes of each prompt it routed, per replica (when Serve
confirms the replica took the request: `on_request_routed`), and forgets a replica when
it leaves the candidate set. Each ingress replica has its own router and so its own
record.

Known limit: the stats are periodic, so a burst between two reports goes to the same
group; Serve then still respects max_ongoing_requests and tries the next rank.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from esp_serve.app.affinity import AffinityPolicy, RoutedPrefixes, rank_with_affinity
from esp_serve.app.config import AppConfig
from esp_serve.app.protocol import Pin
from esp_serve.app.saturation import GroupLoad, rank_groups

ROUTER_PATH = "esp_serve.app.routing:HeadroomRequestRouter"


def router_kwargs(cfg: AppConfig) -> dict[str, Any]:
    """The router's settings (Serve passes them to `initialize_state`), from the config."""
    g = cfg.groups
    return {
        "prefix_affinity": bool(g.prefix_affinity and cfg.prefix_cache.enabled),
        "block_tokens": cfg.prefix_cache.block_tokens,
        "min_match": g.affinity_min_match,
        "max_imbalance": g.affinity_max_imbalance,
        "max_blocks_per_group": g.affinity_max_blocks_per_group,
    }


def _generate_request(pending: PendingRequest | None) -> Any:
    """The GenerateRequest of a pending `submit` call (None for other calls)."""
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if getattr(arg, "prompt_token_ids", None) is not None:
            return arg
    return None


def pin_of(pending: PendingRequest | None) -> str | None:
    """The replica id a pending call is pinned to (None: not pinned)."""
    if pending is None:
        return None
    for arg in (*pending.args, *pending.kwargs.values()):
        if isinstance(arg, Pin):
            return arg.replica_id
    return None


def prompt_tokens_of(pending: PendingRequest | None) -> int:
    """The prompt length of a pending `submit(GenerateRequest)` call (0 otherwise)."""
    req = _generate_request(pending)
    return 0 if req is None else len(req.prompt_token_ids)


def block_hashes_of(pending: PendingRequest | None) -> tuple[int, ...]:
    """The prompt's block hash chain, as the ingress computed it (() otherwise)."""
    req = _generate_request(pending)
    return tuple(getattr(req, "block_hashes", ()) or ())


def rank_replicas(candidates: list[Any], prompt_tokens: int) -> list[list[Any]]:
    """Candidates (anything with `routing_stats`) ranked by headroom for the prompt."""
    by_index = {i: GroupLoad.from_stats(getattr(r, "routing_stats", None)) for i, r in enumerate(candidates)}
    return [[candidates[i] for i in rank] for rank in rank_groups(by_index, prompt_tokens)]


class HeadroomRequestRouter(FIFOMixin, RequestRouter):
    """FIFOMixin: the base class hands a chosen replica only to the pending request with
    the same internal request id, and the `n` choices of one HTTP request share that id;
    without the FIFO fallback all but one of them would never be routed (found by
    tests/app's n=2 test)."""

    prefix_affinity = False  # until initialize_state reads the config
    affinity = AffinityPolicy()
    routed: RoutedPrefixes[Any] = RoutedPrefixes(AffinityPolicy.max_blocks_per_group)

    def initialize_state(
        self,
        prefix_affinity: bool = False,
        block_tokens: int = 64,
        min_match: float = 0.5,
        max_imbalance: float = 0.5,
        max_blocks_per_group: int = 32768,
        **_: Any,
    ) -> None:
        self.prefix_affinity = prefix_affinity
        self.affinity = AffinityPolicy(block_tokens, min_match, max_imbalance, max_blocks_per_group)
        self.routed: RoutedPrefixes[Any] = RoutedPrefixes(max_blocks_per_group)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        pinned = pin_of(pending_request)
        if pinned is not None:
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == pinned]
            if chosen:
                return [chosen]
        prompt_tokens = prompt_tokens_of(pending_request)
        hashes = block_hashes_of(pending_request) if self.prefix_affinity else ()
        if not hashes:
            return rank_replicas(candidate_replicas, prompt_tokens)
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {rid: GroupLoad.from_stats(getattr(r, "routing_stats", None)) for rid, r in by_id.items()}
        ranks = rank_with_affinity(loads, prompt_tokens, hashes, self.routed, self.affinity)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        """The replica took the request: remember its prompt's blocks there."""
        hashes = block_hashes_of(pending_request) if self.prefix_affinity else ()
        if not hashes:
            return
        replica = self._replicas.get(replica_id)
        load = GroupLoad.from_stats(getattr(replica, "routing_stats", None))
        capacity = load.kv_total // self.affinity.block_tokens if load is not None else None
        self.routed.record(replica_id, hashes, capacity)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's new set of running replicas: forget the ones that left."""
        super().update_replicas(replicas)
        self.routed.keep_only(r.replica_id for r in replicas)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self.routed.forget(replica_id)
