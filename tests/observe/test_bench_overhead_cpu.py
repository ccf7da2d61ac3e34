"""bench_overhead's CPU accounting between two /proc snapshots: processes that start or
exit during a load point (HAProxy replaces its process on every reload) are counted
without going negative."""

import os
import subprocess
import sys
import time

from esp_serve.app.bench_overhead import cpu_delta_by_tier, cpu_seconds


def test_a_process_in_both_snapshots_counts_its_difference_a_new_one_all_of_its_cpu():
    before = {1: ("haproxy", 5.0), 2: ("instances", 1.0)}
    after = {2: ("instances", 3.5), 3: ("haproxy", 0.25)}  # haproxy 1 replaced by 3
    cpu, exited = cpu_delta_by_tier(before, after)
    assert cpu["instances"] == 2.5
    assert cpu["haproxy"] == 0.25  # not 0.25 - 5.0
    assert cpu["controller"] == 0.0
    assert exited == {"haproxy": 1}


def test_cpu_seconds_reads_a_live_process_and_zero_for_a_gone_one():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 20
        while cpu_seconds(child.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu_seconds(child.pid) >= 0.3
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == 0.0
    assert cpu_seconds(os.getpid()) > 0.0
