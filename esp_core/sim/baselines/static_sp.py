"""`static-sp`: the paper's ablation of a fixed sequence-parallel degree (e.g. TP2 x SP4).

Model: the instances form fixed rings of `sp` instances (default: all of them). Every
prefill runs striped over the whole ring with its KV spread evenly over the ring (the
ring-attention scale-down never happens: all instances keep a share); every decode step
runs on the whole ring with masters spread round-robin and each new token stored on its
master (or the freest instance when the master is full). The degree never changes, so
prefill and decode cannot run side by side in a ring: an iteration is a prefill batch
(prefill-prioritised, FCFS) or one decode step. Admission is the peak-memory check of
LoongServe/LightLLM (no preemption). `sp=1` with several instances gives independent
replicas ("4 replicas of TP2").
"""

from __future__ import annotations

from esp_core.sched.interface import ClusterSpec
from esp_core.sim.baselines.static_group import StaticConfig, StaticGroupScheduler


def static_sp_scheduler(cluster: ClusterSpec, sp: int | None = None) -> StaticGroupScheduler:
    sp = cluster.num_instances if sp is None else sp
    return StaticGroupScheduler(cluster, StaticConfig(group_size=sp, admission="reserve"))
