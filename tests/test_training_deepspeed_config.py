"""training.deepspeed: the user's DeepSpeed keys merged over the run's, owned keys refused."""

import pytest

from spa_ray.pipeline.config import ConfigError, load_config
from spa_ray.training.deepspeed_config import OWNED_KEYS, reference_deepspeed_config, stage_deepspeed_config

RUN = dict(global_batch_size=32, micro_batch_size=8, accumulation_steps=2, zero_stage=3, max_grad_norm=1.0,
           use_bf16=True)


def test_extra_keys_merge_section_by_section_and_leave_the_run_keys():
    extra = {"zero_optimization": {"reduce_bucket_size": 5e7, "offload_optimizer": {"device": "cpu"},
                                   "offload_param": {"device": "cpu"}},
             "communication_data_type": "fp32"}
    config = stage_deepspeed_config(**RUN, extra=extra)
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 5e7, "offload_optimizer": {"device": "cpu"},
                                           "offload_param": {"device": "cpu"}}
    assert config["communication_data_type"] == "fp32"
    assert (config["train_batch_size"], config["gradient_accumulation_steps"], config["gradient_clipping"]) == (32, 2, 1.0)
    assert extra["zero_optimization"].get("stage") is None  # the input is not changed

    reference = reference_deepspeed_config(config)  # the frozen reference has no optimizer state
    assert reference["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 5e7, "offload_param": {"device": "cpu"}}
    assert reference["bf16"] == {"enabled": True} and reference["train_micro_batch_size_per_gpu"] == 8
    assert stage_deepspeed_config(**RUN) == stage_deepspeed_config(**RUN, extra={})


@pytest.mark.parametrize("key", sorted(OWNED_KEYS))
def test_every_owned_key_is_refused_with_the_setting_to_use(key):
    tree: dict = {}
    node = tree
    *sections, last = key.split(".")
    for name in sections:
        node = node.setdefault(name, {})
    node[last] = 1
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + " is set by the run from"):
        stage_deepspeed_config(**RUN, extra=tree)


def test_config_loading_names_the_field_of_a_refused_key():
    with pytest.raises(ConfigError, match=r"training\.deepspeed: train_batch_size is set by the run from training\.global_batch_size"):
        load_config(overrides=["training.deepspeed={train_batch_size: 64}"])
    with pytest.raises(ConfigError, match=r"training\.deepspeed: zero_optimization must be a mapping"):
        load_config(overrides=["training.deepspeed={zero_optimization: 2}"])
    config = load_config(overrides=["training.deepspeed={zero_optimization: {allgather_bucket_size: 1000}}"])
    assert config.training.deepspeed == {"zero_optimization": {"allgather_bucket_size": 1000}}
