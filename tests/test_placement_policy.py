"""The placement policy: instances packed onto the fewest nodes, rings that cross the
network the fewest times, and the cost model told which pairs cross nodes."""

from __future__ import annotations

import itertools

import pytest

from esp_core.sched.cost_model import CostModel
from esp_core.sched.placement import (
    crossing_pairs,
    instance_bundle,
    order_ring,
    pack,
    ring_crossings,
    ring_order,
    spans_nodes,
)
from esp_serve.app.config import AppConfig
from tests.support.rings import scheduled_rings


def test_bundle_holds_all_tp_ranks():
    assert instance_bundle({"GPU": 1, "CPU": 2}, 4) == {"GPU": 4, "CPU": 8}
    cfg = AppConfig.model_validate({"cluster": {"num_instances": 3}})
    bundles = cfg.placement_group_bundles()
    assert len(bundles) == 4 and bundles[1:] == [instance_bundle(cfg.cluster.instance_resources, 1)] * 3


def test_pack_uses_fewest_nodes_largest_first():
    nodes = {"a": {"GPU": 2}, "b": {"GPU": 8}, "c": {"GPU": 4}, "d": {"GPU": 1}}
    # 4 instances of TP 2: node b alone fits them
    assert pack(nodes, 4, {"GPU": 2}) == ["b"] * 4
    # 6 instances of TP 2: b (4) then c (2); a and d stay empty
    assert pack(nodes, 6, {"GPU": 2}) == ["b"] * 4 + ["c"] * 2
    assert pack(nodes, 8, {"GPU": 2}) is None  # 4 + 2 + 1 = 7 fit at most
    assert pack({"x": {"GPU": 8, "CPU": 1}}, 2, {"GPU": 1, "CPU": 1}) is None  # the CPU limits
    assert pack({"x": {"GPU": 8, "CPU": 1}}, 1, {"GPU": 1, "CPU": 1}) == ["x"]


def test_pack_is_minimal_by_brute_force():
    nodes = {"a": {"GPU": 3}, "b": {"GPU": 5}, "c": {"GPU": 4}, "d": {"GPU": 6}}
    for tp, n in itertools.product((1, 2, 3), range(1, 7)):
        got = pack(nodes, n, {"GPU": tp})
        fits = {k: v["GPU"] // tp for k, v in nodes.items()}
        best = min(
            (
                len(s)
                for r in range(1, 5)
                for s in itertools.combinations(fits, r)
                if sum(fits[k] for k in s) >= n
            ),
            default=None,
        )
        assert (got is None) == (best is None)
        if got is not None:
            assert len(set(got)) == best and all(got.count(k) <= fits[k] for k in set(got))


def test_ring_order_crosses_once_per_node():
    node_of = ("n1", "n2", "n1", "n3", "n2", "n1")
    ring = ring_order(node_of)
    assert ring == (0, 2, 5, 1, 4, 3)
    assert ring_crossings(ring, node_of) == 3
    assert ring_crossings(tuple(range(6)), node_of) == 5  # the naive order: all but 5 -> 0
    assert ring_crossings(ring_order(("n1",) * 4), ("n1",) * 4) == 0
    assert order_ring((4, 3, 0), node_of) == (0, 4, 3)
    assert crossing_pairs(("a", "a", "b")) == {(0, 2), (1, 2)}
    assert spans_nodes((0, 2), node_of) is False and spans_nodes((0, 1), node_of) is True


def test_cost_model_charges_network_only_across_nodes():
    cm = CostModel.analytical()
    same = cm.prefill_time(2, 8192, 8192**2, cross_node=False)
    cross = cm.prefill_time(2, 8192, 8192**2, cross_node=True)
    assert cross > same
    cm.set_placement(("a", "a", "b", "b"))
    assert not cm.crosses_nodes((0, 1)) and cm.crosses_nodes((1, 2))
    # the best ring of 2 stays on one node, of 3 must cross
    assert cm.prefill_time(2, 8192, 8192**2) == same
    assert cm.prefill_time(3, 8192, 8192**2) == cm.prefill_time(3, 8192, 8192**2, cross_node=True)


def test_tensor_parallel_size_key():
    cfg = AppConfig.model_validate({})
    assert cfg.cluster.tensor_parallel_size == 1 and cfg.cluster_spec().tp_per_instance == 1
    cfg = AppConfig.model_validate({"cluster": {"tensor_parallel_size": 2}})
    assert cfg.cluster_spec().tp_per_instance == 2


def test_instances_may_share_a_gpu_over_gloo_only():
    shared = {"device": "cuda", "instance_resources": {"GPU": 0.5, "CPU": 1}}
    cfg = AppConfig.model_validate({"cluster": dict(shared, comm_backend="gloo")})
    assert cfg.cluster.instance_resources["GPU"] == 0.5
    with pytest.raises(ValueError, match="NCCL refuses two ranks on one GPU|set comm_backend: gloo"):
        AppConfig.model_validate({"cluster": dict(shared, comm_backend="nccl")})


def test_scheduler_rings_cross_nodes_the_fewest_times():
    """Instance ids interleaved over nodes (as Ray may number the bundles): every ring the
    scheduler plans visits the instances of one node consecutively."""
    node_of = ("a", "b", "a", "c", "b", "a", "c", "b")
    rings = scheduled_rings(node_of)
    spanning = [r for r in rings if len({node_of[i] for i in r}) > 1]
    assert spanning, rings  # the prompts need rings across nodes
    for ring in rings:
        nodes = len({node_of[i] for i in ring})
        assert ring_crossings(ring, node_of) == (nodes if nodes > 1 else 0), (ring, node_of)
