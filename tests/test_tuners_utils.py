"""Shared mixed-batch routing (xpeft.tuners_utils) through `generate`, on the test-only tuner."""

import pytest
from peft import get_peft_model
from torch import nn
from transformers import GenerationConfig

import dummy_tuner
import xpeft
from contract import ContractSuite, each_sample_alone
from models import make_inputs, make_model
from xpeft.tuners_utils import CONV_LAYER_TYPES, SUPPORTED_LAYER_TYPES, layer_features


def two_adapter_llama():
    suite = ContractSuite()
    model = get_peft_model(make_model("llama"), dummy_tuner.DummyConfig(target_modules=["q_proj", "up_proj"]))
    suite.perturb(model, "default", seed=1)
    model.add_adapter("other", dummy_tuner.DummyConfig(target_modules=["q_proj", "up_proj"]))
    suite.perturb(model, "other", seed=2)
    return model.eval()


def generate(model, inputs, **kwargs):
    return model.generate(**inputs, **kwargs)


@pytest.mark.parametrize("how", ["keyword", "generation_config"])
def test_beam_search_repeats_each_sample_name(how):
    model = two_adapter_llama()
    inputs = {"input_ids": make_inputs("llama")["input_ids"][:, :6]}
    names = ["other", "__base__", "default"]
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    kwargs = settings if how == "keyword" else {"generation_config": GenerationConfig(**settings)}
    mixed = model.generate(**inputs, adapter_names=names, **kwargs)
    assert mixed.equal(each_sample_alone(model, inputs, names, run=generate, **settings))


def test_wrong_number_of_names_names_the_fix():
    model = two_adapter_llama()
    inputs = make_inputs("llama")
    with pytest.raises(ValueError, match=r"has 2 entries but the batch has 3 rows; pass exactly one adapter name"):
        model(**inputs, adapter_names=["default", "other"])


# Two configs per method whose target modules differ, so the second adapter wraps modules the first did not.
SECOND_ADAPTER_CONFIGS = {
    "dummy": lambda layers: dummy_tuner.DummyConfig(target_modules=layers),
    "ether": lambda layers: xpeft.EtherConfig(target_modules=layers, n_blocks=4),
    "x_peft": lambda layers: xpeft.XPeftConfig(target_modules=layers, bank_size=2),
    "pedro": lambda layers: xpeft.PedroConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=layers,
                                              layers_pattern="layers"),
}  # fmt: skip
FIRST_TARGETS = {"pedro": [0]}
SECOND_TARGETS = {"pedro": [1]}


@pytest.mark.parametrize("method", sorted(SECOND_ADAPTER_CONFIGS))
def test_added_adapter_on_new_modules_is_frozen_until_selected(method):
    make = SECOND_ADAPTER_CONFIGS[method]
    model = get_peft_model(make_model("llama"), make(FIRST_TARGETS.get(method, ["q_proj"])))
    before = {name for name, _ in model.named_modules()}
    model.add_adapter("other", make(SECOND_TARGETS.get(method, ["k_proj"])))
    new_modules = {name for name, _ in model.named_modules()} - before
    other = [p for name, p in model.named_parameters() if ".other" in name]
    assert new_modules and other, "the second adapter should wrap modules of its own"
    assert not any(p.requires_grad for p in other)
    model.set_adapter("other")
    assert all(p.requires_grad for p in other)


def test_convolutions_are_for_ether_only():
    """`layer_features` keeps refusing convolutions for X-PEFT and PEDRO (only ETHER passes `supported` with them)."""
    only_linear = r"supported layer types are `torch.nn.modules.linear.Linear`, `transformers.pytorch_utils.Conv1D`\."
    with pytest.raises(TypeError, match=r"X-PEFT cannot adapt a layer of type `Conv2d`; " + only_linear):
        get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3)), xpeft.XPeftConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match=r"PEDRO cannot adapt a layer of type `Conv1d`; " + only_linear):
        layer_features(nn.Conv1d(4, 4, 3), "PEDRO")
    assert layer_features(nn.Conv2d(4, 6, 3, groups=2), "ETHER", SUPPORTED_LAYER_TYPES + CONV_LAYER_TYPES) == (
        18,
        6,
        False,
    )


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize(
    "config",
    [
        lambda: xpeft.EtherConfig(target_modules=["out_proj"], n_blocks=2),
        lambda: xpeft.XPeftConfig(target_modules=["out_proj"]),
    ],
)
def test_multihead_attention_out_proj_is_refused(config):
    """`nn.MultiheadAttention` reads `out_proj.weight` itself and never calls `out_proj`: an adapter there would be
    silently ignored, so it is refused with the fix (PEDRO finds its layers by model type, through the same check)."""
    refused = r"cannot adapt the `out_proj` of an `nn.MultiheadAttention`.*exclude_modules"
    with pytest.raises(TypeError, match=refused):
        get_peft_model(SelfAttention(), config())
    with pytest.raises(TypeError, match="PEDRO " + refused):
        layer_features(SelfAttention().attn.out_proj, "PEDRO")
