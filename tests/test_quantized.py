"""ETHER, ETHER+, X-PEFT and PEDRO on quantized base layers (bitsandbytes 8-/4-bit, torchao int8 weight-only,
optimum-quanto qint8), each against an fp32 twin: the same tiny Llama whose quantized layers are plain `nn.Linear`s
holding the dequantized weights. The twin computes what the quantized layer computes up to its kernel's arithmetic,
so forward and gradients must agree to float32 rounding, not to quantization error.

Tolerance: logits and gradients agree within 1e-5 relative to their largest entry (measured: at most 1.2e-6; on CPU
every library dequantizes the weight and runs a float matmul).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from models import make_inputs, make_model
from xpeft import EtherConfig, PedroConfig, XPeftConfig
from xpeft.quantization import ROUNDING_WARNING, is_quantized, merge_weight

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LIBRARIES = ("bnb_8bit", "bnb_4bit", "torchao", "quanto")
TOLERANCE = 1e-5  # relative to the largest entry (see the module docstring)
METHODS = {
    "ether": dict(cls=EtherConfig, n_blocks=4, variant="ether", target_modules=["q_proj", "v_proj", "down_proj"]),
    "ether_plus": dict(cls=EtherConfig, n_blocks=4, variant="ether_plus", target_modules=["q_proj", "up_proj"]),
    "ether_plus_one_sided": dict(
        cls=EtherConfig, n_blocks=2, variant="ether_plus_one_sided", target_modules=["v_proj", "o_proj"]
    ),
}


def _library(name: str):
    module = {"bnb_8bit": "bitsandbytes", "bnb_4bit": "bitsandbytes", "torchao": "torchao", "quanto": "optimum.quanto"}
    return pytest.importorskip(module[name], reason=f"{module[name]} is not installed (pip install -e '.[quant]')")


def _replace_linears(model: nn.Module, make) -> None:
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in QUANTIZED and type(child) is nn.Linear:
                setattr(parent, child_name, make(child))


def quantized_llama(library: str, seed: int = 0) -> nn.Module:
    """The tiny seeded Llama with its attention and feed-forward projections quantized by `library`."""
    lib = _library(library)
    model = make_model("llama", seed)
    if library.startswith("bnb"):

        def make(linear):
            if library == "bnb_8bit":
                layer = lib.nn.Linear8bitLt(*linear.weight.shape[::-1], bias=linear.bias is not None,
                                            has_fp16_weights=False, threshold=0.0)  # fmt: skip
            else:
                layer = lib.nn.Linear4bit(*linear.weight.shape[::-1], bias=linear.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")  # fmt: skip
            layer.load_state_dict(linear.state_dict())
            return layer.to("cpu")  # bitsandbytes quantizes when the weight moves to a device

        _replace_linears(model, make)
    elif library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn.rsplit(".", 1)[-1] in QUANTIZED)
    else:
        lib.quantize(model, weights=lib.qint8, include=[f"*.{name}" for name in QUANTIZED])
        lib.freeze(model)
    assert sum(is_quantized(m) for m in model.modules()) == len(QUANTIZED) * 2
    return model.eval()


def float_twin(quantized: nn.Module, seed: int = 0) -> nn.Module:
    """The same Llama in float32 with plain `nn.Linear`s holding the dequantized weights of `quantized`."""
    twin = make_model("llama", seed)
    for name, module in quantized.named_modules():
        if is_quantized(module):
            linear = twin.get_submodule(name)
            with torch.no_grad():
                linear.weight.copy_(merge_weight(module).float())
    return twin


def build(model: nn.Module, method: str) -> nn.Module:
    spec = dict(METHODS[method])
    cls = spec.pop("cls")
    torch.manual_seed(0)
    return get_peft_model(model, cls(init_weights=False, **spec))


def with_twin(library: str, method: str) -> tuple[nn.Module, nn.Module]:
    """`method` on the quantized Llama, and the same adapter on its float twin."""
    quantized = quantized_llama(library)
    twin = build(float_twin(quantized), method)
    model = build(quantized, method)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model))
    return model, twin


def close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= tolerance * scale, f"max error {error:.3e} > {tolerance:.0e} x {scale:.3e}"


def loss_and_grads(model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


# -- ETHER / ETHER+ ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_ether_trains_like_its_float_twin(library, method):
    model, twin = (m.train() for m in with_twin(library, method))
    inputs = make_inputs("llama")
    logits, grads = loss_and_grads(model, inputs)
    twin_logits, twin_grads = loss_and_grads(twin, inputs)
    close(logits, twin_logits, TOLERANCE)
    assert grads.keys() == twin_grads.keys() and all("ether_" in name for name in grads)
    assert len(grads) >= 3
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        close(grad, twin_grads[name], TOLERANCE)
    # The quantized base stays frozen and untouched.
    assert not any(p.requires_grad for n, p in model.named_parameters() if "ether_" not in n)
