"""App configs for live tests that run small groups of the built-in model next to the
session's other apps: tiny CPU shares (Ray has 2 CPUs here and the session's apps hold
most of them), no API keys, one ingress replica, no calibration."""

from __future__ import annotations

from typing import Any


def tiny_group_config(
    model: str,
    kv_slots: int,
    *,
    policy: str = "esp",
    request_timeout_s: float = 120,
    num_instances: int = 1,
    groups: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An app config whose groups each hold `num_instances` instances of `kv_slots` slots."""
    return {
        "model": {"path": "builtin", "served_name": model, "max_model_len": kv_slots},
        "cluster": {
            "num_instances": num_instances,
            "instance_resources": {"CPU": 0.01},
            "controller_resources": {"CPU": 0.01},
            "kv_slots_per_instance": kv_slots,
            "num_threads_per_instance": 1,
        },
        "scheduler": {"policy": policy, "calibration_interval_s": None},
        "server": {
            "api_keys_env": None,
            "ingress_max_replicas": 1,
            "ingress_num_cpus": 0.01,
            "request_timeout_s": request_timeout_s,
        },
        "groups": dict(groups or {}),
    }
