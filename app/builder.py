"""`build_app(args)`: the application builder named by serve_config.yaml's `import_path`.

It validates `args` once with AppConfig (an invalid config fails `serve run` with a
message naming the key) and wires the deployments:

    OpenAIIngress (autoscaled, CPU)  --DeploymentHandle-->  ESPController (1 replica = 1
    ESP group; placement group: bundle 0 = controller, bundles 1..N = instances)

The controller deployment routes each request to the group with the most KV headroom
(app/routing.py) and, with `groups.max_groups > 1`, autoscales by whole groups on their
KV demand (app/autoscaling.py).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from esp_serve.app.autoscaling import POLICY_PATH
from esp_serve.app.config import AppConfig, load_config
from esp_serve.app.controller import ESPController
from esp_serve.app.ingress import OpenAIIngress
from esp_serve.app.routing import ROUTER_PATH, router_kwargs

CONTROLLER_START_RETRIES = 3

# Serve runs a replica's user code, and the handle router of its outgoing calls, each on
# an event loop thread of its own by default: every stream item (a controller -> ingress
# subscription item, an ingress -> proxy body part) then crosses threads, a wake-up and a
# future copied across loops per item. On one loop (what Serve's throughput-optimized
# mode sets) that hop goes away; the user code of both deployments never blocks its loop
# (tokenization and templates run in worker threads, instance calls are awaited).
SAME_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


def controller_options(cfg: AppConfig) -> dict[str, Any]:
    bundle0 = dict(cfg.cluster.controller_resources)
    num_cpus = bundle0.pop("CPU", 0.0)
    num_gpus = bundle0.pop("GPU", 0.0)
    # A burst of submits (and one subscription per ingress replica, for its whole life)
    # must not queue behind Serve's default of 5 ongoing calls; the controller bounds its
    # own queue instead (scheduler.max_waiting_requests).
    max_running = cfg.cluster.num_instances * cfg.scheduler.max_running_per_instance
    g = cfg.groups
    options: dict[str, Any] = dict(
        name="ESPController",
        placement_group_bundles=cfg.placement_group_bundles(),
        placement_group_strategy=cfg.cluster.placement_strategy,
        ray_actor_options={
            "num_cpus": num_cpus,
            "num_gpus": num_gpus,
            "resources": bundle0,
            "runtime_env": {"env_vars": SAME_LOOP_ENV},
        },
        max_ongoing_requests=cfg.scheduler.max_waiting_requests + max_running + 64,
        health_check_period_s=g.health_check_period_s,
        health_check_timeout_s=g.health_check_timeout_s,
        # Serve waits this long for in-flight streams before stopping a replica; then
        # the controller's __del__ ends the rest with a clear error
        graceful_shutdown_timeout_s=g.graceful_shutdown_timeout_s,
        # a group that cannot start (an instance refusing its memory budget on a GPU it
        # measured, a checkpoint that does not load) fails the deployment after a few
        # tries with its message, instead of Serve's 20 rounds of loading every instance
        max_constructor_retry_count=CONTROLLER_START_RETRIES,
        # each submit goes to the group with the most KV headroom for its prompt
        request_router_config={
            "request_router_class": ROUTER_PATH,
            "request_routing_stats_period_s": g.routing_stats_period_s,
            "request_routing_stats_timeout_s": 10,
            "request_router_kwargs": router_kwargs(cfg),
        },
    )
    if g.max_groups > 1:  # whole ESP groups, on KV demand (app/autoscaling.py)
        options["autoscaling_config"] = {
            "min_replicas": g.min_groups,
            "max_replicas": g.max_groups,
            "initial_replicas": g.min_groups,
            "upscale_delay_s": g.upscale_delay_s,
            "downscale_delay_s": g.downscale_delay_s,
            "look_back_period_s": g.look_back_period_s,
            "metrics_interval_s": g.metrics_interval_s,
            "policy": {
                "policy_function": POLICY_PATH,
                "policy_kwargs": {"target_saturation": g.target_saturation},
            },
        }
    else:
        options["num_replicas"] = g.min_groups
    return options


def ingress_options(cfg: AppConfig) -> dict[str, Any]:
    s = cfg.server
    return dict(
        name="OpenAIIngress",
        ray_actor_options={"num_cpus": s.ingress_num_cpus, "runtime_env": {"env_vars": SAME_LOOP_ENV}},
        autoscaling_config={
            "min_replicas": s.ingress_min_replicas,
            "max_replicas": s.ingress_max_replicas,
            "target_ongoing_requests": 64,
        },
        max_ongoing_requests=1024,
        # On delete/redeploy the ingress must outlive the groups' drain: a stream the group
        # could not finish then still gets its error event to the client instead of a cut
        # connection (tests/live/test_shutdown_drain.py)
        graceful_shutdown_timeout_s=cfg.groups.graceful_shutdown_timeout_s + 10,
    )


ControllerDeployment = serve.deployment(ESPController)
IngressDeployment = serve.deployment(serve.ingress()(OpenAIIngress))


def build_app(args: dict[str, Any] | None = None) -> Application:
    cfg = load_config(args)
    config = cfg.model_dump(mode="json")
    controller = ControllerDeployment.options(**controller_options(cfg)).bind(config)
    return IngressDeployment.options(**ingress_options(cfg)).bind(config, controller)
