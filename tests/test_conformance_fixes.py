"""Shared peft-conformance fixes (issue 17 item 5): `layers_to_transform` on models whose default targets are a
regex, and a clear refusal of `add_weighted_adapter`, for ETHER, X-PEFT and PEDRO."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from models import ENCODER_KWARGS, make_inputs
from xpeft import EtherConfig, PedroConfig, XPeftConfig

# Three blocks, so that a filter keeping one or two of them is visible.
ENCODERS = {
    "bert": lambda: BertForSequenceClassification(BertConfig(**ENCODER_KWARGS | {"num_hidden_layers": 3})),
    "roberta": lambda: RobertaForSequenceClassification(
        RobertaConfig(**ENCODER_KWARGS | {"num_hidden_layers": 3}, max_position_embeddings=70, pad_token_id=1)
    ),
    "deberta-v2": lambda: DebertaV2ForSequenceClassification(
        DebertaV2Config(**ENCODER_KWARGS | {"num_hidden_layers": 3}, relative_attention=True, position_buckets=16)
    ),
}
BACKBONE = {"bert": "bert", "roberta": "roberta", "deberta-v2": "deberta"}
QUERY_VALUE = {"bert": ["attention.self.query", "attention.self.value"], "deberta-v2": [
    "attention.self.query_proj", "attention.self.value_proj"]}  # fmt: skip
QUERY_VALUE["roberta"] = QUERY_VALUE["bert"]

# Each method's default targets within one block, written out here (not read from the library).
METHODS = {
    "ether": (lambda **kw: EtherConfig(n_blocks=4, **kw), lambda model: QUERY_VALUE[model]),
    "x_peft": (lambda **kw: XPeftConfig(bank_size=3, reduction_factor=4, **kw), lambda model: ["output.dense"]),
    "pedro": (lambda **kw: PedroConfig(vg_rank=4, **kw), lambda model: [*QUERY_VALUE[model], "intermediate.dense"]),
}


def make_encoder(name):
    torch.manual_seed(0)
    return ENCODERS[name]().eval()


def adapted_modules(model) -> set[str]:
    return {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def expected_modules(model_name, method, layers) -> set[str]:
    suffixes = METHODS[method][1](model_name)
    return {f"{BACKBONE[model_name]}.encoder.layer.{i}.{suffix}" for i in layers for suffix in suffixes}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model_name", sorted(ENCODERS))
@pytest.mark.parametrize("layers", [[2], [0, 2]])
def test_layers_to_transform_adapts_exactly_those_layers(model_name, method, layers):
    config = METHODS[method][0](layers_to_transform=layers, task_type="SEQ_CLS")
    model = get_peft_model(make_encoder(model_name), config)
    assert adapted_modules(model) == expected_modules(model_name, method, layers)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layers_to_transform_with_layers_pattern(method):
    config = METHODS[method][0](layers_to_transform=1, layers_pattern="layer", task_type="SEQ_CLS")
    model = get_peft_model(make_encoder("bert"), config)
    assert adapted_modules(model) == expected_modules("bert", method, [1])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_layer_filtered_adapter_reloads_on_the_same_layers(method, tmp_path):
    config = METHODS[method][0](layers_to_transform=[2], task_type="SEQ_CLS", init_weights=False)
    model = get_peft_model(make_encoder("roberta"), config)
    inputs = make_inputs("roberta")
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(make_encoder("roberta"), tmp_path).eval()
    assert adapted_modules(loaded) == expected_modules("roberta", method, [2])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)


def test_layers_to_transform_outside_the_model_names_the_fix():
    # X-PEFT's default targets on BERT are a regex (the feed-forward `output.dense`, not `attention.output.dense`).
    config = XPeftConfig(bank_size=3, reduction_factor=4, layers_to_transform=[7], task_type="SEQ_CLS")
    with pytest.raises(
        ValueError,
        match=r"`layers_to_transform`=\[7\] selects none of the 3 modules that the default `target_modules`.*"
        r"Pass indices of layers the model has",
    ):
        get_peft_model(make_encoder("bert"), config)


# X-PEFT implements it for soft masks (a weighted mix of the mixing weights): tests/test_x_peft_profiles.py.
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"x_peft"}))
def test_add_weighted_adapter_is_refused_with_the_alternative(method):
    make_config = METHODS[method][0]
    model = get_peft_model(make_encoder("bert"), make_config(task_type="SEQ_CLS"))
    model.add_adapter("other", make_config(task_type="SEQ_CLS"))
    with pytest.raises(
        NotImplementedError,
        match=r"does not support `add_weighted_adapter`: its adapters are not linear .* route each sample to one "
        r"with `adapter_names=\[...\]`",
    ):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert set(model.peft_config) == {"default", "other"}
