"""ETHER, ETHER+, X-PEFT and PEDRO on quantized base layers (bitsandbytes 8-/4-bit, torchao int8 weight-only,
optimum-quanto qint8), each against an fp32 twin: the same tiny Llama whose quantized layers are plain `nn.Linear`s
holding the dequantized weights. The twin computes what the quantized layer computes up to its kernel's arithmetic.

Tolerances, relative to the largest entry (measured, then given ~10x room):
- training (train mode, gradients): logits and gradients within 1e-5 (measured at most 1.2e-6): on CPU every library
  dequantizes the weight and runs a float32 matmul;
- inference (eval mode, no grad): within 1e-5 for torchao and quanto; bitsandbytes' CPU inference kernels compute in
  lower precision (8-bit casts the activations to float16 and quantizes them to int8 per row, 4-bit repacks the weight
  with bfloat16 block scales): 2e-2 and 1e-2 (measured at most 6.8e-3 and 2.3e-3);
- merging: a merged layer's weight is exactly what the library itself makes of the float merged weight `W_deq H`
  (quantized with the layer's settings), and the merged model's logits are within 2.5x the base model's own
  quantization error (its logits against the float model's; measured ratio at most 2.0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models import make_inputs, make_model
from xpeft import EtherConfig, PedroConfig, XPeftConfig
from xpeft.quantization import ROUNDING_WARNING, is_quantized, merge_weight

QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# bitsandbytes' CPU inference kernel for 4-bit weights needs out_features divisible by 32, which the tiny Llama's
# k_proj and v_proj (16 outputs: 2 kv heads) are not; real models' are.
QUANTIZED_4BIT = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LIBRARIES = ("bnb_8bit", "bnb_4bit", "torchao", "quanto")
MODULES = {"bnb_8bit": "bitsandbytes", "bnb_4bit": "bitsandbytes", "torchao": "torchao", "quanto": "optimum.quanto"}
TOLERANCE = 1e-5
INFERENCE_TOLERANCE = {"bnb_8bit": 2e-2, "bnb_4bit": 1e-2, "torchao": TOLERANCE, "quanto": TOLERANCE}
MERGE_ERROR_FACTOR = 2.5
ETHER_METHODS = {
    "ether": dict(n_blocks=4, variant="ether", target_modules=["q_proj", "o_proj", "down_proj"]),
    "ether_plus": dict(n_blocks=4, variant="ether_plus", target_modules=["q_proj", "up_proj"]),
    "ether_plus_one_sided": dict(n_blocks=2, variant="ether_plus_one_sided", target_modules=["o_proj", "gate_proj"]),
}
METHODS = {name: (EtherConfig, spec) for name, spec in ETHER_METHODS.items()}
METHODS["x_peft"] = (XPeftConfig, dict(bank_size=5, reduction_factor=4, target_modules=["down_proj", "o_proj"]))
METHODS["pedro"] = (PedroConfig, dict(vg_rank=4, target_modules=["q_proj", "v_proj", "up_proj"]))


def _library(library: str):
    name = MODULES[library]
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -e '.[quant]')")


def quantize_linear(library: str, linear: nn.Linear) -> nn.Module:
    """`linear` quantized by `library` the way a user would (a new module, or `linear` itself for torchao)."""
    lib = _library(library)
    bias = linear.bias is not None
    if library == "bnb_8bit":
        layer = lib.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        return layer.to("cpu")  # bitsandbytes quantizes when the weight moves to a device
    if library == "bnb_4bit":
        layer = lib.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.float32)
        # Blocks of 32, not the default 64: bitsandbytes' CPU inference kernel cannot repack a weight whose rows are
        # shorter than a block (the tiny Llama's are 32 long).
        layer.weight = lib.nn.Params4bit(linear.weight.data, blocksize=32, quant_type="nf4", module=layer)
        layer.bias = linear.bias
        return layer.to("cpu")
    if library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(linear, Int8WeightOnlyConfig())
        return linear
    holder = nn.Sequential(linear)
    lib.quantize(holder, weights=lib.qint8)
    lib.freeze(holder)
    return holder[0]


def quantized_llama(library: str, seed: int = 0) -> nn.Module:
    """The tiny seeded Llama with its attention and feed-forward projections quantized by `library`."""
    names = QUANTIZED_4BIT if library == "bnb_4bit" else QUANTIZED
    model = make_model("llama", seed)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                setattr(parent, child_name, quantize_linear(library, child))
    assert sum(is_quantized(m) for m in model.modules()) == len(names) * 2
    return model.eval()


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized layers of a Llama or of a peft model on one, by their name in the bare Llama."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): module
        for name, module in model.named_modules()
        if is_quantized(module) and not isinstance(module, BaseTunerLayer)  # tuner layers forward `.weight`
    }


def float_twin(quantized: nn.Module, seed: int = 0) -> nn.Module:
    """The same Llama in float32 with plain `nn.Linear`s holding the dequantized weights of `quantized`."""
    twin = make_model("llama", seed)
    for name, module in quantized_layers(quantized).items():
        with torch.no_grad():
            twin.get_submodule(name).weight.copy_(merge_weight(module).float())
    return twin


def build(model: nn.Module, method: str) -> nn.Module:
    config_cls, spec = METHODS[method]
    torch.manual_seed(0)
    return get_peft_model(model, config_cls(init_weights=False, task_type="CAUSAL_LM", **spec))


def with_twin(library: str, method: str) -> tuple[nn.Module, nn.Module]:
    """`method` on the quantized Llama, and the same adapter on its float twin."""
    model = build(quantized_llama(library), method)
    return model, twin_of(model, method)


def twin_of(model: nn.Module, method: str) -> nn.Module:
    """The float twin of the peft model `model` as its weights are now (bitsandbytes 4-bit weights change slightly at
    the first CPU inference call, which repacks them with bfloat16 block scales)."""
    twin = build(float_twin(model), method)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model))
    return twin


def inputs_with_labels() -> dict[str, torch.Tensor]:
    """Tiny Llama inputs whose first four tokens are the prompt (labels -100, the PEDRO convention)."""
    inputs = make_inputs("llama")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :4] = -100
    return {**inputs, "labels": labels}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def loss_and_grads(model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


# -- every method as a black box around the quantized layer -----------------------------------------------------------


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_trains_like_its_float_twin(library, method):
    model, twin = (m.train() for m in with_twin(library, method))
    inputs = inputs_with_labels()
    logits, grads = loss_and_grads(model, inputs)
    twin_logits, twin_grads = loss_and_grads(twin, inputs)
    assert relative_error(logits, twin_logits) <= TOLERANCE
    prefix = {"ether_plus": "ether", "ether_plus_one_sided": "ether"}.get(method, method).replace("_", "")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == twin_grads.keys() == trainable and len(grads) >= 2
    assert all(prefix in name.replace("_", "") for name in grads), sorted(grads)  # the quantized base stays frozen
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert relative_error(grad, twin_grads[name]) <= TOLERANCE, name


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_inference_matches_its_float_twin(library, method):
    model, twin = with_twin(library, method)
    inputs = inputs_with_labels()
    with torch.inference_mode():
        logits, twin_logits = model(**inputs).logits, twin(**inputs).logits
        again = model(**inputs).logits  # bitsandbytes repacks 4-bit weights at the first CPU inference call
    assert relative_error(logits, twin_logits) <= INFERENCE_TOLERANCE[library]
    assert torch.equal(again, logits)
    with model.disable_adapter(), torch.inference_mode():
        # The adapter changes the logits by more than the tolerance (4.5e-2 to 1.0 measured).
        assert relative_error(model(**inputs).logits, logits) > INFERENCE_TOLERANCE[library]


@pytest.mark.parametrize("library", LIBRARIES)
def test_fused_two_sided_path_is_not_taken_for_quantized_weights(library):
    """The one-Function ETHER+ path multiplies the weight itself; a quantized layer must be called instead."""
    model, _ = with_twin(library, "ether_plus")
    x = torch.randn(2, 3, 32)
    layers = [m for m in model.modules() if _is_ether(m)]
    assert layers and all(is_quantized(layer.base_layer) for layer in layers)
    assert not any(layer._runs_as_one_function(x, ["default"]) for layer in layers)


# -- merging into quantized weights -----------------------------------------------------------------------------------


def well_conditioned(model: nn.Module) -> nn.Module:
    """Set each ETHER+ `v` to `−u` plus a 30% perturbation, so that `|û·v̂|` stays near 1 and unmerging is allowed."""
    generator = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, v in params.items():
            if "ether_v" in name:
                u = params[name.replace("ether_v", "ether_u")]
                noise = torch.randn(u.shape, generator=generator) * u.norm(dim=-1, keepdim=True) / u.shape[-1] ** 0.5
                v.copy_(-u + 0.3 * noise)
    return model


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("method", list(ETHER_METHODS))
def test_merge_requantizes_within_quantization_error(library, method):
    model = well_conditioned(build(quantized_llama(library), method))
    inputs = make_inputs("llama")
    with torch.no_grad():
        base_error = relative_error(quantized_llama(library)(**inputs).logits, make_model("llama")(**inputs).logits)
        unmerged = model(**inputs).logits
        float_merged = twin_of(model, method).merge_and_unload()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.merge_adapter()
        assert any(str(w.message) == ROUNDING_WARNING for w in caught)
        # Each merged layer holds what the library itself makes of the twin's float merged weight H_out W_deq H_in.
        layers = quantized_layers(model)
        merged_names = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if _is_ether(m)]
        assert merged_names and all(layers[name] is model.get_submodule(f"base_model.model.{name}").base_layer
                                    for name in merged_names)  # fmt: skip
        for name in merged_names:
            expected = quantize_linear(library, _linear_with(float_merged.get_submodule(name).weight))
            assert torch.equal(merge_weight(layers[name]), merge_weight(expected)), name
        assert not any(p.requires_grad for n, p in model.named_parameters() if "ether_" not in n)  # still frozen
        merged = model(**inputs).logits
        assert relative_error(merged, unmerged) <= MERGE_ERROR_FACTOR * base_error
        with pytest.warns(UserWarning, match="quantized base weights"):
            model.unmerge_adapter()
        assert relative_error(model(**inputs).logits, unmerged) <= MERGE_ERROR_FACTOR * base_error


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def _is_ether(module: nn.Module) -> bool:
    return type(module).__name__ == "EtherLinear"


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("method", ["x_peft", "pedro"])
def test_unmergeable_methods_refuse_merge_and_leave_quantized_weights(library, method):
    model, _ = with_twin(library, method)
    layers = quantized_layers(model)
    before = {n: merge_weight(m).clone() for n, m in layers.items()}
    with pytest.raises(ValueError, match="cannot be merged.*Keep the model unmerged"):
        model.merge_and_unload()
    after = {n: merge_weight(m) for n, m in layers.items()}
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_merge_refuses_a_torchao_weight_it_cannot_requantize():
    pytest.importorskip("torchao", reason="torchao is not installed (pip install -e '.[quant]')")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = make_model("llama")
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: fqn.endswith("q_proj"))
    peft_model = get_peft_model(model, EtherConfig(target_modules=["q_proj"], n_blocks=4, init_weights=False))
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    before = layer.weight.dequantize()
    with pytest.raises(ValueError, match="activation quantization.*merge into a float"):
        peft_model.merge_adapter()
    assert (
        torch.equal(layer.weight.dequantize(), before)
        and not peft_model.base_model.model.model.layers[0].self_attn.q_proj.merged
    )


# -- layers xpeft cannot adapt ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_torch_ao_dynamic_quantized_layers_are_refused_by_full_class_name(method):
    model = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    with pytest.raises(TypeError, match=r"torch\.ao\.nn\.quantized\.dynamic\.modules\.linear\.Linear.*float model"):
        build(model, method)


@pytest.mark.slow
def test_benchmark_runs_quick(tmp_path):
    """benchmarks/bench_quantized.py end to end in --quick mode, so that it cannot rot (the figures are not checked)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[quant]')")
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "quantized.json"
    cmd = [sys.executable, str(repo / "benchmarks" / "bench_quantized.py"), "--quick", "--cycles", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo / "src")}
    proc = subprocess.run([*cmd, "--alone-steps", "1", "--out", str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"lora_r8", "ether", "ether_plus"}
    assert all(r["step_s_median"] > 0 and r["trainable_params"] > 0 for r in report["results"].values())
    assert set(report["ratios"]) == {"ether / lora_r8", "ether_plus / lora_r8"}


def test_ether_refuses_a_quantized_convolution():
    quanto = _library("quanto")
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(128, 2))
    quanto.quantize(model, weights=quanto.qint8, include=["0"])
    quanto.freeze(model)
    with pytest.raises(TypeError, match=r"convolution '0'.*qconv2d\.QConv2d.*quantize again.*exclude_modules"):
        get_peft_model(model, EtherConfig(target_modules=["0"], n_blocks=4))


def test_reference_code_layout_is_refused_on_a_quantized_base():
    """block_layout='reference_code' multiplies the weight itself each forward: on int storage it would be wrong."""
    _library("quanto")
    with pytest.raises(TypeError, match="reference_code.*quantized.*block_layout='paper'"):
        get_peft_model(
            quantized_llama("quanto"), EtherConfig(target_modules=["q_proj"], n_blocks=2, block_layout="reference_code")
        )
