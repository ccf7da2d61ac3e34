"""What each instance knows of each request, replayed from a scheduler's plans as the
controller sends them (app/dispatch.py: `sub_plan`), without a model.

`InstanceKnowledge.apply(part)` makes the request-state changes `InstanceWorker` makes
for one sub-plan (esp_core/runtime/worker.py: apply_bookkeeping, then the batches:
esp_prefill.chunk_ids, local_exec.record_decode_inputs) on real `RequestState`s, and
raises where an instance would fail: a batch of a request it was never sent, an output
token arriving before the earlier ones; and, given each request's real outputs, where a
decode step would sample from a wrong history.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from esp_core.runtime.request_state import RequestState
from esp_core.sched.plan import IterationPlan, ReleaseReason
from esp_serve.app.dispatch import sub_plan


class InstanceLacks(AssertionError):
    pass


@dataclass
class InstanceKnowledge:
    instance: int
    states: dict[str, RequestState] = field(default_factory=dict)
    received: Counter[str] = field(default_factory=Counter)  # NewRequests, per request

    def apply(self, part: IterationPlan, outputs: dict[str, list[int]] | None = None) -> None:
        for req in part.new_requests:
            self.received[req.request_id] += 1
            self.states.setdefault(req.request_id, RequestState.from_new(req))
        for rel in part.releases:
            if rel.reason != ReleaseReason.PREEMPTED:  # a preempted request keeps its state
                self.states.pop(rel.request_id, None)
        for ad in part.adoptions:
            if not ad.share:
                self.states.pop(ad.src_rid, None)
        for pb in part.prefills:
            for pit in pb.items:
                state = self._state(pit.request_id, pb.batch_id)
                first = max(pit.tokens.start, state.prompt_len)
                if pit.extra_token_ids and first - state.prompt_len <= len(state.output_ids):
                    state.record_outputs_from(first, pit.extra_token_ids)
        for db in part.decodes:
            for dit in db.items:
                state = self._state(dit.request_id, db.batch_id)
                if dit.output_prefix:
                    state.record_outputs_from(state.prompt_len, dit.output_prefix)
                token = dit.input_token
                if token is None:  # a look-ahead step: the token the instance sampled there
                    if outputs is None:
                        raise InstanceLacks("replaying a look-ahead step needs the outputs")
                    token = outputs[dit.request_id][dit.position - state.prompt_len]
                state.record_token(dit.position, token)  # raises on a gap
                n = dit.position + 1 - state.prompt_len  # the history the step samples after
                if outputs is not None and state.output_ids[:n] != outputs[dit.request_id][:n]:
                    raise InstanceLacks(f"instance {self.instance}: {dit.request_id} history differs")

    def _state(self, rid: str, batch_id: int) -> RequestState:
        state = self.states.get(rid)
        if state is None:
            raise InstanceLacks(f"instance {self.instance}: batch {batch_id} of {rid}, never sent")
        return state


def replay(
    plans: list[IterationPlan], num_instances: int, outputs: dict[str, list[int]] | None = None
) -> list[InstanceKnowledge]:
    """Every plan, split per instance, applied in plan order (the order each instance
    runs its sub-plans in)."""
    instances = [InstanceKnowledge(i) for i in range(num_instances)]
    for plan in plans:
        for inst in instances:
            part = sub_plan(plan, inst.instance)
            if part is not None:
                inst.apply(part, outputs)
    return instances
