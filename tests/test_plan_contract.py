"""The IterationPlan contract: frozen, picklable, JSON round-trips."""

import pickle

import pytest

from esp_core.sched.plan import (
    BatchResult,
    DecodeBatch,
    DecodeItem,
    IterationPlan,
    KVKeep,
    Migration,
    NewRequest,
    PrefillBatch,
    PrefillItem,
    Release,
    ReleaseReason,
    RequestJoin,
    SampledToken,
    SamplingParams,
    TokenLogprob,
    TokenRange,
    from_json,
    frozen_from_fields,
    to_json,
)


def make_plan() -> IterationPlan:
    req = NewRequest("a", (5, 6, 7, 8), SamplingParams(max_tokens=3, logit_bias=((5, -1.5),)))
    prefill = PrefillBatch(
        batch_id=1,
        instances=(0, 1, 2),
        items=(PrefillItem("a", TokenRange(0, 4), stripe_offset=1, keep=(KVKeep(0, (TokenRange(0, 4),)),)),),
    )
    decode = DecodeBatch(
        batch_id=2,
        instances=(3,),
        items=(
            DecodeItem(
                "b",
                input_token=9,
                position=10,
                master=3,
                holders=(3,),
                new_kv_instance=3,
                output_prefix=(4, 5),
            ),
        ),
    )
    return IterationPlan(
        plan_id=7,
        new_requests=(req,),
        prefills=(prefill,),
        decodes=(decode,),
        migrations=(Migration("c", 1, 2, (TokenRange(0, 2),)),),
        releases=(Release("d", (0, 1), ReleaseReason.PREEMPTED),),
        paused=("e",),
        joins=(RequestJoin("a", (0, 1, 2)),),
    )


def test_plan_round_trips_through_json_and_pickle():
    plan = make_plan()
    assert from_json(to_json(plan)) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan
    assert plan.instances_used() == {0, 1, 2, 3}


def test_results_round_trip():
    result = BatchResult(
        1,
        "prefill",
        (0, 1),
        sampled=(SampledToken("a", 3, -0.5, (TokenLogprob(3, -0.5), TokenLogprob(4, -1.0))),),
        elapsed_s=0.01,
    )
    assert from_json(to_json(result)) == result


def test_plan_is_frozen():
    plan = make_plan()
    with pytest.raises(AttributeError):
        plan.plan_id = 3  # type: ignore[misc]


def test_token_range_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        TokenRange(5, 2)
    assert TokenRange(2, 6).intersect(TokenRange(4, 9)) == TokenRange(4, 6)
    assert TokenRange(0, 2).intersect(TokenRange(2, 4)) is None


def test_item_built_from_fields_is_the_constructed_item():
    fields = {
        "request_id": "a",
        "tokens": TokenRange(3, 9),
        "stripe_offset": 2,
        "keep": (KVKeep(1, (TokenRange(3, 9),)),),
        "cached_holders": (1, 4),
        "sample": False,
        "extra_token_ids": (7,),
    }
    fast, slow = frozen_from_fields(PrefillItem, dict(fields)), PrefillItem(**fields)
    assert type(fast) is PrefillItem
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert from_json(to_json(fast)) == slow
    assert pickle.loads(pickle.dumps(fast)) == slow
    with pytest.raises(AttributeError):
        fast.sample = True  # type: ignore[misc]
