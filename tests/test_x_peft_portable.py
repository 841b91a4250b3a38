"""Portable X-PEFT profiles: the bank is recorded by fingerprint and a path relative to the profile folder, and found
through `bank_path`, $XPEFT_BANK_PATH, then that relative path."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model

from contract import logits
from models import make_inputs, make_model
from xpeft import XPeftConfig
from xpeft.x_peft import save_bank
from xpeft.x_peft.config import BANK_PATH_ENV, portable_bank_path

N = 4


def make_config(**kwargs):
    return XPeftConfig(**({"bank_size": N, "reduction_factor": 4, "init_weights": False} | kwargs))


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A profile `work/profiles/alice` trained on the bank file `work/banks/bank.safetensors`, its logits, and a second
    bank file of the same name and shapes but other values (`other/bank.safetensors`)."""
    monkeypatch.delenv(BANK_PATH_ENV, raising=False)
    work = tmp_path / "work"
    (work / "banks").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    torch.manual_seed(0)
    bank_file = work / "banks" / "bank.safetensors"
    save_bank(get_peft_model(make_model("llama"), make_config()).base_model.xpeft_bank, bank_file)
    save_bank(
        get_peft_model(make_model("llama"), make_config(bank_seed=9)).base_model.xpeft_bank,
        tmp_path / "other" / "bank.safetensors",
    )
    model = get_peft_model(make_model("llama"), make_config(bank=str(bank_file))).eval()
    model.save_pretrained(work / "profiles" / "alice")
    return tmp_path, logits(model, make_inputs("llama"))


def test_saved_config_records_a_relative_path_and_the_fingerprint(saved):
    tmp_path, _ = saved
    recorded = json.loads((tmp_path / "work" / "profiles" / "alice" / "adapter_config.json").read_text())
    assert recorded["bank"] == "../../banks/bank.safetensors"
    assert str(tmp_path) not in json.dumps(recorded)  # no absolute local path anywhere in the file
    assert len(recorded["bank_fingerprint"]) == 64


def test_no_shared_folder_but_the_root_records_only_the_file_name(tmp_path):
    assert portable_bank_path("/opt/banks/b.safetensors", "/srv/profiles/alice") == "b.safetensors"
    assert portable_bank_path("/srv/banks/b.safetensors", "/srv/profiles/alice") == "../../banks/b.safetensors"
    # a crash-safe save writes into a temporary sibling; the path is relative to the real folder
    staged = tmp_path / f".alice.xpeft-tmp-{'0' * 32}"
    assert portable_bank_path(tmp_path / "alice" / "b.safetensors", staged) == "b.safetensors"


def test_moved_together_the_profile_finds_its_bank_by_the_relative_path(saved, monkeypatch):
    tmp_path, expected = saved
    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(tmp_path / "work", moved)
    monkeypatch.chdir(tmp_path)  # any working directory
    loaded = PeftModel.from_pretrained(make_model("llama"), moved / "profiles" / "alice")
    assert torch.equal(logits(loaded, make_inputs("llama")), expected)
    assert loaded.peft_config["default"].bank == str(moved / "banks" / "bank.safetensors")


def test_moved_apart_the_bank_is_found_by_argument_or_environment(saved, monkeypatch):
    tmp_path, expected = saved
    profile = tmp_path / "moved-profile"
    shutil.move(tmp_path / "work" / "profiles" / "alice", profile)
    banks = tmp_path / "moved-banks"
    shutil.move(tmp_path / "work" / "banks", banks)
    with pytest.raises(
        FileNotFoundError, match=r"bank file 'bank.safetensors' \(fingerprint [0-9a-f]{64}\).*searched.*bank_path="
    ):
        PeftModel.from_pretrained(make_model("llama"), profile)
    for bank_path in (banks, banks / "bank.safetensors"):  # a folder or the file
        loaded = PeftModel.from_pretrained(make_model("llama"), profile, bank_path=str(bank_path))
        assert torch.equal(logits(loaded, make_inputs("llama")), expected)
    # the search path: a folder with another bank of the same name is passed over for the right one
    monkeypatch.setenv(
        BANK_PATH_ENV, os.pathsep.join([str(tmp_path / "other"), str(tmp_path / "missing"), str(banks)])
    )
    loaded = PeftModel.from_pretrained(make_model("llama"), profile)
    assert torch.equal(logits(loaded, make_inputs("llama")), expected)
    assert loaded.peft_config["default"].bank == str(banks / "bank.safetensors")
    # load_adapter reads the environment too
    host = get_peft_model(make_model("llama"), make_config(bank=str(banks / "bank.safetensors")))
    host.load_adapter(profile, adapter_name="alice")
    host.set_adapter("alice")
    assert torch.equal(logits(host.eval(), make_inputs("llama")), expected)


def test_a_wrong_bank_is_a_fingerprint_error(saved, monkeypatch):
    tmp_path, _ = saved
    profile = tmp_path / "work" / "profiles" / "alice"
    other = tmp_path / "other" / "bank.safetensors"
    with pytest.raises(
        ValueError,
        match=r"trained against bank [0-9a-f]{64}, but the bank files found for it are other banks: .*other/bank.safetensors \(from `bank_path`",
    ):
        PeftModel.from_pretrained(make_model("llama"), profile, bank_path=str(other))
    (tmp_path / "work" / "banks" / "bank.safetensors").unlink()
    monkeypatch.setenv(BANK_PATH_ENV, str(other.parent))
    with pytest.raises(ValueError, match=rf"other banks: {other} \(from \${BANK_PATH_ENV}"):
        PeftModel.from_pretrained(make_model("llama"), profile)


def test_an_old_config_with_an_absolute_path_still_loads(saved, monkeypatch):
    tmp_path, expected = saved
    profile = tmp_path / "work" / "profiles" / "alice"
    config_file = profile / "adapter_config.json"
    bank = tmp_path / "work" / "banks" / "bank.safetensors"
    recorded = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(recorded | {"bank": str(bank)}))
    monkeypatch.chdir(tmp_path / "other")  # holds another bank.safetensors: the absolute path is not relative
    loaded = PeftModel.from_pretrained(make_model("llama"), profile)
    assert torch.equal(logits(loaded, make_inputs("llama")), expected)
    # moved: the search path finds it by its file name
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(bank, moved / "bank.safetensors")
    monkeypatch.setenv(BANK_PATH_ENV, str(moved))
    loaded = PeftModel.from_pretrained(make_model("llama"), profile)
    assert torch.equal(logits(loaded, make_inputs("llama")), expected)
