"""X-PEFT over a bank of peft LoRA adapters: building the bank, mixing factors, merging, mixed batches, save/load.

References are independent of xpeft's code: each LoRA adapter's own peft model, and float64 dense math written here
(`W + Σ_i Σ_j wA_i wB_j s_j B_j A_i`, with each adapter's scaling `s_j` computed from its LoraConfig by hand).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification

from models import make_inputs, make_model, task_type
from xpeft import ProfileStore, XPeftConfig, attach_profile, build_bank
from xpeft.serialization import read_safetensors_metadata, tensor_fingerprint
from xpeft.x_peft.model import xpeft_layers

TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_proj"]}
PATTERN = {"bert": "value", "gpt2": "c_attn"}  # the module an adapter's alpha_pattern applies to
N = 3


def spec(model_name: str, i: int) -> dict:
    """LoraConfig arguments of adapter i: different ranks, scalings not powers of two, rslora, an alpha_pattern."""
    return [
        dict(r=2, lora_alpha=3),
        dict(r=4, lora_alpha=5, use_rslora=True),
        dict(r=3, lora_alpha=2, alpha_pattern={PATTERN[model_name]: 7}),
    ][i]


def expected_scale(model_name: str, i: int, layer_name: str) -> float:
    """peft's scaling of adapter i on `layer_name`, written out from `spec`."""
    if i == 0:
        return 3 / 2
    if i == 1:
        return 5 / math.sqrt(4)
    return 7 / 3 if layer_name.endswith(PATTERN[model_name]) else 2 / 3


def lora_model(model_name: str, i: int, **overrides):
    torch.manual_seed(100 + i)
    config = LoraConfig(
        target_modules=TARGETS[model_name], init_lora_weights=False, fan_in_fan_out=model_name == "gpt2",
        task_type=task_type(model_name), **{**spec(model_name, i), **overrides},
    )  # fmt: skip
    return get_peft_model(make_model(model_name), config).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """`adapters(model_name)`: (the N LoRA PeftModels, their saved folders), built once per model."""
    built = {}

    def get(model_name: str):
        if model_name not in built:
            models = [lora_model(model_name, i) for i in range(N)]
            folders = []
            for i, model in enumerate(models):
                folders.append(tmp_path_factory.mktemp(f"{model_name}_lora{i}"))
                model.save_pretrained(folders[-1])
            built[model_name] = models, folders
        return built[model_name]

    return get


@pytest.fixture(scope="module")
def bank(adapters, tmp_path_factory):
    """`bank(model_name)`: (path, fingerprint) of the LoRA bank built from the N saved folders."""
    built = {}

    def get(model_name: str):
        if model_name not in built:
            path = tmp_path_factory.mktemp(f"{model_name}_bank") / "bank.safetensors"
            built[model_name] = path, build_bank(adapters(model_name)[1], path)
        return built[model_name]

    return get


def xpeft_model(model_name: str, path, mask_type: str = "soft", seed: int = 0, **kwargs):
    kwargs = {"bank_size": N, "hard_k": 2, **kwargs}
    config = XPeftConfig(
        target_modules=TARGETS[model_name], bank=str(path), mask_type=mask_type, init_weights=False,
        task_type=task_type(model_name), **kwargs,
    )  # fmt: skip
    torch.manual_seed(seed)
    return get_peft_model(make_model(model_name), config).eval()


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def reference_weights(logits: torch.Tensor, mask_type: str) -> torch.Tensor:
    logits = logits.detach().double()
    if mask_type == "soft":
        e = torch.exp(logits - logits.max())
        return e / e.sum()
    picked = sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:2]
    return torch.tensor([0.5 if i in picked else 0.0 for i in range(len(logits))], dtype=torch.float64)


def lora_factors(model_name: str, models, layer_name: str):
    """Each adapter's (A_i, s_i B_i) in float64, read from its own peft model."""
    result = []
    for i, model in enumerate(models):
        layer = model.get_base_model().get_submodule(layer_name)
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        result.append((A, B * expected_scale(model_name, i, layer_name)))
    return result


def reference(model_name: str, models, profile, adapter_name: str = "default"):
    """Float64 base weights `W + B* A*` of each adapted layer, and the float64 model's logits with them."""
    mask_type = profile.peft_config[adapter_name].mask_type
    base = make_model(model_name).double()
    weights = {}
    for _, layer in xpeft_layers(profile, adapter_name):
        wA = reference_weights(layer.xpeft_mask_A[adapter_name], mask_type)
        wB = reference_weights(layer.xpeft_mask_B[adapter_name], mask_type)
        factors = lora_factors(model_name, models, layer.layer_name)
        delta = 0
        for i, (A_i, _) in enumerate(factors):
            for j, (_, B_j) in enumerate(factors):
                m = min(A_i.shape[0], B_j.shape[1])  # B* A* over the ranks both adapters have
                delta = delta + wA[i] * wB[j] * (B_j[:, :m] @ A_i[:m])
        target = base.get_submodule(layer.layer_name)
        with torch.no_grad():
            target.weight += delta.T if model_name == "gpt2" else delta  # Conv1D stores [in, out]
        weights[layer.layer_name] = target.weight.detach().clone()
    return weights, base


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_bank_holds_each_adapters_factors_scaled_and_zero_padded(model_name, adapters, bank, tmp_path):
    models, folders = adapters(model_name)
    path, fingerprint = bank(model_name)
    tensors, metadata = load_file(path), read_safetensors_metadata(path)
    assert metadata["kind"] == "lora" and metadata["bank_size"] == str(N)
    layer_names = {key.rsplit(".", 1)[0] for key in tensors}
    lora_layers = {name for name, module in models[0].get_base_model().named_modules() if hasattr(module, "lora_A")}
    assert layer_names == lora_layers and len(layer_names) == {"bert": 4, "gpt2": 6}[model_name]
    for name in layer_names:
        A, B = tensors[f"{name}.A"], tensors[f"{name}.B"]
        assert A.shape[:2] == (N, 4) and B.shape[0] == N and B.shape[2] == 4  # padded to the largest rank, 4
        for i, (A_i, B_i) in enumerate(lora_factors(model_name, models, name)):
            r = A_i.shape[0]
            torch.testing.assert_close(A[i, :r].double(), A_i, rtol=0, atol=0)
            torch.testing.assert_close(B[i, :, :r].double(), B_i, rtol=1e-6, atol=1e-7)
            assert not A[i, r:].any() and not B[i, :, r:].any()
    # the same adapters given as loaded PeftModels or (model, adapter_name) pairs make the same bank
    assert build_bank(models, tmp_path / "models.safetensors") == fingerprint
    assert build_bank([(m, "default") for m in models], tmp_path / "pairs.safetensors") == fingerprint


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_one_hot_hard_profile_is_each_lora_adapter(model_name, adapters, bank):
    models, _ = adapters(model_name)
    profile = xpeft_model(model_name, bank(model_name)[0], mask_type="hard", hard_k=1)
    inputs = make_inputs(model_name)
    for i, lora in enumerate(models):
        one_hot = torch.full((N,), -3.0)
        one_hot[i] = 3.0
        with torch.no_grad():
            for _, layer in xpeft_layers(profile, "default"):
                layer.xpeft_mask_A["default"].copy_(one_hot)
                layer.xpeft_mask_B["default"].copy_(one_hot)
        torch.testing.assert_close(logits(profile, inputs), logits(lora, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_profile_and_its_merge_match_dense_float64_reference(model_name, mask_type, adapters, bank):
    models, _ = adapters(model_name)
    profile = xpeft_model(model_name, bank(model_name)[0], mask_type=mask_type)
    inputs = make_inputs(model_name)
    weights, dense = reference(model_name, models, profile)
    expected = logits(dense, inputs)
    assert not torch.allclose(expected, logits(make_model(model_name), inputs).double(), atol=1e-3)
    assert_logits_close(logits(profile, inputs), expected)

    originals = {
        name: layer.get_base_layer().weight.detach().clone() for name, layer in xpeft_layers(profile, "default")
    }
    profile.merge_adapter()
    for _, layer in xpeft_layers(profile, "default"):
        assert layer.merged
        torch.testing.assert_close(
            layer.get_base_layer().weight.double(), weights[layer.layer_name], rtol=0, atol=1e-6
        )
    assert_logits_close(logits(profile, inputs), expected)
    profile.unmerge_adapter()
    for name, layer in xpeft_layers(profile, "default"):
        torch.testing.assert_close(layer.get_base_layer().weight, originals[name], rtol=0, atol=1e-6)
    assert_logits_close(logits(profile, inputs), expected)

    merged = profile.merge_and_unload(safe_merge=True)
    assert type(merged) is type(make_model(model_name))
    for name, weight in weights.items():
        torch.testing.assert_close(merged.get_submodule(name).weight.double(), weight, rtol=0, atol=1e-6)
    assert_logits_close(logits(merged, inputs), expected)


def test_unmerge_subtracts_what_merge_added_even_after_the_masks_change(bank):
    profile = xpeft_model("gpt2", bank("gpt2")[0])
    layers = xpeft_layers(profile, "default")
    originals = [layer.get_base_layer().weight.detach().clone() for _, layer in layers]
    profile.merge_adapter()
    with torch.no_grad():
        for _, layer in layers:
            layer.xpeft_mask_A["default"].mul_(-4)  # another B* A*: recomputing from the live masks would be wrong
    profile.unmerge_adapter()
    for (_, layer), original in zip(layers, originals, strict=True):
        torch.testing.assert_close(layer.get_base_layer().weight, original, rtol=0, atol=1e-6)


def test_safe_merge_refuses_non_finite_weights_and_leaves_them(bank):
    profile = xpeft_model("gpt2", bank("gpt2")[0])
    _, layer = xpeft_layers(profile, "default")[0]
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.xpeft_mask_A["default"][0] = float("nan")
    with pytest.raises(ValueError, match="gives non-finite weights; the base weights are left unchanged. Check the"):
        profile.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_mixed_batch_matches_each_profile_alone(adapters, bank):
    models, _ = adapters("gpt2")
    profile = xpeft_model("gpt2", bank("gpt2")[0])
    torch.manual_seed(5)
    profile.add_adapter("other", profile.peft_config["default"])
    inputs = make_inputs("gpt2", batch=3)
    names = ["other", "__base__", "default"]
    mixed = logits(profile, inputs, adapter_names=names)
    expected = {"__base__": logits(make_model("gpt2"), inputs)}
    for name in ("default", "other"):
        profile.set_adapter(name)
        expected[name] = logits(profile, inputs)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)
    # against the dense reference as well: the "other" row mixes the bank with the other profile's masks
    _, dense = reference("gpt2", models, profile, "other")
    assert_logits_close(mixed[0], logits(dense, inputs)[0])
    profile.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` while adapters are merged"):
        logits(profile, inputs, adapter_names=names)


def test_profile_over_a_lora_bank_saves_and_loads(bank, tmp_path):
    path, fingerprint = bank("bert")
    profile = xpeft_model("bert", path)
    inputs = make_inputs("bert")
    profile.save_pretrained(tmp_path / "profile")
    assert json.loads((tmp_path / "profile" / "adapter_config.json").read_text())["bank_fingerprint"] == fingerprint
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path / "profile").eval()
    torch.testing.assert_close(logits(loaded, inputs), logits(profile, inputs), rtol=0, atol=0)
    assert loaded.base_model.mergeable and loaded.base_model.xpeft_bank.kind == "lora"


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_a_profile_store_over_a_lora_bank_returns_bit_identical_profiles(bank, tmp_path, mask_type):
    """Many profiles over a LoRA bank in one `ProfileStore`: each attached copy (masks and trained head) gives exactly
    the logits of the profile it was stored from, in one mixed batch with the originals."""
    path, _ = bank("bert")
    model = xpeft_model("bert", path, mask_type=mask_type)  # profile "default", random masks (init_weights=False)
    model.add_adapter("bob", copy.deepcopy(model.peft_config["default"]))  # its own random masks
    with torch.no_grad():
        for name in ("default", "bob"):  # distinct trained heads, so that the head must come along
            model.get_base_model().classifier.modules_to_save[name].weight.normal_()
    store = ProfileStore.create(tmp_path / "store.safetensors", model)
    store.add_from(model, ["default", "bob"])
    for name in ("default", "bob"):
        attach_profile(model, ProfileStore(tmp_path / "store.safetensors"), name, adapter_name=f"{name}_stored")
    inputs = make_inputs("bert", batch=2)
    quadrupled = {key: torch.cat([value] * 4) for key, value in inputs.items()}
    names = ["default"] * 2 + ["bob"] * 2 + ["default_stored"] * 2 + ["bob_stored"] * 2
    mixed = logits(model.eval(), quadrupled, adapter_names=names)
    assert torch.equal(mixed[:4], mixed[4:])
    assert not torch.allclose(mixed[:2], mixed[2:4], atol=1e-3)  # the two profiles differ


def test_the_fingerprint_covers_the_bank_kind(bank, tmp_path):
    path, fingerprint = bank("bert")
    tensors, metadata = load_file(path), read_safetensors_metadata(path)
    assert fingerprint != tensor_fingerprint(tensors)  # the kind is hashed with the tensors
    relabelled = tmp_path / "relabelled.safetensors"
    save_file(tensors, relabelled, metadata={**metadata, "kind": "bottleneck"})
    with pytest.raises(ValueError, match=r"is corrupted: its tensors \(kind 'bottleneck'\) hash to"):
        xpeft_model("bert", relabelled)
    save_file(tensors, relabelled, metadata={**metadata, "kind": "prefix"})
    with pytest.raises(ValueError, match="records kind 'prefix', which this xpeft does not know.*upgrade xpeft"):
        xpeft_model("bert", relabelled)


def test_a_bottleneck_bank_file_without_a_kind_is_a_bottleneck_bank(tmp_path):
    source = get_peft_model(make_model("gpt2"), XPeftConfig(bank_size=2, reduction_factor=4))
    tensors = {
        f"{name}.{part}": t for name, parts in source.base_model.xpeft_bank.layer_tensors().items()
        for part, t in parts.items()
    }  # fmt: skip
    path = tmp_path / "old.safetensors"
    fingerprint = tensor_fingerprint(tensors)
    save_file(tensors, path, metadata={"format": "xpeft-bank/v1", "fingerprint": fingerprint, "bank_size": "2"})
    model = get_peft_model(make_model("gpt2"), XPeftConfig(bank=str(path), bank_size=2, reduction_factor=4))
    assert model.base_model.xpeft_bank.kind == "bottleneck" and not model.base_model.mergeable
    assert model.peft_config["default"].bank_fingerprint == fingerprint
    with pytest.raises(ValueError, match="cannot be merged into the base weights: the bottleneck"):
        model.merge_and_unload()


def _bert_hidden_48():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_labels=2
    )
    return BertForSequenceClassification(config).eval()


def _saved(tmp_path, name, model, config):
    get_peft_model(model, config).save_pretrained(tmp_path / name)
    return tmp_path / name


REFUSALS = [
    ("dora", lambda t, good: [good, _saved(t, "d", make_model("bert"), LoraConfig(target_modules=["query", "value"], use_dora=True))],  # noqa: E501
     r"uses DoRA .*`use_dora=True`.*its effect is not `scaling · B A x`.*Pass plain LoRA adapters, trained without `use_dora`"),  # noqa: E501
    ("lora_bias", lambda t, good: [good, _saved(t, "b", make_model("bert"), LoraConfig(target_modules=["query", "value"], lora_bias=True))],  # noqa: E501
     "uses a bias on lora_B .*Pass plain LoRA adapters, trained without `lora_bias`"),
    ("base_bias", lambda t, good: [good, _saved(t, "a", make_model("bert"), LoraConfig(target_modules=["query", "value"], bias="all"))],  # noqa: E501
     "trains base-layer biases .*bias='all'.*Pass LoRA adapters trained with `bias='none'`"),
    ("other_targets", lambda t, good: [good, _saved(t, "o", make_model("bert"), LoraConfig(target_modules=["query", "key"]))],  # noqa: E501
     r"adapt different modules \(only in 0: .*value.*only in 1: .*key.*target the same modules"),
    ("other_sizes", lambda t, good: [good, _saved(t, "s", _bert_hidden_48(), LoraConfig(target_modules=["query", "value"]))],  # noqa: E501
     r"disagree on the \(in, out\) size of layer .*adapter 0: \(32, 32\), adapter 1: \(48, 48\).*same base model"),
    ("embedding", lambda t, good: [_saved(t, "e", make_model("bert"), LoraConfig(target_modules=["word_embeddings"]))],  # noqa: E501
     r"adapts an embedding .*Pass adapters whose `target_modules` are linear layers"),
    ("not_lora", lambda t, good: [_saved(t, "i", make_model("bert"), IA3Config(target_modules=["query"], feedforward_modules=[]))],  # noqa: E501
     r"is a 'IA3' adapter, not LoRA; `build_bank` takes peft LoRA adapters"),
    ("not_an_adapter_folder", lambda t, good: [t],
     "has no adapter_config.json, so it is not a saved peft adapter"),
    ("unknown_name", lambda t, good: [(lora_model("bert", 0), "nope")],
     r"has no adapter named 'nope'; its adapters are \['default'\]"),
    ("mixed_kinds", lambda t, good: [{"layer": {}}, good],
     "got bottleneck adapters .* and LoRA adapters .* together; a bank holds one kind"),
    ("not_an_adapter", lambda t, good: [good, 3],
     "Adapter 1 is a int; `build_bank` takes LoRA adapters as a saved folder"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "match"), [pytest.param(*case[1:], id=case[0]) for case in REFUSALS])
def test_unsuitable_lora_adapters_are_refused(make, match, adapters, tmp_path):
    good = adapters("bert")[1][0]
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        build_bank(make(tmp_path, good), tmp_path / "bank.safetensors")
    assert not (tmp_path / "bank.safetensors").exists()


def test_an_extracted_profile_is_a_lora_adapter_for_a_new_bank(bank, tmp_path):
    from xpeft.x_peft import extract_adapter

    profile = xpeft_model("gpt2", bank("gpt2")[0])
    factors = extract_adapter(profile)
    assert all(set(parts) == {"A", "B"} for parts in factors.values())
    path = tmp_path / "from_profile.safetensors"
    build_bank([factors], path)
    assert read_safetensors_metadata(path)["kind"] == "lora"
    single = xpeft_model("gpt2", path, bank_size=1)  # one adapter: the mixing weight is 1 whatever the logits
    inputs = make_inputs("gpt2")
    torch.testing.assert_close(logits(single, inputs), logits(profile, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_training_over_a_lora_bank_moves_only_the_masks_and_lowers_the_loss(mask_type, bank):
    profile = xpeft_model("gpt2", bank("gpt2")[0], mask_type=mask_type)  # eval mode: no dropout noise in the loss
    trainable = {name for name, p in profile.named_parameters() if p.requires_grad}
    assert trainable and all("xpeft_mask_" in name for name in trainable)
    inputs = make_inputs("gpt2")
    optimizer = torch.optim.Adam([p for p in profile.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(15):
        loss = profile(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in profile.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.005, losses


def test_half_precision_model_merges_over_a_lora_bank(bank):
    profile = xpeft_model("gpt2", bank("gpt2")[0]).to(torch.bfloat16)
    inputs = make_inputs("gpt2")
    unmerged = logits(profile, inputs)
    profile.merge_adapter()
    assert xpeft_layers(profile, "default")[0][1].get_base_layer().weight.dtype == torch.bfloat16
    merged = logits(profile, inputs)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged.float(), unmerged.float(), rtol=0.05, atol=0.05)


def test_a_profile_over_a_lora_bank_targets_the_banks_layers_by_default(bank, adapters):
    path, _ = bank("bert")
    explicit = xpeft_model("bert", path)
    torch.manual_seed(0)
    config = XPeftConfig(bank=str(path), bank_size=N, init_weights=False, task_type="SEQ_CLS")
    default = get_peft_model(make_model("bert"), config).eval()
    names = [layer.layer_name for _, layer in xpeft_layers(default, "default")]
    assert names == [layer.layer_name for _, layer in xpeft_layers(explicit, "default")] and len(names) == 4
    inputs = make_inputs("bert")
    torch.testing.assert_close(logits(default, inputs), logits(explicit, inputs), rtol=0, atol=0)
