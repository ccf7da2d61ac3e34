"""Where the instances of one ESP group go, and in which order they form a ring (pure).

* The TP ranks of one instance are one placement-group bundle (`instance_bundle`): a bundle
  never spans nodes, so an instance's all-reduces stay on one node's NVLink.
* The instances of a group go onto as few nodes as possible (`pack`): all instances need
  the same amount, so taking the nodes that fit the most instances first is optimal.
* Ring order (`ring_order`): the instances of one node are consecutive, so a ring over
  the whole group crosses the network once per node it enters (the fewest possible);
  `crossing_pairs` tells the cost model which instance pairs talk across nodes.

Nothing here imports ray or torch: `app/` turns this into Ray placement-group arguments
and reads back where Ray put each bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Node = str


def instance_bundle(instance_resources: Mapping[str, float], tp_size: int) -> dict[str, float]:
    """The resources of one instance: `tp_size` ranks of `instance_resources` each, in one
    bundle (so all its ranks are on one node)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    return {name: amount * tp_size for name, amount in instance_resources.items()}


def instances_fitting(available: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many bundles fit into one node's `available` resources."""
    counts = [int(available.get(name, 0.0) // amount) for name, amount in bundle.items() if amount > 0]
    return min(counts) if counts else 0


def pack(
    nodes: Mapping[Node, Mapping[str, float]], num_instances: int, bundle: Mapping[str, float]
) -> list[Node] | None:
    """The node of each instance (instance i -> result[i]) on the fewest nodes, or None if
    the group does not fit. Nodes that fit more instances are used first (ties: by name),
    and instances fill a node before the next one, so instance ids are node-contiguous."""
    fits = sorted(((instances_fitting(av, bundle), node) for node, av in nodes.items()), key=_most_first)
    out: list[Node] = []
    for count, node in fits:
        take = min(count, num_instances - len(out))
        out += [node] * take
        if len(out) == num_instances:
            return out
    return None


def _most_first(item: tuple[int, Node]) -> tuple[int, Node]:
    return -item[0], item[1]


def ring_order(node_of: Sequence[Node]) -> tuple[int, ...]:
    """Instances ordered so that those on one node are consecutive (nodes in order of first
    appearance, instances by id within a node)."""
    first_seen: dict[Node, int] = {}
    for i, node in enumerate(node_of):
        first_seen.setdefault(node, i)
    return tuple(sorted(range(len(node_of)), key=lambda i: (first_seen[node_of[i]], i)))


def ring_crossings(ring: Sequence[int], node_of: Sequence[Node]) -> int:
    """Hops of the ring (last -> first included) between instances on different nodes."""
    if len(ring) < 2:
        return 0
    return sum(node_of[a] != node_of[b] for a, b in zip(ring, (*ring[1:], ring[0])))


def crossing_pairs(node_of: Sequence[Node]) -> frozenset[tuple[int, int]]:
    """Every instance pair (i < j) on different nodes: their transfers use the network."""
    n = len(node_of)
    return frozenset((i, j) for i in range(n) for j in range(i + 1, n) if node_of[i] != node_of[j])


def order_ring(instances: Sequence[int], node_of: Sequence[Node]) -> tuple[int, ...]:
    """A ring over a subset of instances with the fewest network hops (node-contiguous)."""
    rank = {inst: k for k, inst in enumerate(ring_order(node_of))}
    return tuple(sorted(instances, key=rank.__getitem__))


def group_by_node(instances: Sequence[int], node_of: Sequence[Node] | None) -> tuple[int, ...]:
    """`instances` with those of one node made consecutive (nodes in `ring_order`'s order),
    keeping their given order within a node: a ring over the result, or over any
    contiguous run of it, crosses the network once per node it enters. Unchanged without
    a placement (None)."""
    if node_of is None:
        return tuple(instances)
    first_seen: dict[Node, int] = {}
    for i, node in enumerate(node_of):
        first_seen.setdefault(node, i)
    return tuple(sorted(instances, key=lambda i: first_seen[node_of[i]]))  # stable


def spans_nodes(instances: Sequence[int], node_of: Sequence[Node]) -> bool:
    """Whether a batch on these instances has a pair talking across nodes."""
    return len({node_of[i] for i in instances}) > 1
