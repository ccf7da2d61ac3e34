"""Serve autoscaling of the controller deployment by whole ESP groups.

Each controller replica (one ESP group) reports `esp_saturation` (app/saturation.py:
KV in use plus queued prompt tokens, over the group's KV) through Serve's custom metrics
hook, `record_autoscaling_stats`. `ESPGroupPolicy` is the deployment's autoscaling
policy (`autoscaling_config.policy.policy_function`, a class instantiated once with
`policy_kwargs`): it asks for as many groups as the summed demand needs at
`target_saturation` per group, within [min_replicas, max_replicas]. Serve applies its
upscale/downscale delays on top of the returned number.
"""

from __future__ import annotations

from typing import Any

from esp_serve.app.saturation import SATURATION_METRIC, desired_groups

POLICY_PATH = "esp_serve.app.autoscaling:ESPGroupPolicy"


class ESPGroupPolicy:
    def __init__(self, target_saturation: float = 0.7) -> None:
        if not target_saturation > 0:
            raise ValueError("target_saturation must be > 0")
        self.target = float(target_saturation)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """`ctx`: Serve's AutoscalingContext. aggregated_metrics[name][replica] is the
        metric averaged over the look-back window (aggregation_function)."""
        per_replica = (ctx.aggregated_metrics or {}).get(SATURATION_METRIC, {}) or {}
        running = set(ctx.running_replicas)
        saturations = [float(v) for r, v in per_replica.items() if r in running]
        want = desired_groups(
            saturations,
            ctx.current_num_replicas,
            self.target,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
        )
        return want, dict(ctx.policy_state or {}, last_saturations=saturations)
