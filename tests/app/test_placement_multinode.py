"""Placement across nodes on Ray's multi-node simulation: three nodes with different
amounts of a custom accelerator resource; the group's placement group (PACK, one bundle
per instance holding all its TP ranks) lands where the policy says, the ring read back
from Ray crosses the network once per node, and so does every ring the scheduler plans
on that placement.

The simulated cluster lives in a child process: the test session may already hold a Ray
of its own (the Serve apps of the other tests), and one process joins one Ray cluster."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter

import pytest

from esp_core.sched.placement import instance_bundle, pack, ring_crossings
from tests.support.rings import scheduled_rings

pytestmark = pytest.mark.slow

ACCEL = "esp_accel"
NODES = (2, 4, 1)  # units of ACCEL on the head node and the two others
CASES = ((3, 2), (7, 1))  # (instances, TP degree)


def _scenarios(out) -> None:
    """In a fresh process: the simulated cluster, one placement group per case."""
    try:
        import ray
        from ray.cluster_utils import Cluster
        from ray.util import placement_group, remove_placement_group

        from esp_serve.app.placement import group_topology

        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {ACCEL: NODES[0]}})
        for units in NODES[1:]:
            c.add_node(num_cpus=1, resources={ACCEL: units})
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        c.wait_for_nodes()
        results = {}
        for n, tp in CASES:
            nodes = {x["NodeID"]: x["Resources"] for x in ray.nodes() if x["Alive"]}
            bundle = instance_bundle({ACCEL: 1, "CPU": 0.1}, tp)
            pg = placement_group([{"CPU": 0.1}] + [bundle] * n, strategy="PACK")
            ready = pg.wait(60)
            topo = group_topology(pg) if ready else None
            results[(n, tp)] = dict(
                policy=pack(nodes, n, bundle),
                ready=ready,
                node_of=topo and topo.node_of,
                ring_crossings=topo and topo.ring_crossings,
                cross_pairs=topo and sorted(topo.cross_pairs),
            )
            remove_placement_group(pg)
        ray.shutdown()
        c.shutdown()
        out.put(("ok", results))
    except Exception as e:  # reported, never a hang
        import traceback

        out.put(("error", f"{e!r}\n{traceback.format_exc()}"))


@pytest.fixture(scope="module")
def placements():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_scenarios, args=(out,))
    proc.start()
    try:
        status, payload = out.get(timeout=240)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", payload
    return payload


@pytest.mark.parametrize("num_instances, tp", CASES)
def test_group_lands_where_the_policy_says(placements, num_instances, tp):
    got = placements[(num_instances, tp)]
    assert got["ready"] and got["policy"] is not None
    # the same nodes, each with the same number of instances (ids may be permuted)
    assert Counter(got["node_of"]) == Counter(got["policy"]), got
    used = len(set(got["policy"]))
    assert used == {(3, 2): 2, (7, 1): 3}[(num_instances, tp)]  # 4+2 units; 4+2+1 units
    assert got["ring_crossings"] == used
    node_of = got["node_of"]
    assert all(node_of[i] != node_of[j] for i, j in got["cross_pairs"])
    assert len(got["cross_pairs"]) == sum(
        a * b
        for i, a in enumerate(Counter(node_of).values())
        for b in list(Counter(node_of).values())[i + 1 :]
    )


@pytest.mark.parametrize("num_instances, tp", CASES)
def test_scheduler_rings_cross_once_per_node(placements, num_instances, tp):
    node_of = placements[(num_instances, tp)]["node_of"]
    # the longest prompts (41K tokens) need more instances than one node holds
    rings = scheduled_rings(node_of, slots=45_000 // num_instances)
    assert any(len({node_of[i] for i in r}) > 1 for r in rings), rings
    for ring in rings:
        nodes = len({node_of[i] for i in ring})
        assert ring_crossings(ring, node_of) == (nodes if nodes > 1 else 0), (ring, node_of)
