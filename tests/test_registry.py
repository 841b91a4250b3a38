"""xpeft's additions to peft's PeftType enum and method registry (DESIGN.md §0)."""

import importlib

import pytest
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import dummy_tuner
import xpeft
from xpeft import ensure_peft_type, register_method


def test_added_member_behaves_like_a_peft_member():
    member = ensure_peft_type("XPEFT_DUMMY")
    assert member is PeftType.XPEFT_DUMMY is PeftType("XPEFT_DUMMY") is PeftType["XPEFT_DUMMY"]
    assert member == "XPEFT_DUMMY" and isinstance(member, str)
    assert member in list(PeftType)
    assert ensure_peft_type("XPEFT_DUMMY") is member


def test_reimport_and_reload_are_harmless():
    importlib.reload(xpeft)
    reloaded = importlib.reload(dummy_tuner)
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.XPEFT_DUMMY] is reloaded.DummyModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.XPEFT_DUMMY] is reloaded.DummyConfig
    assert [name for name in PeftType._member_names_ if name == "XPEFT_DUMMY"] == ["XPEFT_DUMMY"]


def test_peft_own_member_is_never_overridden():
    with pytest.raises(RuntimeError, match=r"peft .* already defines PeftType.LORA"):
        ensure_peft_type("LORA")


def test_member_names_are_validated():
    with pytest.raises(ValueError, match="upper-case"):
        ensure_peft_type("ether")


def test_another_tuner_under_a_taken_name_is_refused():
    class OtherModel(dummy_tuner.DummyModel):
        pass

    with pytest.raises(RuntimeError, match="already registered to dummy_tuner.DummyModel"):
        register_method(dummy_tuner.NAME, dummy_tuner.DummyConfig, OtherModel)


def test_config_round_trip_through_peft(tmp_path):
    from models import make_model

    model = get_peft_model(make_model("llama"), dummy_tuner.DummyConfig(target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, dummy_tuner.DummyConfig)
    assert config.peft_type is PeftType.XPEFT_DUMMY
