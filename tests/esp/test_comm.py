"""P2P layer: ring shift, all-to-some exchange, variable sizes, self-messages, failure
fast-path. Each rank fills tensors from (sender, receiver) so payloads are checkable."""

import pytest
import torch

from esp_core.runtime.comm import P2PComm, RankLayout
from tests.support.dist import DistGroup, RankFailed

pytestmark = pytest.mark.slow


def _payload(src: int, dst: int, n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) + 100 * src + 10 * dst


def _ring_shift(ctx, ring):
    comm = P2PComm.from_world(timeout_s=10)
    if comm.instance not in ring:
        return None
    r = ring.index(comm.instance)
    nxt, prv = ring[(r + 1) % len(ring)], ring[(r - 1) % len(ring)]
    # sizes differ per sender: sender i sends i + 2 elements
    send = _payload(comm.instance, nxt, comm.instance + 2)
    recv = torch.empty(prv + 2)
    comm.ring_shift(ring, send, recv).wait()
    return recv.tolist(), _payload(prv, comm.instance, prv + 2).tolist()


@pytest.mark.parametrize("ring", [(0,), (0, 1), (2, 0, 1), (3, 1, 0, 2)])
def test_ring_shift(dist_group, ring):
    for out in dist_group.run(_ring_shift, ring):
        if out is not None:
            assert out[0] == out[1]


def _all_to_some(ctx, links):
    """links: list of (src, dst, n) messages; every rank sends its own and receives its own."""
    comm = P2PComm.from_world(timeout_s=10)
    me = comm.instance
    sends = [(d, _payload(s, d, n)) for s, d, n in links if s == me]
    recvs = [(s, torch.empty(n)) for s, d, n in links if d == me]
    comm.exchange(sends, recvs)
    return [(s, buf.tolist() == _payload(s, me, buf.numel()).tolist()) for s, buf in recvs]


def test_all_to_some_with_self_and_empty_messages(dist_group):
    links = [(0, 1, 5), (0, 2, 3), (1, 0, 4), (2, 2, 6), (3, 0, 0), (3, 1, 7), (1, 3, 2)]
    for checks in dist_group.run(_all_to_some, links):
        assert all(ok for _, ok in checks)


def test_rank_layout_keeps_tp_ranks_paired():
    layout = RankLayout(num_instances=3, tp_size=2)
    assert layout.world_size == 6
    assert [layout.global_rank(i, 1) for i in range(3)] == [1, 3, 5]
    assert layout.instance_of(5) == (2, 1)
    with pytest.raises(ValueError):
        layout.global_rank(3, 0)


def _fail_on_rank_1(ctx):
    comm = P2PComm.from_world(timeout_s=10)
    if comm.instance == 1:
        raise ValueError("boom on purpose")
    if comm.instance == 0:  # would wait for rank 1 forever without the fast path
        comm.exchange([], [(1, torch.empty(4))])
    return True


def test_failing_rank_fails_fast():
    # Its own 2-rank group: a failure tears the group down, and the shared 4-rank group
    # of the session should not pay a respawn for it.
    with DistGroup(2, timeout_s=10) as group:
        with pytest.raises(RankFailed, match="boom on purpose"):
            group.run(_fail_on_rank_1, timeout_s=15)
        out = group.run(_ring_shift, (0, 1))  # the group restarts lazily
        assert out[0][0] == out[0][1] and out[1][0] == out[1][1]
