"""The prefill rings an `ESPScheduler` plans on a group placed over several nodes (tests
only): a fake-clock run of mixed prompt lengths, every plan kept."""

from __future__ import annotations

from collections.abc import Sequence

from esp_core.sched.config import ESPSchedulerConfig
from esp_core.sched.cost_model import CostModel
from esp_core.sched.interface import ClusterSpec
from esp_core.sched.plan import NewRequest, SamplingParams
from esp_core.sched.scheduler import ESPScheduler
from tests.sched.fake_clock import run

# Prompts from one instance's worth to several instances' (slots per instance: 10,000),
# arriving together and in a second wave, so rings of every size form.
PROMPT_LENGTHS = (300, 12_000, 25_000, 2_000, 41_000, 7_000, 18_000, 900, 33_000, 5_000)


def scheduled_rings(node_of: Sequence[str], slots: int = 10_000) -> list[tuple[int, ...]]:
    """Instances of every prefill batch (in ring order) planned for `PROMPT_LENGTHS` on a
    group whose instance i sits on node `node_of[i]` (told through the cost model)."""
    cost = CostModel.default_a800()
    cost.set_placement(tuple(node_of))
    scheduler = ESPScheduler(ClusterSpec(len(node_of), slots), cost, ESPSchedulerConfig())
    arrivals = [
        (
            0.0 if k % 2 == 0 else 0.05,
            NewRequest(f"r{k}", tuple(range(3, 3 + n)), SamplingParams(max_tokens=4)),
        )
        for k, n in enumerate(PROMPT_LENGTHS)
    ]
    result = run(scheduler, arrivals, keep_plans=True)
    assert not result.rejected, result.rejected
    return [batch.instances for plan in result.plans for batch in plan.prefills]
