"""Variant presets load, equal their key=value form, and name bad keys."""

import pytest

from spa_ray.pipeline.config import ConfigError, load_config
from spa_ray.variants.presets import preset_names, variant_overrides


def test_every_preset_loads_and_equals_its_overrides():
    names = preset_names()
    assert {"sspo", "sp2dpo", "s_sppo", "wdro_dpo"} <= set(names)
    for name in names:
        from_file = load_config(f"clusters/presets/variants/{name}.yaml")
        assert from_file == load_config(None, variant_overrides(name)), name
        assert from_file.variant.name != "spa"


def test_presets_layer_on_another_base():
    config = load_config("clusters/presets/mistral-7b-ultrafeedback.yaml", variant_overrides("wdro_dpo"))
    assert config.variant.name == "wdro_dpo" and config.training.learning_rate == 5e-7


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="variant.name"):
        load_config(None, ["variant.name=dpo_plus"])
    with pytest.raises(ConfigError, match="variant.wdro.xi_min"):
        load_config(None, ["variant.wdro.xi_min=0"])
    with pytest.raises(ConfigError, match="variant.sspo.beta"):
        load_config(None, ["variant.sspo.beta=-1"])
    with pytest.raises(ConfigError, match="variant.s_sppo.gate_high"):
        load_config(None, ["variant.s_sppo.gate_high=0.5"])
    with pytest.raises(ConfigError, match="variant.stages"):
        load_config(None, ["variant.stages=some"])
    with pytest.raises(ConfigError, match="variant.sspo.bogus"):
        load_config(None, ["variant.sspo.bogus=1"])
    with pytest.raises(ConfigError, match="variant preset"):
        variant_overrides("nope")
