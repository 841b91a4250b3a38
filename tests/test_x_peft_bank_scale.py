"""`bank_init_scale` of random X-PEFT banks (issue 17, item 3): checks, fingerprint, legacy profiles, and the effect
of the scale against float64 math on the unscaled bank."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

from models import make_inputs, make_model
from xpeft import XPeftConfig
from xpeft.serialization import recipe_fingerprint
from xpeft.x_peft.bank import save_bank
from xpeft.x_peft.model import xpeft_layers

N, R = 6, 4


def build(mask_type="soft", seed=0, **kwargs):
    kwargs.setdefault("hard_k", 2)
    config = XPeftConfig(
        task_type="SEQ_CLS", bank_size=N, reduction_factor=R, mask_type=mask_type, init_weights=False, **kwargs
    )
    torch.manual_seed(seed)
    return get_peft_model(make_model("bert"), config).eval()


def bank(model):
    return model.base_model.xpeft_bank


# -- the field ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1.0, 0.0, 1000.5, math.nan, math.inf, True, "10"])
def test_bad_scales_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"`bank_init_scale` must be a number in \(0, 1000\]"):
        XPeftConfig(bank_init_scale=value)


def test_an_unset_scale_is_the_new_default_in_code_and_the_legacy_one_in_a_saved_dict():
    assert XPeftConfig().bank_init_scale == XPeftConfig(bank_init_scale=None).bank_init_scale == 10.0
    saved = XPeftConfig().to_dict()
    assert XPeftConfig(**saved).bank_init_scale == 10.0  # saved with the field: kept
    del saved["bank_init_scale"]
    assert XPeftConfig(**saved).bank_init_scale == 1.0  # saved before the field existed


def test_an_integer_scale_is_stored_as_a_float():
    config = XPeftConfig(bank_init_scale=3)
    assert config.bank_init_scale == 3.0 and isinstance(config.bank_init_scale, float)


# -- fingerprint and legacy profiles ----------------------------------------------------------------------------------
def legacy_recipe(model) -> dict:
    """The random-bank recipe as written before the field existed (xpeft's bank.py at 89fcbd6), by hand."""
    return {
        "kind": "random",
        "generator": "xpeft-random-bank/v1",
        "seed": 0,
        "bank_size": N,
        "reduction_factor": R,
        "non_linearity": "relu",
        "dtype": "float32",
        "layers": [[name, d, d // R] for name, d in sorted(bank(model).layer_sizes())],
    }


def test_scale_one_keeps_the_legacy_fingerprint_and_any_other_scale_changes_it():
    legacy = build(bank_init_scale=1.0)
    assert bank(legacy).fingerprint == recipe_fingerprint(legacy_recipe(legacy))
    scaled = build(bank_init_scale=3.0)
    assert bank(scaled).fingerprint != bank(legacy).fingerprint
    assert bank(scaled).fingerprint == recipe_fingerprint({**legacy_recipe(legacy), "init_scale": 3.0})


def test_a_profile_is_refused_against_a_bank_of_another_scale(tmp_path):
    build(bank_init_scale=3.0).save_pretrained(tmp_path)
    config = XPeftConfig.from_pretrained(tmp_path)
    assert config.bank_init_scale == 3.0
    config.bank_init_scale = 1.0
    with pytest.raises(ValueError, match="bank_init_scale=1"):
        PeftModel.from_pretrained(make_model("bert"), tmp_path, config=config)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_a_config_saved_without_the_field_loads_the_legacy_bank_bit_for_bit(tmp_path, mask_type):
    model = build(mask_type, bank_init_scale=1.0)
    inputs = make_inputs("bert")
    with torch.no_grad():
        expected = model(**inputs).logits
    legacy_tensors = {name: [t.clone() for t in bank(model).layer(name)] for name in bank(model).layer_names()}
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["bank_init_scale"]  # as written before the field existed
    config_file.write_text(json.dumps(saved))
    assert XPeftConfig().bank_init_scale != 1.0, "the test needs a default that differs from the legacy scale"

    # peft's generic loader (what transformers' `load_adapter` calls) bypasses XPeftConfig.from_pretrained: same result
    assert PeftConfig.from_pretrained(tmp_path).bank_init_scale == 1.0
    assert XPeftConfig(**{**saved, "bank_init_scale": 3.0}).bank_init_scale == 3.0  # a saved value is kept
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path).eval()
    assert loaded.peft_config["default"].bank_init_scale == 1.0
    assert loaded.peft_config["default"].bank_fingerprint == saved["bank_fingerprint"]
    for name, tensors in legacy_tensors.items():
        assert all(torch.equal(a, b) for a, b in zip(bank(loaded).layer(name), tensors, strict=True))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_a_bank_file_ignores_the_scale(tmp_path):
    path = tmp_path / "bank.safetensors"
    fingerprint = save_bank(bank(build(bank_init_scale=3.0)), path)
    models = [build(bank=str(path), bank_init_scale=scale) for scale in (1.0, 10.0)]
    assert {bank(m).fingerprint for m in models} == {fingerprint}
    for name in bank(models[0]).layer_names():
        assert all(
            torch.equal(a, b) for a, b in zip(bank(models[0]).layer(name), bank(models[1]).layer(name), strict=True)
        )


# -- the effect of the scale, against float64 math on the unscaled bank -----------------------------------------------
def mixing_weights(logits: torch.Tensor, mask_type: str, k: int) -> torch.Tensor:
    logits = logits.double()
    if mask_type == "soft":
        e = torch.exp(logits - logits.max())
        return e / e.sum()
    mask = torch.zeros_like(logits)
    mask[sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:k]] = 1.0 / k
    return mask


def residuals_float64(model, unscaled, scale: float, mask_type: str, inputs) -> dict[str, torch.Tensor]:
    """Each adapted layer's residual `s · (B f(A h + a) + b)`, with A, a, B, b composed in float64 from the unscaled
    bank's tensors and `model`'s mask logits, on the layer outputs h of the float64 base model (the model's own
    adapted layer outputs follow an adapted upstream, so the reference runs the adapted model in float64 too)."""
    base = make_model("bert").double()
    modules = dict(base.named_modules())
    residuals, handles = {}, []
    for _, layer in xpeft_layers(model, "default"):
        A, a, B, b = (t.double() for t in bank(unscaled).layer(layer.layer_name))
        wA = mixing_weights(layer.xpeft_mask_A["default"].detach(), mask_type, 2)
        wB = mixing_weights(layer.xpeft_mask_B["default"].detach(), mask_type, 2)
        A_s, a_s = torch.einsum("i,ird->rd", wA, A), wA @ a
        B_s, b_s = torch.einsum("i,idr->dr", wB, B), wB @ b

        def hook(module, args, h, name=layer.layer_name, A_s=A_s, a_s=a_s, B_s=B_s, b_s=b_s):
            delta = scale * (torch.relu(h @ A_s.T + a_s) @ B_s.T + b_s)
            residuals[name] = delta
            return h + delta

        handles.append(modules[layer.layer_name].register_forward_hook(hook))
    with torch.no_grad():
        residuals["logits"] = base(**inputs).logits
    for handle in handles:
        handle.remove()
    return residuals


def model_residuals(model, inputs) -> dict[str, torch.Tensor]:
    residuals, handles = {}, []
    for _, layer in xpeft_layers(model, "default"):

        def hook(module, args, output, name=layer.layer_name):
            residuals[name] = (output - module.base_layer(*args)).double()

        handles.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        residuals["logits"] = model(**inputs).logits.double()
    for handle in handles:
        handle.remove()
    return residuals


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
@pytest.mark.parametrize("scale", [0.5, 10.0])
def test_scaled_bank_adds_scale_times_the_unscaled_residual(mask_type, scale):
    inputs = make_inputs("bert")
    unscaled = build(mask_type, bank_init_scale=1.0)
    model = build(mask_type, bank_init_scale=scale)
    got, expected = model_residuals(model, inputs), residuals_float64(model, unscaled, scale, mask_type, inputs)
    assert set(got) == set(expected) and len(got) > 1
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("mask_type", ["soft", "hard"])
def test_residual_to_output_ratio_at_init_grows_by_the_scale(mask_type):
    """The quantity the benchmark reports (‖Δ‖/‖h‖ per layer), on the first layer, whose input the adapters upstream
    cannot change: exactly `scale` times that of the unscaled bank."""
    inputs = make_inputs("bert")
    ratios = {}
    for scale in (1.0, 7.0):
        model = build(mask_type, bank_init_scale=scale)
        first = xpeft_layers(model, "default")[0][1]
        seen = {}

        def hook(module, args, output, seen=seen):
            h = module.base_layer(*args).double()
            seen["ratio"] = float((output.double() - h).norm() / h.norm())

        handle = first.register_forward_hook(hook)
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        ratios[scale] = seen["ratio"]
    assert ratios[1.0] > 0
    assert ratios[7.0] == pytest.approx(7.0 * ratios[1.0], rel=1e-4)
