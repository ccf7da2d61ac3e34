"""Where Ray put an ESP group's bundles, and what the placement policy makes of it.

The group's placement group (bundle 0 = controller, bundles 1..N = instances, each holding
all TP ranks of its instance) is asked for with the PACK strategy, so Ray puts the
instances on as few nodes as it can; `group_topology` reads the node of every instance
bundle back and derives the ring order with the fewest network hops and the instance
pairs that cross nodes (for the cost model), with the pure policy of
esp_core/sched/placement.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from esp_core.sched.placement import crossing_pairs, ring_crossings, ring_order


@dataclass(frozen=True)
class GroupTopology:
    node_of: tuple[str, ...]  # node id of each instance
    ring: tuple[int, ...]  # instance order of a whole-group ring
    cross_pairs: frozenset[tuple[int, int]]  # instance pairs on different nodes

    @property
    def ring_crossings(self) -> int:
        return ring_crossings(self.ring, self.node_of)


def instance_nodes(placement_group) -> tuple[str, ...]:
    """Node id of each instance bundle (bundles 1..N) of a ready placement group."""
    from ray.util import placement_group_table

    by_bundle = placement_group_table(placement_group)["bundles_to_node_id"]
    return tuple(by_bundle[b] for b in range(1, len(by_bundle)))


def group_topology(placement_group) -> GroupTopology:
    node_of = instance_nodes(placement_group)
    return GroupTopology(node_of, ring_order(node_of), crossing_pairs(node_of))
