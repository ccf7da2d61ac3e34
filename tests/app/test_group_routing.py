"""Group-level routing and autoscaling choices (app/saturation.py, app/routing.py,
app/autoscaling.py), against Serve's own types where they are cheap to build."""

from __future__ import annotations

import asyncio
import math

import pytest

from esp_serve.app.saturation import SATURATION_METRIC, GroupLoad, desired_groups, rank_groups


def load(used: int, queued: int = 0, total: int = 1000, waiting: int = 0) -> GroupLoad:
    return GroupLoad(used, total, queued, waiting=waiting)


def test_saturation_and_headroom():
    g = load(300, queued=200)
    assert g.saturation == pytest.approx(0.5)
    assert g.headroom(100) == 400
    assert GroupLoad(0, 0, 0).saturation == math.inf
    stats = g.to_stats()
    assert stats[SATURATION_METRIC] == pytest.approx(0.5)
    assert all(isinstance(v, float) for v in stats.values())
    assert GroupLoad.from_stats(stats) == g
    assert GroupLoad.from_stats({}) is None and GroupLoad.from_stats({"x": 1}) is None


def test_rank_prefers_most_headroom_then_unknown_then_too_full():
    loads = {
        "busy": load(900),
        "empty": load(0),
        "half": load(400, queued=100),
        "new": None,
        "queued": load(100, queued=850),
    }
    # a 200-token prompt fits empty (800 left) and half (300 left); not busy / queued
    assert rank_groups(loads, 200) == [["empty"], ["half"], ["new"], ["busy"], ["queued"]]
    # ties on headroom: fewer waiting requests first
    tie = {"a": load(100, waiting=3), "b": load(100, waiting=1)}
    assert rank_groups(tie, 10) == [["b"], ["a"]]


def test_desired_groups_follows_kv_demand():
    assert desired_groups([0.9, 0.9], 2, 0.7, 1, 8) == 3  # 1.8 groups of demand / 0.7
    assert desired_groups([0.1, 0.0, 0.05], 3, 0.7, 1, 8) == 1
    assert desired_groups([3.0], 1, 0.5, 1, 4) == 4  # capped at max
    assert desired_groups([], 2, 0.7, 1, 4) == 2  # no report: keep
    assert desired_groups([0.0], 2, 0.7, 2, 4) == 2  # floor at min


class _Replica:
    def __init__(self, name: str, stats: dict | None) -> None:
        from ray.serve._private.common import DeploymentID, ReplicaID

        self.name, self.routing_stats = name, stats
        self.replica_id = ReplicaID(name, DeploymentID("ESPController", "app"))


def test_router_ranks_serve_candidates_by_headroom_for_the_prompt():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from esp_core.sched.plan import SamplingParams
    from esp_serve.app.protocol import GenerateRequest
    from esp_serve.app.routing import HeadroomRequestRouter, prompt_tokens_of

    router = HeadroomRequestRouter(DeploymentID("ESPController", "app"), DeploymentHandleSource.UNKNOWN)
    small = _Replica("small", GroupLoad(0, 600, 0).to_stats())  # empty but small
    big = _Replica("big", GroupLoad(500, 4000, 0).to_stats())  # busier, more left
    fresh = _Replica("fresh", None)
    req = GenerateRequest("r", tuple(range(700)), SamplingParams())

    async def choose(prompt: GenerateRequest | None):  # PendingRequest needs a running loop
        meta = RequestMetadata("r", "r", call_method="submit")
        pending = PendingRequest(args=[prompt] if prompt else [], kwargs={}, metadata=meta)
        if prompt is not None:
            assert prompt_tokens_of(pending) == 700
        return await router.choose_replicas([small, big, fresh], pending if prompt else None)

    ranks = asyncio.run(choose(req))
    assert [[r.name for r in rank] for rank in ranks] == [["big"], ["fresh"], ["small"]]
    # calls without a prompt (status, health) go to the most headroom too
    assert [r.name for r in asyncio.run(choose(None))[0]] == ["big"]


def test_pinned_calls_go_to_their_replica_even_when_it_is_the_busiest():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    from esp_serve.app.protocol import Pin
    from esp_serve.app.routing import HeadroomRequestRouter

    router = HeadroomRequestRouter(DeploymentID("ESPController", "app"), DeploymentHandleSource.UNKNOWN)
    busy = _Replica("busy", GroupLoad(900, 1000, 0).to_stats())
    idle = _Replica("idle", GroupLoad(0, 1000, 0).to_stats())

    def pinned(to: str) -> PendingRequest:
        meta = RequestMetadata("s", "s", call_method="subscribe")
        return PendingRequest(args=[Pin(to), "ingress"], kwargs={}, metadata=meta)

    async def choose(to: str) -> list[list[str]]:  # PendingRequest needs a running loop
        ranks = await router.choose_replicas([idle, busy], pinned(to))
        return [[r.name for r in rank] for rank in ranks]

    assert asyncio.run(choose("busy")) == [["busy"]]
    # the pinned replica is gone: ranked as usual (the controller refuses the call)
    assert asyncio.run(choose("gone"))[0] == ["idle"]


def test_policy_asks_for_groups_from_reported_saturation():
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from esp_serve.app.autoscaling import ESPGroupPolicy

    dep = DeploymentID("ESPController", "app")
    r1, r2, gone = (ReplicaID(x, dep) for x in ("r1", "r2", "gone"))

    def ctx(sats: dict, current: int) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=dep,
            deployment_name="ESPController",
            app_name="app",
            current_num_replicas=current,
            target_num_replicas=current,
            running_replicas=[r1, r2][:current],
            total_num_requests=0.0,
            total_queued_requests=0.0,
            aggregated_metrics={SATURATION_METRIC: sats},
            raw_metrics={},
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=4,
            policy_state={},
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=0.0,
            config=AutoscalingConfig(min_replicas=1, max_replicas=4),
        )

    policy = ESPGroupPolicy(target_saturation=0.5)
    # two groups at 0.9 and 0.6 of KV demand: 1.5 groups of work / 0.5 -> 3 groups
    assert policy(ctx({r1: 0.9, r2: 0.6, gone: 5.0}, 2))[0] == 3
    assert policy(ctx({r1: 0.1, r2: 0.0}, 2))[0] == 1
    assert policy(ctx({r1: 9.0}, 1))[0] == 4
    assert policy(ctx({}, 2))[0] == 2
    with pytest.raises(ValueError):
        ESPGroupPolicy(0)
