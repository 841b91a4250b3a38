"""X-PEFT's `placement='pfeiffer'` against an independent float64 re-implementation of BertOutput + a Pfeiffer adapter.

AdapterHub's Pfeiffer adapter (`SeqBnConfig`: original_ln_before, original_ln_after, residual_before_ln=True,
adapter_residual_before_ln=False) on BERT's `BertOutput` (`LayerNorm(dropout(dense(x)) + input_tensor)`), in eval mode:
`h = dense(x)`, `z = LN(h + r)`, `y = LN(h + B relu(A z + a) + b + r)`. The reference below writes that out with
explicit sums and its own LayerNorm, in float64.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from models import make_inputs, make_model, task_type
from xpeft import XPeftConfig, build_bank
from xpeft.x_peft.model import xpeft_layers

N, K = 5, 2


def build(model_name: str = "bert", mask_type: str = "soft", seed: int = 0, **kwargs):
    kwargs = {"placement": "pfeiffer", "bank_size": N, "reduction_factor": 4, **kwargs}
    config = XPeftConfig(mask_type=mask_type, hard_k=K, init_weights=False, task_type=task_type(model_name), **kwargs)
    torch.manual_seed(seed)
    return get_peft_model(make_model(model_name), config).eval()


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def mixing_weights(logits: torch.Tensor, mask_type: str) -> torch.Tensor:
    logits = logits.detach().double()
    if mask_type == "soft":
        e = torch.exp(logits - logits.max())
        return e / e.sum()
    picked = sorted(range(len(logits)), key=lambda i: -float(logits[i]))[:K]
    return torch.tensor([1 / K if i in picked else 0.0 for i in range(len(logits))], dtype=torch.float64)


def layer_norm(v: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


class PfeifferBertOutput(nn.Module):
    """BertOutput followed by a Pfeiffer adapter, as AdapterHub composes them (eval mode: dropout is the identity)."""

    def __init__(self, output: nn.Module, adapter: tuple[torch.Tensor, ...]):
        super().__init__()
        self.output, self.adapter = output, adapter

    def forward(self, hidden_states, input_tensor):
        dense, norm = self.output.dense, self.output.LayerNorm
        A, a, B, b = self.adapter
        h = hidden_states @ dense.weight.T + dense.bias
        z = layer_norm(h + input_tensor, norm)  # pre_forward: original_ln_before; the residual kept is h
        up = torch.clamp(z @ A.T + a, min=0) @ B.T + b
        return layer_norm(up + h + input_tensor, norm)  # post_forward: original_ln_after


def reference_logits(profile, model_name: str, mask_type: str, inputs, adapter_name: str = "default"):
    base = make_model(model_name).double()
    for _, layer in xpeft_layers(profile, adapter_name):
        A, a, B, b = (t.double() for t in layer.xpeft_bank.layer(layer.layer_name))
        wA = mixing_weights(layer.xpeft_mask_A[adapter_name], mask_type)
        wB = mixing_weights(layer.xpeft_mask_B[adapter_name], mask_type)
        composed = (
            sum(wA[i] * A[i] for i in range(N)), sum(wA[i] * a[i] for i in range(N)),
            sum(wB[j] * B[j] for j in range(N)), sum(wB[j] * b[j] for j in range(N)),
        )  # fmt: skip
        parent_name, child = layer.layer_name.rsplit(".", 1)
        parent = base.get_submodule(parent_name)
        setattr(parent, child, PfeifferBertOutput(getattr(parent, child), composed))
    with torch.no_grad():
        return base(**inputs).logits


@pytest.mark.parametrize(
    ("model_name", "mask_type"), [("bert", "soft"), ("bert", "hard"), ("roberta", "soft"), ("deberta-v2", "soft")]
)
def test_pfeiffer_placement_matches_dense_float64_reference(model_name, mask_type):
    profile = build(model_name, mask_type)
    names = [layer.layer_name for _, layer in xpeft_layers(profile, "default")]
    prefix = {"bert": "bert", "roberta": "roberta", "deberta-v2": "deberta"}[model_name]
    assert names == [f"{prefix}.encoder.layer.{i}.output" for i in range(2)]  # the block output modules
    inputs = make_inputs(model_name)
    expected = reference_logits(profile, model_name, mask_type, inputs)
    assert not torch.allclose(expected, logits(make_model(model_name), inputs).double(), atol=1e-3)
    torch.testing.assert_close(logits(profile, inputs).double(), expected, rtol=1e-4, atol=1e-5)


def test_pfeiffer_reference_differs_from_the_ffn_output_data_flow():
    """The reference is not today's placement: the same adapters read LN(h + r) instead of h."""
    profile = build()
    inputs = make_inputs("bert")
    base = make_model("bert").double()
    for _, layer in xpeft_layers(profile, "default"):
        A, a, B, b = (t.double()[0] for t in layer.xpeft_bank.layer(layer.layer_name))
        dense = base.get_submodule(layer.layer_name).dense
        dense.register_forward_hook(lambda m, args, h, A=A, a=a, B=B, b=b: h + torch.relu(h @ A.T + a) @ B.T + b)
    with torch.no_grad():
        ffn_output = base(**inputs).logits
    with torch.no_grad():
        for _, layer in xpeft_layers(profile, "default"):
            one_hot = torch.tensor([9.0] + [0.0] * (N - 1))
            layer.xpeft_mask_A["default"].copy_(one_hot)
            layer.xpeft_mask_B["default"].copy_(one_hot)
    expected = reference_logits(profile, "bert", "soft", inputs)
    assert (expected - ffn_output).abs().max() > 1e-2


def test_disabled_mixed_and_base_rows():
    profile = build()
    torch.manual_seed(3)
    profile.add_adapter("other", profile.peft_config["default"])
    inputs = make_inputs("bert")
    base = logits(make_model("bert"), inputs)
    with profile.disable_adapter():
        torch.testing.assert_close(logits(profile, inputs), base, rtol=0, atol=0)
    names = ["other", "__base__", "default"]
    mixed = logits(profile, inputs, adapter_names=names)
    expected = {"__base__": base}
    for name in ("default", "other"):
        profile.set_adapter(name)
        expected[name] = logits(profile, inputs)
        torch.testing.assert_close(
            expected[name].double(), reference_logits(profile, "bert", "soft", inputs, name), rtol=1e-4, atol=1e-5
        )
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5)


def test_profile_with_pfeiffer_placement_saves_and_loads(tmp_path):
    from peft import PeftModel

    profile = build()
    inputs = make_inputs("bert")
    profile.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path).eval()
    assert loaded.peft_config["default"].placement == "pfeiffer"
    torch.testing.assert_close(logits(loaded, inputs), logits(profile, inputs), rtol=0, atol=0)


def test_default_placement_is_the_ffn_output_projection():
    config = XPeftConfig(bank_size=N, reduction_factor=4, task_type="SEQ_CLS")
    assert config.placement == "ffn_output"
    model = get_peft_model(make_model("bert"), config)
    assert [layer.layer_name for _, layer in xpeft_layers(model, "default")] == [
        f"bert.encoder.layer.{i}.output.dense" for i in range(2)
    ]


def test_pfeiffer_placement_refusals(tmp_path):
    with pytest.raises(ValueError, match="`placement` must be 'ffn_output' or 'pfeiffer', got 'houlsby'"):
        XPeftConfig(placement="houlsby")
    with pytest.raises(ValueError, match="placement='pfeiffer' has no default `target_modules` for model_type 'gpt2'"):
        build("gpt2")
    with pytest.raises(
        TypeError, match="adapts a BERT-style block output module .*got a Conv1D.*placement='ffn_output'"
    ):
        build("gpt2", target_modules=["c_proj"])
    # all profiles of a model share one placement, whichever comes first
    ffn = get_peft_model(make_model("bert"), XPeftConfig(bank_size=N, reduction_factor=4, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="`dense` of the block output module is already adapted.*share one placement"):
        ffn.add_adapter("p", XPeftConfig(bank_size=N, reduction_factor=4, placement="pfeiffer"))
    pfeiffer = build()
    with pytest.raises(ValueError, match="placement='ffn_output', but the model's X-PEFT layers have placement='pf"):
        pfeiffer.add_adapter("f", XPeftConfig(bank_size=N, reduction_factor=4))


def test_pfeiffer_placement_refuses_a_lora_bank(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(make_model("bert"), LoraConfig(target_modules=["dense"], init_lora_weights=False))
    build_bank([lora], tmp_path / "bank.safetensors")
    with pytest.raises(
        ValueError, match="placement='pfeiffer' places a bottleneck adapter; this model's bank is a lora"
    ):
        build(bank=str(tmp_path / "bank.safetensors"), bank_size=1, target_modules=r".*\.layer\.\d+\.output")
