"""Atomic safetensors writes, checked reads and fingerprints (xpeft.serialization)."""

import pytest
import torch
from safetensors.torch import load_file

from xpeft import serialization
from xpeft.serialization import (
    atomic_save_file,
    load_checked,
    read_safetensors_metadata,
    recipe_fingerprint,
    tensor_fingerprint,
)


def test_atomic_save_round_trip_with_metadata(tmp_path):
    path = atomic_save_file({"a": torch.arange(6.0).view(2, 3)}, tmp_path / "sub" / "x.safetensors", {"k": "v"})
    assert load_file(path)["a"].equal(torch.arange(6.0).view(2, 3))
    assert read_safetensors_metadata(path) == {"k": "v"}
    # the lock file stays (see the module docstring of xpeft.serialization), no temporary file does
    assert sorted(p.name for p in path.parent.iterdir()) == [".x.safetensors.xpeft-lock", "x.safetensors"]


def test_failed_write_keeps_the_existing_file(tmp_path, monkeypatch):
    path = atomic_save_file({"a": torch.ones(3)}, tmp_path / "x.safetensors")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_file({"a": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.safetensors.xpeft-lock", "x.safetensors"]


def test_truncated_file_gives_a_clear_error(tmp_path):
    path = atomic_save_file({"a": torch.ones(100)}, tmp_path / "x.safetensors")
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"truncated or corrupted"):
        load_checked(path)
    path.write_bytes(b"\x05")
    with pytest.raises(ValueError, match=r"truncated or corrupted"):
        read_safetensors_metadata(path)
    with pytest.raises(FileNotFoundError, match="No safetensors file"):
        load_checked(tmp_path / "missing.safetensors")


def test_fingerprints_see_every_byte_and_ignore_order():
    tensors = {"b": torch.zeros(4, dtype=torch.bfloat16), "a": torch.arange(3.0)}
    same = {"a": torch.arange(3.0), "b": torch.zeros(4, dtype=torch.bfloat16)}
    assert tensor_fingerprint(tensors) == tensor_fingerprint(same)
    changed = {**same, "a": torch.tensor([0.0, 1.0, 2.0000002])}
    assert tensor_fingerprint(changed) != tensor_fingerprint(tensors)
    assert tensor_fingerprint({"a": torch.zeros(2, 2)}) != tensor_fingerprint({"a": torch.zeros(4)})
    assert tensor_fingerprint({"s": torch.tensor(1.0)})  # 0-dim tensors are fine
    assert recipe_fingerprint({"seed": 1, "n": 2}) == recipe_fingerprint({"n": 2, "seed": 1})
    assert recipe_fingerprint({"seed": 1}) != recipe_fingerprint({"seed": 2})
