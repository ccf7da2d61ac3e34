"""A tiny fake executor for scheduler tests: it models each instance's KV pool the way the
runtime does (prompt slots at prefill, one slot per decode step, free on release) and
answers every batch with tokens chosen by the test."""

from __future__ import annotations

from collections.abc import Callable

from esp_core.sched.plan import BatchResult, IterationPlan, SampledToken


class FakeExecutor:
    def __init__(self, num_instances: int, slots: int, pick: Callable[[str, int], int] = lambda rid, step: 7):
        self.slots = slots
        self.used: list[dict[str, int]] = [dict() for _ in range(num_instances)]
        self.steps: dict[str, int] = {}  # request id -> tokens sampled so far
        self.pick = pick
        self.plans: list[IterationPlan] = []

    def free(self, i: int) -> int:
        return self.slots - sum(self.used[i].values())

    def execute(self, plan: IterationPlan) -> list[BatchResult]:
        self.plans.append(plan)
        for rel in plan.releases:
            for i in rel.instances:
                self.used[i].pop(rel.request_id, None)
        results = []
        for batch in plan.prefills:
            (i,) = batch.instances
            sampled = []
            for item in batch.items:
                self.used[i][item.request_id] = len(item.tokens)
                sampled.append(self._sample(item.request_id))
            results.append(BatchResult(batch.batch_id, "prefill", batch.instances, tuple(sampled)))
        for batch in plan.decodes:
            (i,) = batch.instances
            sampled = []
            for item in batch.items:
                assert item.master == i and item.new_kv_instance == i and item.holders == (i,)
                assert item.position == self.used[i][item.request_id]
                self.used[i][item.request_id] += 1
                sampled.append(self._sample(item.request_id))
            results.append(BatchResult(batch.batch_id, "decode", batch.instances, tuple(sampled)))
        for i in range(len(self.used)):
            assert self.free(i) >= 0, f"instance {i} over-committed"
        return results

    def _sample(self, rid: str) -> SampledToken:
        step = self.steps.get(rid, 0)
        self.steps[rid] = step + 1
        return SampledToken(rid, self.pick(rid, step))
