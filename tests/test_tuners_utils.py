"""Shared mixed-batch routing (xpeft.tuners_utils) through `generate`, on the test-only tuner."""

import pytest
from peft import get_peft_model
from transformers import GenerationConfig

import dummy_tuner
from contract import ContractSuite, each_sample_alone
from models import make_inputs, make_model


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
