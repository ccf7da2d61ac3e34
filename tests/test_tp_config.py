"""`cluster.tensor_parallel_size` in the serving config: checked against the served model's
heads (a clear error naming the key and the values that work), one bundle per instance
holding all its ranks, and each rank's memory plan sized for its heads' share."""

from __future__ import annotations

import pytest

from esp_serve.app.config import ConfigError, load_config

CPU = {"memory_gib_per_instance": 2.0, "num_instances": 2}


def test_tp_size_must_split_the_models_heads():
    # the built-in model: 8 query heads, 2 KV heads, MLP width 768
    with pytest.raises(ConfigError) as err:
        load_config({"cluster": {"tensor_parallel_size": 3}})
    text = str(err.value)
    assert "cluster.tensor_parallel_size: 3" in text
    assert "num_heads (8) is not divisible" in text
    assert "valid values for it: 1, 2, 4, 8" in text
    with pytest.raises(ConfigError, match="tensor_parallel_size: 16 .*valid values for it: 1, 2, 4, 8"):
        load_config({"cluster": {"tensor_parallel_size": 16}})


def test_tp2_is_served_one_bundle_per_instance():
    cfg = load_config({"cluster": {**CPU, "tensor_parallel_size": 2, "instance_resources": {"CPU": 0.25}}})
    assert cfg.cluster_spec().tp_per_instance == 2
    # bundle 0: the controller; then one bundle per instance with both ranks' resources
    assert cfg.placement_group_bundles()[1:] == [{"CPU": 0.5}, {"CPU": 0.5}]


def test_each_rank_plans_memory_for_its_share():
    one = load_config({"cluster": CPU}).check_memory()
    two = load_config({"cluster": {**CPU, "tensor_parallel_size": 2}}).check_memory()
    # a rank holds half the KV heads (2 -> 1), on half of the instance's budget
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert two.budget_bytes * 2 == one.budget_bytes
    assert two.weight_bytes < one.weight_bytes
    # so an instance of 2 ranks holds about as many tokens as one of 1 rank
    assert 0.9 < two.kv_slots / one.kv_slots < 1.2
