"""Placement across nodes on Ray's multi-node simulation: three nodes with different
amounts of a custom accelerator resource; the group's placement group (PACK, one bundle
per instance holding all its TP ranks) lands where the policy says, and the ring read back
from Ray crosses the network once per node."""

from __future__ import annotations

from collections import Counter

import pytest

from esp_core.sched.placement import instance_bundle, pack

pytestmark = pytest.mark.slow

ACCEL = "esp_accel"


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {ACCEL: 2}})
    c.add_node(num_cpus=1, resources={ACCEL: 4})
    c.add_node(num_cpus=1, resources={ACCEL: 1})
    ray.init(address=c.address)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def nodes_available():
    import ray

    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


@pytest.mark.parametrize("num_instances, tp", [(3, 2), (7, 1)])
def test_group_lands_where_the_policy_says(cluster, num_instances, tp):
    from ray.util import placement_group, remove_placement_group

    from esp_serve.app.placement import group_topology

    bundle = instance_bundle({ACCEL: 1, "CPU": 0.1}, tp)
    want = pack(nodes_available(), num_instances, bundle)
    assert want is not None
    pg = placement_group([{"CPU": 0.1}] + [bundle] * num_instances, strategy="PACK")
    try:
        assert pg.wait(60), "placement group not ready"
        topo = group_topology(pg)
        # the same nodes, each with the same number of instances (ids may be permuted)
        assert Counter(topo.node_of) == Counter(want), (topo.node_of, want)
        used = len(set(want))
        assert used == (2 if (num_instances, tp) == (3, 2) else 3)
        assert topo.ring_crossings == used
        assert all(topo.node_of[i] != topo.node_of[j] for i, j in topo.cross_pairs)
    finally:
        remove_placement_group(pg)
