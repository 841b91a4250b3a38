"""X-PEFT profiles: packed saving, bank fingerprints, corruption, the profile store, mixed batches, trained banks."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from contract import each_sample_alone, logits
from models import make_inputs, make_model, task_type
from xpeft import ProfileStore, XPeftConfig, attach_profile, build_bank, profile_cost
from xpeft.x_peft import extract_adapter, pack_masks, profile_payload, unpack_masks
from xpeft.x_peft.model import xpeft_layers

N = 8


def config(model_name="llama", **kwargs):
    kwargs = {
        "bank_size": N,
        "reduction_factor": 4,
        "init_weights": False,
        "task_type": task_type(model_name),
    } | kwargs
    return XPeftConfig(**kwargs)


# -- payload packing ---------------------------------------------------------------------------------------------


def test_hard_payload_is_bitpacked_like_an_independent_reference():
    torch.manual_seed(0)
    layers, bank_size, k = 12, 100, 3
    logits_ = torch.randn(layers, 2, bank_size)
    payload = pack_masks(logits_, "hard", k)
    assert payload.dtype == torch.uint8 and payload.numel() == 300  # 2 * 12 * 100 bits
    # independent: selected set per row by sorting, then MSB-first bytes
    bits = []
    for row in logits_.reshape(-1, bank_size):
        chosen = set(sorted(range(bank_size), key=lambda i: -float(row[i]))[:k])
        bits += [1 if i in chosen else 0 for i in range(bank_size)]
    expected = [sum(bit << (7 - j) for j, bit in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8)]
    assert payload.tolist() == expected
    decoded = unpack_masks(payload, "hard", k, layers, bank_size)
    assert torch.equal(decoded.topk(k, -1).indices.sort(-1).values, logits_.topk(k, -1).indices.sort(-1).values)


@pytest.mark.parametrize(
    ("mask_type", "payload", "match"),
    [
        ("hard", torch.zeros(4, dtype=torch.uint8), "exactly hard_k=2"),
        ("hard", torch.zeros(5, dtype=torch.uint8), "4 bytes of uint8"),
        ("soft", torch.zeros(2, 2, 9), r"float32 of shape \[2, 2, 8\]"),
        ("soft", torch.full((2, 2, 8), float("nan")), "NaN"),
    ],
)
def test_unpack_rejects_payloads_that_cannot_be_a_profile(mask_type, payload, match):
    with pytest.raises(ValueError, match=match):
        unpack_masks(payload, mask_type, 2, 2, 8)


# -- saving and bank fingerprints --------------------------------------------------------------------------------


def test_saved_profile_holds_only_the_masks_and_the_bank_fingerprint(tmp_path):
    model = get_peft_model(make_model("llama"), config(mask_type="hard", hard_k=2))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert list(tensors) == ["base_model.model.xpeft_masks"]
    assert tensors["base_model.model.xpeft_masks"].numel() == math.ceil(2 * 2 * N / 8)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["bank_fingerprint"] == model.base_model.xpeft_bank.fingerprint


def test_profile_of_another_bank_is_refused_naming_both_fingerprints(tmp_path):
    model = get_peft_model(make_model("llama"), config(bank_seed=0))
    model.save_pretrained(tmp_path / "prof")
    saved_fp = model.base_model.xpeft_bank.fingerprint
    other = get_peft_model(make_model("llama"), config(bank_seed=1))
    other_fp = other.base_model.xpeft_bank.fingerprint
    with pytest.raises(ValueError, match=f"needs bank {saved_fp}.*model's bank is {other_fp}"):
        other.load_adapter(tmp_path / "prof", adapter_name="prof")
    assert "prof" not in other.peft_config
    # a config edited to describe another bank than the one recorded at training time
    path = tmp_path / "prof" / "adapter_config.json"
    path.write_text(path.read_text().replace('"bank_seed": 0', '"bank_seed": 5'))
    with pytest.raises(ValueError, match=f"trained against bank {saved_fp}, but its config describes bank"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "prof")


def test_truncated_or_corrupted_profile_gives_a_clear_error(tmp_path):
    model = get_peft_model(make_model("llama"), config(mask_type="hard", hard_k=2))
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    # corrupted payload: flip a byte so that a layer no longer selects exactly k adapters
    tensors = load_file(file)
    tensors["base_model.model.xpeft_masks"][0] ^= 0xFF
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="corrupted"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    # truncated file: safetensors itself refuses the header before X-PEFT sees it
    file.write_bytes(data[: len(data) - 10])
    with pytest.raises(SafetensorError, match="deserializing header"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    # a checkpoint without masks (e.g. another method's file renamed)
    save_file({"base_model.model.other": torch.zeros(3)}, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an X-PEFT profile"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


# -- mixed batches and the composed-adapter cache ----------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "opt"])
def test_mixed_batch_of_many_profiles_equals_each_sample_alone_and_cache_follows_masks(model_name):
    torch.manual_seed(0)
    model = get_peft_model(make_model(model_name), config(model_name))
    for i in range(4):
        model.add_adapter(f"p{i}", config(model_name, mask_type="hard" if i % 2 else "soft", hard_k=3))
    model.eval()
    inputs = make_inputs(model_name, batch=6)
    names = ["p2", "__base__", "default", "p0", "p2", "p3"]
    mixed = logits(model, inputs, adapter_names=names)
    torch.testing.assert_close(mixed, each_sample_alone(model, inputs, names), rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        base = logits(model, inputs)
    torch.testing.assert_close(logits(model, inputs, adapter_names=["__base__"] * 6), base, rtol=0, atol=0)
    # a changed mask must not be served from the cache
    with torch.no_grad():
        for _, layer in xpeft_layers(model, "p2"):
            layer.xpeft_mask_A["p2"].mul_(-1.0)
    changed = logits(model, inputs, adapter_names=names)
    assert not torch.allclose(changed[0], mixed[0], atol=1e-4)
    torch.testing.assert_close(changed[2], mixed[2], rtol=0, atol=0)


def test_mixed_batch_with_grad_on_keeps_no_cached_batch():
    model = get_peft_model(make_model("llama"), config()).eval()  # masks trainable: the composed batch has a graph
    inputs = make_inputs("llama", batch=2)
    out = model(**inputs, adapter_names=["default", "__base__"]).logits
    assert out.requires_grad
    assert all(layer._batch_cache is None for _, layer in xpeft_layers(model, "default"))
    with torch.no_grad():
        model(**inputs, adapter_names=["default", "__base__"])
    assert all(layer._batch_cache is not None for _, layer in xpeft_layers(model, "default"))


def test_model_and_layer_refuse_to_merge_with_the_same_reason():
    model = get_peft_model(make_model("llama"), config())
    reason = re.escape("the bottleneck B f(A h + a) + b is nonlinear in h, so no weight matrix reproduces it.")
    with pytest.raises(ValueError, match=f"cannot be merged into the base weights: {reason} Keep the model unmerged"):
        model.merge_and_unload()
    _, layer = xpeft_layers(model, "default")[0]
    with pytest.raises(ValueError, match=f"cannot be merged into the base weights: {reason} Keep the model unmerged"):
        layer.merge()


def test_generate_with_mixed_profiles_equals_each_alone():
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config())
    model.add_adapter("other", config(mask_type="hard", hard_k=2))
    model.eval()
    inputs = make_inputs("llama", batch=3, seq_len=5)
    inputs["attention_mask"][:] = 1
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    names = ["other", "__base__", "default"]
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        sample = {key: value[i : i + 1] for key, value in inputs.items()}
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(**sample, **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(**sample, **kwargs)
        assert torch.equal(mixed[i : i + 1], alone)


# -- the profile store -------------------------------------------------------------------------------------------


def test_store_add_get_list_attach_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config(mask_type="hard", hard_k=2)).eval()
    for i in range(3):
        model.add_adapter(f"p{i}", config(mask_type="hard", hard_k=2))
    path = tmp_path / "store.safetensors"
    store = ProfileStore.create(path, model.peft_config["default"], layers=2)
    fp = model.base_model.xpeft_bank.fingerprint
    store.add({f"p{i}": profile_payload(model, f"p{i}") for i in range(3)}, bank_fingerprint=fp)
    assert torch.equal(store.get("p1"), profile_payload(model, "p1"))  # the same object reads its own additions
    store.add({"p1": profile_payload(model, "p0")}, bank_fingerprint=fp)  # replace in place
    assert torch.equal(store.get("p1"), profile_payload(model, "p0"))
    reopened = ProfileStore(path)
    assert reopened.list() == ["p0", "p1", "p2"] and len(reopened) == 3
    assert torch.equal(reopened.get("p2"), profile_payload(model, "p2"))
    assert torch.equal(reopened.get("p1"), profile_payload(model, "p0"))
    assert path.stat().st_size < 2000  # 3 records of 4 bytes + header
    # attach to a fresh model with the same bank: same outputs as the original profile
    fresh = get_peft_model(make_model("llama"), config(mask_type="hard", hard_k=2)).eval()
    attach_profile(fresh, reopened, "p2")
    fresh.set_adapter("p2")
    model.set_adapter("p2")
    inputs = make_inputs("llama")
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), rtol=0, atol=0)
    with pytest.raises(KeyError, match="No profile 'nope'"):
        reopened.get("nope")
    with pytest.raises(ValueError, match="trained against bank 0+ but the store"):
        reopened.add({"x": profile_payload(model, "p0")}, bank_fingerprint="0" * 64)
    other = get_peft_model(make_model("llama"), config(mask_type="hard", hard_k=2, bank_seed=3))
    with pytest.raises(ValueError, match=f"holds profiles of bank {fp} but the model's bank is"):
        attach_profile(other, reopened, "p0")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        ProfileStore(path)


def test_store_errors_say_how_to_fix_them(tmp_path):
    model = get_peft_model(make_model("llama"), config()).eval()
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"is not an X-PEFT profile store.*create one with `ProfileStore.create\("):
        ProfileStore(other)
    with pytest.raises(FileNotFoundError, match=r"No X-PEFT profile store at .*create one with `ProfileStore.create"):
        ProfileStore(tmp_path / "missing.safetensors")
    store = ProfileStore.create(tmp_path / "s.safetensors", model.peft_config["default"], layers=2)
    store.add({"u": profile_payload(model)}, bank_fingerprint=model.base_model.xpeft_bank.fingerprint)
    one_layer = get_peft_model(make_model("llama"), config(layers_to_transform=[0]))
    with pytest.raises(
        ValueError,
        match=r"holds profiles of 2 layers but the model adapts 1\. Attach them to a model "
        r"adapting the same layers.*ProfileStore.create\(path, peft_model, adapter_name=name\)",
    ):
        attach_profile(one_layer, store, "u")
    model.add_adapter("p1", config())
    with pytest.raises(
        ValueError,
        match=r"No X-PEFT layer holds an adapter named 'nope'; the model's X-PEFT "
        r"adapters are \['default', 'p1'\]",
    ):
        profile_payload(model, "nope")
    with pytest.raises(ValueError, match=r"adapters are \['default', 'p1'\]"):
        extract_adapter(model, "nope")


# -- trained banks -----------------------------------------------------------------------------------------------


def test_trained_bank_from_single_adapters(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_model("gpt2"), config("gpt2")).eval()
    for i in range(2):
        model.add_adapter(f"t{i}", config("gpt2"))
    singles = [extract_adapter(model, name) for name in ("default", "t0", "t1")]
    path = tmp_path / "bank.safetensors"
    fingerprint = build_bank(singles, path)
    # a hard k=1 profile that selects adapter 1 for both A and B reproduces the single adapter "t0" exactly
    trained = get_peft_model(
        make_model("gpt2"), config("gpt2", bank=str(path), bank_size=3, mask_type="hard", hard_k=1)
    )
    assert trained.base_model.xpeft_bank.fingerprint == fingerprint
    with torch.no_grad():
        for _, layer in xpeft_layers(trained, "default"):
            for mask in (layer.xpeft_mask_A["default"], layer.xpeft_mask_B["default"]):
                mask.copy_(torch.tensor([0.0, 1.0, 0.0]))
    model.set_adapter("t0")
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(logits(trained.eval(), inputs), logits(model, inputs), rtol=1e-5, atol=1e-5)
    narrow = extract_adapter(get_peft_model(make_model("gpt2"), config("gpt2", reduction_factor=8)))
    with pytest.raises(
        ValueError,
        match=r"shape of A in layer .*adapter 0: \[8, 32\], adapter 1: \[4, 32\]\. "
        r"Every adapter .* same base model with the same `reduction_factor`",
    ):
        build_bank([singles[0], narrow], tmp_path / "mixed.safetensors")
    with pytest.raises(ValueError, match="holds 3 adapters per layer but `bank_size` is 8"):
        get_peft_model(make_model("gpt2"), config("gpt2", bank=str(path)))
    tensors = load_file(path)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, path, metadata=json.loads(json.dumps(dict(_metadata(path)))))
    with pytest.raises(ValueError, match="is corrupted"):
        get_peft_model(make_model("gpt2"), config("gpt2", bank=str(path), bank_size=3))


def test_profile_on_a_bank_file_loads_from_any_directory_and_a_moved_bank_is_named(tmp_path, monkeypatch):
    from xpeft.x_peft import save_bank

    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    save_bank(get_peft_model(make_model("llama"), config()).base_model.xpeft_bank, "bank.safetensors")
    bank_config = config(bank="bank.safetensors")
    assert bank_config.bank == str(tmp_path / "bank.safetensors")  # made absolute when the config is created
    trained = get_peft_model(make_model("llama"), bank_config).eval()
    trained.save_pretrained("profile")
    inputs = make_inputs("llama")
    expected = logits(trained, inputs)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # another working directory: the recorded path still finds the bank
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "profile")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    (tmp_path / "bank.safetensors").rename(elsewhere / "moved.safetensors")
    match = r"bank file 'bank.safetensors' .* not found; searched: .*profile/\.\./bank.safetensors.*bank_path="
    with pytest.raises(FileNotFoundError, match=match):
        PeftModel.from_pretrained(make_model("llama"), tmp_path / "profile")
    # the fix the message gives, with a path relative to the current directory
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "profile", bank_path="moved.safetensors")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    assert loaded.peft_config["default"].bank == str(elsewhere / "moved.safetensors")


def _tensors_reachable_from(obj, seen=None) -> dict[int, torch.Tensor]:
    """Every tensor an object holds through its attributes, containers and submodules, by identity."""
    seen = set() if seen is None else seen
    found = {}
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {id(obj): obj}
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        children = []
    for child in children:
        found.update(_tensors_reachable_from(child, seen))
    return found


def test_trained_bank_reads_only_the_adapted_layers_and_still_verifies_the_whole_file(tmp_path):
    torch.manual_seed(0)
    source = get_peft_model(make_model("gpt2"), config("gpt2")).eval()
    source.add_adapter("t0", config("gpt2"))
    path = tmp_path / "bank.safetensors"
    build_bank([extract_adapter(source, name) for name in ("default", "t0")], path)  # layers 0 and 1
    on_layer_0 = config("gpt2", bank=str(path), bank_size=2, layers_to_transform=[0])
    bank = get_peft_model(make_model("gpt2"), on_layer_0).base_model.xpeft_bank
    # the bank holds layer 0's four tensors, equal to the file's, and nothing of layer 1
    file = load_file(path)
    layer_0 = {k: v for k, v in file.items() if k.startswith("transformer.h.0.")}
    held = _tensors_reachable_from(bank)
    assert sum(t.numel() for t in held.values()) == sum(t.numel() for t in layer_0.values())
    for name, parts in bank.layer_tensors().items():
        for part, tensor in parts.items():
            assert torch.equal(tensor, file[f"{name}.{part}"])
    # a corrupted tensor of the layer the model does not adapt is still caught: the whole file is verified
    metadata = dict(_metadata(path))
    file["transformer.h.1.mlp.c_proj.b"] = file["transformer.h.1.mlp.c_proj.b"] + 1
    save_file(file, path, metadata=metadata)
    with pytest.raises(ValueError, match="is corrupted"):
        get_peft_model(make_model("gpt2"), on_layer_0)
    # and a bank whose file changed after its check refuses to read more layers from it
    with pytest.raises(
        ValueError, match="changed after it was verified.*'transformer.h.1.mlp.c_proj.b' differs.*rebuild the model"
    ):
        bank.ensure_layer("transformer.h.1.mlp.c_proj", 32, torch.device("cpu"))


def _metadata(path):
    from xpeft.serialization import read_safetensors_metadata

    return read_safetensors_metadata(path)


# -- config, defaults, cost report -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bank_size": 0}, "`bank_size` must be a positive integer, got 0"),
        ({"reduction_factor": -1}, "`reduction_factor` must be a positive integer, got -1"),
        ({"mask_type": "fuzzy"}, "`mask_type` must be 'soft' or 'hard', got 'fuzzy'"),
        ({"mask_type": "hard", "hard_k": 9, "bank_size": 8}, "`hard_k` must be an integer between 1 and bank_size=8"),
        ({"non_linearity": "swish"}, "`non_linearity` must be one of"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        XPeftConfig(**kwargs)


def test_default_targets_are_ffn_outputs_and_unknown_architectures_are_refused():
    model = get_peft_model(make_model("bert"), config("bert"))
    names = [layer.layer_name for _, layer in xpeft_layers(model, "default")]
    assert names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    gpt2 = get_peft_model(make_model("gpt2"), config("gpt2"))
    assert [layer.layer_name for _, layer in xpeft_layers(gpt2, "default")] == [
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    custom = torch.nn.Sequential(torch.nn.Linear(8, 8))  # not a transformers model: model_type "custom"
    with pytest.raises(ValueError, match="no default `target_modules` for model_type 'custom'.*Pass `target_modules`"):
        get_peft_model(custom, XPeftConfig(bank_size=2, reduction_factor=4))


def test_profile_cost_report():
    model = get_peft_model(make_model("bert"), config("bert", mask_type="hard", hard_k=2))
    cost = profile_cost(model)
    d, r, layers = 32, 8, 2
    assert cost["trainable_parameters"] == 2 * layers * N
    assert cost["payload_bytes"] == math.ceil(2 * layers * N / 8)
    assert cost["bottleneck_adapter_parameters"] == layers * (2 * r * d + r + d)
    assert cost["lora_parameters"] == 2 * layers * 8 * (d + d)  # query and value, r=8
    assert cost["head_parameters"] == 2 * 32 + 2  # the seq-cls classifier saved with the profile
    assert cost["profile_file_bytes"] < cost["with_head_bytes"] < cost["bottleneck_adapter_file_bytes"]


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
@pytest.mark.parametrize("model_name", ["gpt2", "bert", "llama"])  # gpt2: LoRA's targets are Conv1D layers
def test_profile_cost_lora_baseline_equals_peft_lora_on_the_same_modules(model_name):
    from peft import LoraConfig

    cost = profile_cost(get_peft_model(make_model(model_name), config(model_name)), lora_r=8)
    # independent count: peft's own LoRA r=8 on its default targets, r * (in + out) trainable parameters per module
    lora = get_peft_model(make_model(model_name), LoraConfig(r=8, task_type=task_type(model_name)))
    expected = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert expected > 0
    assert cost["lora_parameters"] == expected
    assert cost["lora_file_bytes"] > 4 * expected


@pytest.mark.parametrize("model_name", ["llama", "bert"])  # bert has a classifier head: attached via add_adapter
def test_attached_profile_equals_the_original(model_name, tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_model(model_name), config(model_name)).eval()
    store = ProfileStore.create(tmp_path / "s.safetensors", model)
    store.add_from(model, ["default"])
    store.add({"u": store.profile("default")})  # the same profile under another name
    inputs = make_inputs(model_name)
    expected = logits(model, inputs)
    model.set_adapter(attach_profile(model, store, "u", adapter_name="twin"))
    assert model.active_adapter == "twin"
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=0)
    mixed = logits(model, inputs, adapter_names=["twin", "default", "twin"])
    torch.testing.assert_close(mixed, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter named 'twin'"):
        attach_profile(model, store, "u", adapter_name="twin")


def test_saved_random_bank_reproduces_the_random_bank_and_bank_geometry_errors(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from xpeft.x_peft import save_bank

    torch.manual_seed(0)
    model = get_peft_model(make_model("gpt2"), config("gpt2")).eval()
    path = tmp_path / "frozen.safetensors"
    save_bank(model.base_model.xpeft_bank, path)
    frozen = get_peft_model(make_model("gpt2"), config("gpt2", bank=str(path))).eval()
    with torch.no_grad():
        for (_, src), (_, dst) in zip(xpeft_layers(model, "default"), xpeft_layers(frozen, "default"), strict=True):
            dst.xpeft_mask_A["default"].copy_(src.xpeft_mask_A["default"])
            dst.xpeft_mask_B["default"].copy_(src.xpeft_mask_B["default"])
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(logits(frozen, inputs), logits(model, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no adapters for layer 'model.layers.0.mlp.down_proj'"):
        get_peft_model(make_model("llama"), config(bank=str(path)))
    wider = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ValueError, match="have d=32, layer has 64"):
        get_peft_model(wider, config("gpt2", bank=str(path)))
    with pytest.raises(ValueError, match="d=32 < reduction_factor=64.*lower `reduction_factor`"):
        get_peft_model(make_model("gpt2"), config("gpt2", reduction_factor=64))


# -- peft conformance: adapter dtype, resumable hard masks, weighted mixes -----------------------------------------


def _mask_params(model, name):
    return [p for _, layer in xpeft_layers(model, name) for p in (layer.xpeft_mask_A[name], layer.xpeft_mask_B[name])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masks_follow_peft_autocast_adapter_dtype(dtype, tmp_path):
    base = make_model("llama").to(dtype)
    model = get_peft_model(base, config(), autocast_adapter_dtype=False)
    assert {p.dtype for p in _mask_params(model, "default")} == {dtype}
    assert all(p.requires_grad for p in _mask_params(model, "default"))
    model.add_adapter("other", config(), autocast_adapter_dtype=False)
    assert {p.dtype for p in _mask_params(model, "other")} == {dtype}
    model.add_adapter("upcast", config())  # peft's default: float32 adapter weights
    assert {p.dtype for p in _mask_params(model, "upcast")} == {torch.float32}
    out = model(**make_inputs("llama")).logits
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama").to(dtype), tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for p in _mask_params(loaded, "default")} == {dtype}
    expected = [p.to(dtype) for p in _mask_params(model, "default")]
    assert all(torch.equal(p, q) for p, q in zip(_mask_params(loaded, "default"), expected, strict=True))


def _train(model, steps, inputs):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**inputs).logits.square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("save_mask_logits", [True, False])
def test_hard_profile_saved_with_its_logits_resumes_training_exactly(tmp_path, save_mask_logits):
    torch.manual_seed(0)
    cfg = config(mask_type="hard", hard_k=2, save_mask_logits=save_mask_logits)
    model = get_peft_model(make_model("llama"), cfg).train()
    inputs = make_inputs("llama")
    _train(model, 3, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    logits_key = {"base_model.model.xpeft_mask_logits"} if save_mask_logits else set()
    assert set(saved) == {"base_model.model.xpeft_masks"} | logits_key
    resumed = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True).train()
    _train(model, 3, inputs)
    _train(resumed, 3, inputs)
    same = [
        torch.equal(p, q)
        for p, q in zip(_mask_params(model, "default"), _mask_params(resumed, "default"), strict=True)
    ]
    # without the logits the selection reloads (same outputs) but training continues from 0/1 logits elsewhere
    assert all(same) if save_mask_logits else not all(same)


def test_saved_mask_logits_must_agree_with_the_config_and_the_selection(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config(mask_type="hard", hard_k=2, save_mask_logits=True))
    model.save_pretrained(tmp_path)
    file, config_file = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors = load_file(file)
    assert tensors["base_model.model.xpeft_mask_logits"].shape == (2, 2, N)
    original = config_file.read_text()
    config_file.write_text(original.replace('"save_mask_logits": true', '"save_mask_logits": false'))
    with pytest.raises(ValueError, match="holds mask logits .* but its config does not say so"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    config_file.write_text(original)
    flipped = dict(tensors)
    flipped["base_model.model.xpeft_mask_logits"] = -tensors["base_model.model.xpeft_mask_logits"]
    save_file(flipped, file, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match="do not select the adapters its 'xpeft_masks' selects: the file is corrupted"
    ):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    save_file(
        {"base_model.model.xpeft_masks": tensors["base_model.model.xpeft_masks"]}, file, metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match="says `save_mask_logits=True` but the file has no 'xpeft_mask_logits'"):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_weighted_adapter_mixes_the_composed_adapters():
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), config())
    model.add_adapter("b", config())
    model.add_adapter("c", config())
    weights = [0.5, 0.2, 0.3]
    model.add_weighted_adapter(["default", "b", "c"], weights, adapter_name="mix")
    assert model.peft_config["mix"].mask_type == "soft"
    for _, layer in xpeft_layers(model, "mix"):
        bank = layer.xpeft_bank.layer(layer.layer_name)
        mixed = layer.composed("mix")
        for part, (tensor, bank_part) in enumerate(zip(mixed, bank, strict=True)):
            masks = layer.xpeft_mask_A if part < 2 else layer.xpeft_mask_B
            # independent: each profile's adapter from its softmax weights, then the weighted sum
            manual = sum(
                w * torch.einsum("n,n...->...", torch.softmax(masks[name].double(), -1), bank_part.double())
                for w, name in zip(weights, ["default", "b", "c"], strict=True)
            )
            torch.testing.assert_close(tensor.double(), manual, rtol=1e-5, atol=1e-6)
    model.eval().set_adapter("mix")
    assert torch.isfinite(logits(model, make_inputs("llama"))).all()


def test_weighted_adapter_refusals():
    model = get_peft_model(make_model("llama"), config())
    model.add_adapter("b", config())
    model.add_adapter("h", config(mask_type="hard", hard_k=2))
    with pytest.raises(NotImplementedError, match=r"cannot mix hard-mask profiles \(h\).*Mix soft-mask profiles"):
        model.add_weighted_adapter(["default", "h"], [0.5, 0.5], adapter_name="m")
    with pytest.raises(ValueError, match=r"`weights` must be non-negative and sum to 1, got \[1.0, 1.0\]"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], adapter_name="m")
    with pytest.raises(ValueError, match=r"`weights` must be non-negative and sum to 1, got \[1.5, -0.5\]"):
        model.add_weighted_adapter(["default", "b"], [1.5, -0.5], adapter_name="m")
    with pytest.raises(ValueError, match="combination_type='linear'"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], adapter_name="m", combination_type="svd")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], adapter_name="b")
    assert "m" not in model.peft_config
    bert = get_peft_model(make_model("bert"), config("bert"))
    bert.add_adapter("b", config("bert"))
    with pytest.raises(ValueError, match=r"Cannot mix profiles with heads \(default, b have `modules_to_save`"):
        bert.add_weighted_adapter(["default", "b"], [0.5, 0.5], adapter_name="m")
