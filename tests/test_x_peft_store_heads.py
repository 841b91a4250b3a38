"""A stored X-PEFT profile is the whole profile: masks and head (`modules_to_save`), geometry read from the model,
old (v1, masks-only) stores, and a base model wrapped twice."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from contract import logits
from models import HIDDEN, make_inputs, make_model, task_type
from xpeft import ProfileStore, XPeftConfig, attach_profile
from xpeft.serialization import read_safetensors_metadata
from xpeft.x_peft import profile_payload
from xpeft.x_peft.store import STORE_FORMAT, STORE_FORMAT_V1, StoredProfile

N, LAYERS = 8, 2


def trained_bert(mask_type="soft", seed=0):
    """A BERT classifier with profile "alice" whose masks and classifier head differ from their initial values."""
    torch.manual_seed(seed)
    model = get_peft_model(make_model("bert"), make_config(mask_type=mask_type), adapter_name="alice")
    head = model.get_base_model().classifier.modules_to_save["alice"]
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))
        head.bias.add_(torch.randn_like(head.bias))
    return model.eval()


def make_config(model_name="bert", **kwargs):
    return XPeftConfig(
        **(
            {"bank_size": N, "hard_k": 1, "reduction_factor": 4, "init_weights": False}
            | {"task_type": task_type(model_name)}
            | kwargs
        )
    )


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_attached_profile_has_the_trained_head_and_bit_identical_outputs(tmp_path, mask_type):
    model = trained_bert(mask_type)
    store = ProfileStore.create(tmp_path / "s.safetensors", model)
    store.add_from(model, ["alice"])
    modules_to_save = list(model.peft_config["alice"].modules_to_save)
    attach_profile(model, ProfileStore(tmp_path / "s.safetensors"), "alice", adapter_name="alice_from_store")
    assert model.peft_config["alice"].modules_to_save == modules_to_save  # the template's config is left alone
    inputs = make_inputs("bert", batch=2)
    doubled = {key: torch.cat([value, value]) for key, value in inputs.items()}
    names = ["alice", "alice", "alice_from_store", "alice_from_store"]
    mixed = logits(model, doubled, adapter_names=names)
    assert torch.equal(mixed[:2], mixed[2:])
    # the head matters here: the base model's head (what attaching gave before) changes the logits
    with torch.no_grad():
        base_head = model.get_base_model().classifier.original_module
        model.get_base_model().classifier.modules_to_save["alice_from_store"].load_state_dict(base_head.state_dict())
    assert not torch.allclose(logits(model, doubled, adapter_names=names)[2:], mixed[:2], atol=1e-3)


def test_record_bytes_are_the_masks_and_the_head(tmp_path):
    for mask_type, mask_bytes in (("hard", math.ceil(2 * LAYERS * N / 8)), ("soft", 4 * 2 * LAYERS * N)):
        model = trained_bert(mask_type)
        path = tmp_path / f"{mask_type}.safetensors"
        store = ProfileStore.create(path, model)
        head_bytes = 4 * (2 * HIDDEN + 2)  # BERT's classifier: Linear(HIDDEN, 2) in float32
        assert store.record_bytes == {"masks": mask_bytes, "head": head_bytes, "total": mask_bytes + head_bytes}
        empty = path.stat().st_size
        store.add_from(model, "alice")
        metadata_growth = len(json.dumps(["alice"])) - len(json.dumps([]))
        assert path.stat().st_size - empty <= mask_bytes + head_bytes + metadata_growth + 8  # header padding
        assert path.stat().st_size - empty >= mask_bytes + head_bytes
        stored = store.profile("alice")
        assert torch.equal(stored.masks, profile_payload(model, "alice"))
        head = model.get_base_model().classifier.modules_to_save["alice"]
        assert torch.equal(stored.head["classifier.weight"], head.weight)
        assert torch.equal(stored.head["classifier.bias"], head.bias)


def test_store_geometry_comes_from_the_model_and_a_wrong_layers_is_named(tmp_path):
    model = trained_bert("hard")
    store = ProfileStore.create(tmp_path / "a.safetensors", model, layers=LAYERS)  # accepted when right
    assert store.info["layers"] == LAYERS
    assert store.info["head"] == [
        ["classifier", "weight", "float32", [2, HIDDEN]],
        ["classifier", "bias", "float32", [2]],
    ]
    with pytest.raises(
        ValueError, match=r"`layers`=12 but adapter 'alice' of the model adapts 2 layers; leave `layers`"
    ):
        ProfileStore.create(tmp_path / "b.safetensors", model, layers=12)
    # from a config, `layers` is the user's to give: a wrong one is named when the first profile is added
    llama = get_peft_model(make_model("llama"), make_config("llama", mask_type="hard", bank_size=100, hard_k=2))
    wrong = ProfileStore.create(tmp_path / "c.safetensors", llama.peft_config["default"], layers=12)
    with pytest.raises(
        ValueError,
        match=r"has masks torch.uint8 \[50\], but this store holds profiles of layers=12 adapted layers.*"
        r"the profile adapts 2 layers.*created with the wrong `layers`.*ProfileStore.create\(path, peft_model",
    ):
        wrong.add({"u": profile_payload(llama)})
    with pytest.raises(ValueError, match=r"config have a head \(modules_to_save=.*create the store from the model"):
        ProfileStore.create(tmp_path / "d.safetensors", model.peft_config["alice"], layers=LAYERS)
    with pytest.raises(ValueError, match=r"`layers` must be a positive int.*or pass the peft model"):
        ProfileStore.create(tmp_path / "e.safetensors", llama.peft_config["default"])


def test_a_head_store_refuses_masks_without_the_head_and_a_head_of_another_shape(tmp_path):
    model = trained_bert()
    store = ProfileStore.create(tmp_path / "s.safetensors", model)
    with pytest.raises(ValueError, match=r"given without its head.*classifier.weight.*store.add_from\(peft_model"):
        store.add({"alice": profile_payload(model, "alice")})
    payload = profile_payload(model, "alice")
    with pytest.raises(ValueError, match=r"has head tensors .* but this store keeps heads"):
        store.add({"alice": StoredProfile(payload, {"classifier.weight": torch.zeros(3, HIDDEN)})})
    nan_head = {"classifier.weight": torch.full((2, HIDDEN), float("nan")), "classifier.bias": torch.zeros(2)}
    with pytest.raises(ValueError, match="head tensor 'classifier.weight' holds NaN"):
        store.add({"alice": StoredProfile(payload, nan_head)})
    assert store.list() == []


def test_attach_refuses_a_store_whose_profiles_have_another_head(tmp_path):
    # same base model and bank, but no classifier copy: profiles trained without a head
    headless = get_peft_model(make_model("bert"), make_config(task_type=None)).eval()
    assert headless.peft_config["default"].modules_to_save is None
    store = ProfileStore.create(tmp_path / "s.safetensors", headless)
    store.add_from(headless, ["default"])
    model = trained_bert()
    with pytest.raises(ValueError, match=r"keeps profiles with head none, but this model's adapter 'alice' has head"):
        attach_profile(model, store, "default", adapter_name="x")
    assert "x" not in model.peft_config


def _write_v1_store(path, payloads, mask_type, hard_k=1):
    """A store as xpeft 0.2 wrote it: format v1, the payloads as one records tensor, no head schema."""
    info = {"bank_fingerprint": payloads.pop("_fingerprint"), "mask_type": mask_type, "hard_k": hard_k}
    info |= {"bank_size": N, "layers": LAYERS}
    records = torch.stack(list(payloads.values()))
    metadata = {"format": STORE_FORMAT_V1, "info": json.dumps(info), "names": json.dumps(list(payloads))}
    save_file({"records": records}, path, metadata=metadata)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_a_v1_store_still_opens_and_attaches_where_no_head_is_needed(tmp_path, mask_type):
    torch.manual_seed(0)
    llama = get_peft_model(make_model("llama"), make_config("llama", mask_type=mask_type)).eval()
    path = tmp_path / "old.safetensors"
    fingerprint = llama.peft_config["default"].bank_fingerprint
    _write_v1_store(path, {"u": profile_payload(llama), "_fingerprint": fingerprint}, mask_type)
    store = ProfileStore(path)
    assert store.list() == ["u"] and "head" not in store.info
    assert store.record_bytes["head"] == 0
    assert torch.equal(store.get("u"), profile_payload(llama))
    inputs = make_inputs("llama")
    expected = logits(llama, inputs)
    llama.set_adapter(attach_profile(llama, store, "u"))
    assert torch.equal(logits(llama, inputs), expected)
    # adding keeps the v1 format, so that older readers still read it
    store.add({"v": profile_payload(llama)})
    assert read_safetensors_metadata(path)["format"] == STORE_FORMAT_V1
    assert ProfileStore(path).list() == ["u", "v"]
    with pytest.raises(ValueError, match=r"format 'xpeft-profile-store/v1', which keeps masks only.*has a head"):
        store.add({"w": StoredProfile(profile_payload(llama), {"lm_head.weight": torch.zeros(1)})})


def test_a_v1_store_is_refused_for_a_model_whose_profiles_have_a_head(tmp_path):
    model = trained_bert()
    path = tmp_path / "old.safetensors"
    payload = {"alice": profile_payload(model, "alice"), "_fingerprint": model.peft_config["alice"].bank_fingerprint}
    _write_v1_store(path, payload, "soft")
    with pytest.raises(
        ValueError,
        match=r"written by xpeft 0.2 \(format v1\), which kept only the masks.*have a head \(classifier.weight, "
        r"classifier.bias\).*untrained head.*ProfileStore.create\(path, peft_model\)",
    ):
        attach_profile(model, ProfileStore(path), "alice", adapter_name="twin")
    assert "twin" not in model.peft_config


def test_a_corrupted_head_schema_is_refused(tmp_path):
    model = trained_bert()
    path = tmp_path / "s.safetensors"
    ProfileStore.create(path, model).add_from(model, ["alice"])
    metadata = read_safetensors_metadata(path)
    info = json.loads(metadata["info"])
    info["head"][0][2] = "complex128"
    from safetensors.torch import load_file

    records = load_file(path)
    save_file(records, path, metadata=dict(metadata, info=json.dumps(info)))
    with pytest.raises(ValueError, match=r"corrupted X-PEFT profile store \(its head schema holds .*complex128"):
        ProfileStore(path)
    assert metadata["format"] == STORE_FORMAT


def test_a_base_model_wrapped_twice_is_refused_with_what_is_wrong(tmp_path):
    base = make_model("bert")
    first = get_peft_model(base, make_config())
    first.save_pretrained(tmp_path / "alice")
    # `base` now carries the first model's X-PEFT layers: a second tuner over them would use the first one's bank
    match = r"already carries the X-PEFT layers of another peft model .*Add profiles to the first peft model"
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, tmp_path / "alice", adapter_name="alice")
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, make_config(bank_seed=1))
