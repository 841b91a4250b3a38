"""The module-selection fields behave the same in every xpeft config (peft semantics, one wording)."""

from __future__ import annotations

import pytest

from xpeft import EtherConfig, PedroConfig, XPeftConfig

CONFIGS = (EtherConfig, PedroConfig, XPeftConfig)


@pytest.mark.parametrize("config_class", CONFIGS)
def test_list_targets_become_sets(config_class):
    config = config_class(target_modules=["q_proj", "v_proj", "q_proj"])
    assert config.target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize("config_class", CONFIGS)
def test_layers_pattern_needs_layers_to_transform(config_class):
    with pytest.raises(ValueError, match=r"`layers_pattern` is set but `layers_to_transform` is None.*set both"):
        config_class(target_modules=["q_proj"], layers_pattern="layers")
    config = config_class(target_modules=["q_proj"], layers_pattern="layers", layers_to_transform=[0])
    assert config.layers_to_transform == [0]


@pytest.mark.parametrize("config_class", (EtherConfig, XPeftConfig))  # PEDRO refuses a regex outright
@pytest.mark.parametrize("field", ["layers_to_transform", "layers_pattern"])
def test_layer_filter_with_a_regex_is_refused(config_class, field):
    value = [0] if field == "layers_to_transform" else "layers"
    with pytest.raises(ValueError, match=rf"`{field}` cannot be used when `target_modules` is a str \(a regex\)"):
        config_class(target_modules=r".*\.q_proj", **{field: value})


@pytest.mark.parametrize("config_class", CONFIGS)
def test_exclude_modules_list_becomes_a_set(config_class):
    assert config_class(exclude_modules=["a", "a"]).exclude_modules == {"a"}
