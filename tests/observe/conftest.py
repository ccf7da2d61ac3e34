"""Fixtures of tests/observe: one Ray cluster for the metrics (and Serve) tests, a free
port helper, and a reader of Ray's Prometheus endpoint."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest

REPORT_INTERVAL_MS = 500  # Ray's default is 10 s; a short one keeps the tests quick


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster and its metrics endpoint URL. Reuses a cluster another test area
    started (then export runs at Ray's default 10 s interval). Module-scoped and shut
    down after the module, so it never outlives the tests that need it."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        ray.init(
            # a cluster of the test's own, never one a `ray start` or `serve run` left running
            address="local",
            num_cpus=1,
            include_dashboard=False,
            _metrics_export_port=free_port(),
            _system_config={"metrics_report_interval_ms": REPORT_INTERVAL_MS},
            log_to_driver=False,
        )
        started = True
    port = ray.nodes()[0]["MetricsExportPort"]
    yield f"http://127.0.0.1:{port}/metrics"
    if started:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def wait_for_metrics(url: str, predicate, timeout_s: float = 40.0):
    """Poll the endpoint until predicate(parsed samples) is true; export is periodic."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    samples = []
    while time.monotonic() < deadline:
        try:
            text = scrape(url)
        except OSError:
            time.sleep(0.5)
            continue
        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        if predicate(samples):
            return samples
        time.sleep(0.5)
    raise AssertionError(
        f"metrics not seen within {timeout_s}s; got {sorted({s.name for s in samples if 'esp' in s.name})}"
    )
