"""One persistent 4-rank gloo group for every multi-process ESP test of the session
(spawning torch processes costs ~2.5 s each). Tests with P < 4 use instances 0..P-1; the
other ranks take no part in the batch, exactly as idle instances in a real plan."""

import pytest

from tests.support.dist import DistGroup

WORLD = 4


@pytest.fixture(scope="session")
def dist_group():
    group = DistGroup(WORLD, backend="gloo", timeout_s=20.0, threads_per_rank=1)
    try:
        yield group
    finally:
        group.close()
