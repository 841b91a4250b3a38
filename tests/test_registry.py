"""xpeft's additions to peft's PeftType enum and method registry (DESIGN.md §0)."""

import importlib
import pickle
import sys

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


def test_added_member_behaves_like_a_class_body_member():
    member = ensure_peft_type("XPEFT_DUMMY")
    reference = PeftType.LORA  # a member peft defined in the class body
    assert [m for m in PeftType if m is member] == [member]
    assert list(PeftType).index(member) == PeftType._member_names_.index("XPEFT_DUMMY")
    assert len(PeftType) == len(PeftType._member_names_) == len(set(PeftType))
    assert PeftType.__members__["XPEFT_DUMMY"] is member
    assert (member.name, member.value) == ("XPEFT_DUMMY", "XPEFT_DUMMY")
    assert repr(member) == repr(reference).replace("LORA", "XPEFT_DUMMY")
    assert str(member) == str(reference).replace("LORA", "XPEFT_DUMMY")
    assert {"XPEFT_DUMMY": 1}[member] == 1 and {member: 1}["XPEFT_DUMMY"] == 1  # hashes and compares as its str
    assert member in PeftType
    with pytest.raises(ValueError, match="is not a valid PeftType"):
        PeftType("NOT_A_PEFT_TYPE")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_added_member_pickles_to_itself(protocol):
    member = ensure_peft_type("XPEFT_DUMMY")
    assert pickle.loads(pickle.dumps(member, protocol=protocol)) is member
    config = dummy_tuner.DummyConfig(target_modules=["q_proj"])
    assert pickle.loads(pickle.dumps(config, protocol=protocol)).peft_type is member


def test_value_containment_follows_the_python_version():
    ensure_peft_type("XPEFT_DUMMY")
    if sys.version_info >= (3, 12):
        # Since 3.12 `in` accepts values; CPython 3.13+ reads `_hashable_values_` for it, which must then hold ours.
        assert "XPEFT_DUMMY" in PeftType and "LORA" in PeftType and "NOT_A_PEFT_TYPE" not in PeftType
    else:
        with pytest.raises(TypeError), pytest.warns(DeprecationWarning, match="3.12"):
            "XPEFT_DUMMY" in PeftType  # noqa: B015  (3.11 refuses non-members, ours alike)
    if hasattr(PeftType, "_hashable_values_"):
        assert "XPEFT_DUMMY" in PeftType._hashable_values_


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
