"""`xpeft.ether.to_lora`: the exported peft LoRA adapter equals the ETHER adapter (DESIGN.md §5, "ETHER as a LoRA").

Tolerance: the LoRA and ETHER models are compared in float32 with `rtol = atol = 1e-5` on logits of size ~1 (measured
differences up to 1.5e-6, on BERT); the adapters themselves change the logits by more than 1e-2, which each test checks
so that it could fail. The factor math is checked in float64 against dense matrices to 1e-12.
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
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from models import make_inputs, make_model, task_type
from xpeft import EtherConfig
from xpeft.ether import EtherLayer, to_lora
from xpeft.ether import export as ether_export

VARIANTS = ("ether", "ether_plus", "ether_plus_one_sided")
TESTS_DIR = Path(__file__).resolve().parent
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Random ETHER+ vectors (init_weights=False) are nearly singular for unmerging; merging them warns, as it should.
pytestmark = pytest.mark.filterwarnings(r"ignore:ETHER\+ adapter '\w+' is nearly singular")


# -- independent dense reference ------------------------------------------------------------------------------------


def unit(vector: torch.Tensor) -> torch.Tensor:
    """û as the layer computes it: normalised in float32 (then exact in float64)."""
    return (vector.float() / vector.float().norm()).double()


def dense_block_transform(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """diag_b(I − 2 û_b û_bᵀ), or diag_b(I − û_b û_bᵀ + v̂_b v̂_bᵀ) with `v`, built block by block in float64."""
    blocks = []
    for b in range(len(u)):
        a = unit(u[b])
        block = torch.eye(len(a), dtype=torch.float64)
        if v is None:
            block = block - 2 * torch.outer(a, a)
        else:
            c = unit(v[b])
            block = block - torch.outer(a, a) + torch.outer(c, c)
        blocks.append(block)
    return torch.block_diag(*blocks)


def dense_delta(layer: EtherLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """W' − W for `weight` `[out, in]` (float64), with W' = H_out W H_in computed densely."""
    variant = layer.ether_variant[name]
    u, v = layer.ether_u[name].detach(), layer.ether_v[name].detach() if variant != "ether" else None
    h_in = dense_block_transform(u, v)
    h_out = torch.eye(weight.shape[0], dtype=torch.float64)
    if variant == "ether_plus":
        h_out = dense_block_transform(layer.ether_u_out[name].detach(), layer.ether_v_out[name].detach())
    return h_out @ weight @ h_in - weight


def dense_reference_code_delta(layer: EtherLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
    """W' − W for the official code's layout, written from its formula: `W_in'[R_r, C_c] = W[R_r, C_c] H_r` for every
    output row group `R_r` and input chunk `C_c` (block by block), then `W' = H_out W_in'` (paper output side)."""
    variant = layer.ether_variant[name]
    u = layer.ether_u[name].detach()
    v = layer.ether_v[name].detach() if variant != "ether" else None
    n = len(u)
    rows, size = weight.shape[0] // n, weight.shape[1] // n
    transformed = weight.clone()
    for r in range(n):
        h_r = dense_block_transform(u[r : r + 1], None if v is None else v[r : r + 1])
        for c in range(n):
            block = weight[r * rows : (r + 1) * rows, c * size : (c + 1) * size]
            transformed[r * rows : (r + 1) * rows, c * size : (c + 1) * size] = block @ h_r
    if variant == "ether_plus":
        transformed = dense_block_transform(layer.ether_u_out[name].detach(), layer.ether_v_out[name].detach()) @ (
            transformed
        )
    return transformed - weight


# -- helpers --------------------------------------------------------------------------------------------------------


def randomize(model, name: str = "default", seed: int = 0) -> None:
    """Independent random vectors for adapter `name` (ETHER+ then is far from the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ether_layers(model):
            for vectors in (layer.ether_u, layer.ether_v, layer.ether_u_out, layer.ether_v_out):
                if name in vectors:
                    vectors[name].copy_(torch.randn(vectors[name].shape, generator=generator))


def ether_layers(model) -> list[EtherLayer]:
    return [module for module in model.modules() if isinstance(module, EtherLayer)]


def ether_model(model_name: str, variant: str, n_blocks: int, seed: int = 0, block_layout: str = "paper"):
    config = EtherConfig(
        task_type=task_type(model_name),
        target_modules="all-linear",
        n_blocks=n_blocks,
        variant=variant,
        block_layout=block_layout,
    )
    model = get_peft_model(make_model(model_name), config)
    randomize(model, seed=seed)
    return model.eval()


def load_lora(base: nn.Module, folder, **kwargs) -> PeftModel:
    with warnings.catch_warnings():
        # peft's notes on GPT-2's Conv1D layout and on the modules_to_save head; none changes the result.
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, folder, **kwargs).eval()


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as file:
        return {key: file.get_tensor(key) for key in file.keys()}


def saved_config(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as file:
        return json.load(file)


# -- the factor math ------------------------------------------------------------------------------------------------


class Wide(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)


@pytest.mark.parametrize(
    ("variant", "n_blocks", "shape", "rank"),
    [
        ("ether", 3, (8, 12), 3),
        ("ether", 6, (4, 12), 4),  # 6 > min(4, 12): the identity on the output side, ΔW as lora_A
        ("ether_plus_one_sided", 2, (8, 12), 4),
        ("ether_plus", 2, (8, 12), 8),
        ("ether_plus", 4, (20, 12), 12),  # 2·4 + 2·4 = 16 > min(20, 12): the dense ΔW against an identity
        ("ether_plus", 4, (8, 12), 8),  # 16 > min(8, 12): the identity on the output side
        ("ether_plus", 4, (12, 12), 12),
    ],
)
def test_factors_equal_the_dense_weight_change(variant, n_blocks, shape, rank):
    torch.manual_seed(0)
    out_features, in_features = shape
    model = get_peft_model(
        Wide(in_features, out_features), EtherConfig(target_modules=["lin"], n_blocks=n_blocks, variant=variant)
    )
    randomize(model)
    (layer,) = ether_layers(model)
    weight = torch.randn(shape, dtype=torch.float64)
    b, a = ether_export.smallest_factors(*ether_export.FACTORS["paper"][variant](layer, "default", weight))
    assert b.dtype == a.dtype == torch.float64
    assert b.shape == (out_features, rank) and a.shape == (rank, in_features)
    torch.testing.assert_close(b @ a, dense_delta(layer, "default", weight), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("variant", "n_blocks", "shape", "rank"),
    [
        ("ether", 2, (8, 12), 4),  # n² = 4
        ("ether", 3, (12, 12), 9),
        ("ether_plus_one_sided", 2, (8, 12), 8),  # 2n² = 8
        ("ether_plus", 2, (16, 24), 12),  # 2n + 2n² = 12
        ("ether_plus", 4, (16, 24), 16),  # 8 + 32 = 40 > min(16, 24): the dense ΔW against an identity
    ],
)
def test_reference_code_factors_equal_the_official_formula(variant, n_blocks, shape, rank):
    torch.manual_seed(0)
    out_features, in_features = shape
    config = EtherConfig(target_modules=["lin"], n_blocks=n_blocks, variant=variant, block_layout="reference_code")
    model = get_peft_model(Wide(in_features, out_features), config)
    randomize(model)
    (layer,) = ether_layers(model)
    weight = torch.randn(shape, dtype=torch.float64)
    b, a = ether_export.smallest_factors(*ether_export.FACTORS["reference_code"][variant](layer, "default", weight))
    assert b.shape == (out_features, rank) and a.shape == (rank, in_features)
    expected = dense_reference_code_delta(layer, "default", weight)
    torch.testing.assert_close(b @ a, expected, rtol=0, atol=1e-12)
    # The layouts differ for n > 1, so this is not the paper's ΔW.
    assert (dense_delta(layer, "default", weight) - expected).abs().max() > 1e-2


def test_ether_factors_are_the_issue_formula():
    """ETHER: column b of B is −2 W_{:,b} û_b and row b of A is û_b in block b, zero elsewhere."""
    torch.manual_seed(0)
    model = get_peft_model(Wide(6, 4), EtherConfig(target_modules=["lin"], n_blocks=2))
    (layer,) = ether_layers(model)
    weight = torch.randn(4, 6, dtype=torch.float64)
    b, a = ether_export.ether_factors(layer, "default", weight)
    u_hat = [unit(u) for u in layer.ether_u["default"].detach()]
    torch.testing.assert_close(b[:, 0], -2 * weight[:, :3] @ u_hat[0])
    torch.testing.assert_close(b[:, 1], -2 * weight[:, 3:] @ u_hat[1])
    torch.testing.assert_close(a, torch.block_diag(u_hat[0][None], u_hat[1][None]))


def test_ether_plus_at_init_exports_exact_zeros():
    """At the paper's init (v̂ = −û) ETHER+ is the identity: every factor is exactly zero, so the LoRA is too."""
    model = get_peft_model(
        make_model("llama"), EtherConfig(target_modules="all-linear", n_blocks=4, variant="ether_plus")
    )
    (layer, *_) = ether_layers(model)
    b, a = ether_export.ether_plus_factors(layer, "default", layer.get_base_layer().weight.double())
    assert b.shape[1] == 16
    assert torch.count_nonzero(b @ a) == 0


# -- the exported adapter in peft's LoRA ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_blocks", [1, 4, 8])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert"])
def test_exported_lora_equals_the_ether_model(tmp_path, model_name, variant, n_blocks):
    model = ether_model(model_name, variant, n_blocks)
    if model_name == "bert":
        with torch.no_grad():  # the trained head is part of the adapter (modules_to_save): it must come along
            model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    inputs = make_inputs(model_name)
    expected = logits(model, inputs)
    with model.disable_adapter():
        assert (expected - logits(model, inputs)).abs().max() > 1e-2  # the adapter matters

    config = to_lora(model, tmp_path)

    lora = load_lora(make_model(model_name), tmp_path)
    torch.testing.assert_close(logits(lora, inputs), expected, **TOLERANCE)
    # Merging uses peft's own delta-weight path (fan_in_fan_out transposes for GPT-2's Conv1D).
    torch.testing.assert_close(logits(lora.merge_and_unload(), inputs), expected, **TOLERANCE)

    written = saved_config(tmp_path)
    adapted = {name for name, module in model.base_model.model.named_modules() if isinstance(module, EtherLayer)}
    assert written["peft_type"] == "LORA" and set(written["target_modules"]) == adapted
    assert written["lora_alpha"] == written["r"] == config.r
    assert written["alpha_pattern"] == written["rank_pattern"]
    assert not written["use_rslora"] and not written["use_dora"] and written["lora_dropout"] == 0.0
    assert written["fan_in_fan_out"] == (model_name == "gpt2")
    tensors = saved_tensors(tmp_path)
    assert all(tensor.dtype == torch.float32 for tensor in tensors.values())
    assert len([key for key in tensors if key.endswith("lora_A.weight")]) == len(adapted)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_reference_code_layout_exports_exactly(tmp_path, model_name, variant):
    model = ether_model(model_name, variant, 4, block_layout="reference_code")
    inputs = make_inputs(model_name)
    expected = logits(model, inputs)
    paper = ether_model(model_name, variant, 4)
    assert (logits(paper, inputs) - expected).abs().max() > 1e-3  # the same vectors in the other layout differ
    to_lora(model, tmp_path)
    lora = load_lora(make_model(model_name), tmp_path)
    torch.testing.assert_close(logits(lora, inputs), expected, **TOLERANCE)


def test_rank_pattern_lists_the_layers_with_a_dense_delta(tmp_path):
    """Llama's k/v projections are 32 → 16: two-sided ETHER+ with 8 blocks has rank 32 > 16 there, so they get the
    dense ΔW at rank 16, the others rank 32."""
    model = ether_model("llama", "ether_plus", 8)
    config = to_lora(model, tmp_path)
    assert config.r == 32
    narrow = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"}
    assert config.rank_pattern == {f"^{name}".replace(".", r"\."): 16 for name in narrow}
    tensors = saved_tensors(tmp_path)
    for key, tensor in tensors.items():
        expected_rank = 16 if any(f".{name}." in key for name in narrow) else 32
        assert tensor.shape[0 if key.endswith("lora_A.weight") else 1] == expected_rank


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_two_exports_mixed_per_sample_equal_each_ether_adapter(tmp_path, model_name):
    config = dict(task_type=task_type(model_name), target_modules="all-linear")
    model = get_peft_model(make_model(model_name), EtherConfig(**config, n_blocks=4, variant="ether"), "one")
    model.add_adapter("two", EtherConfig(**config, n_blocks=2, variant="ether_plus"))
    randomize(model, "one", seed=1)
    randomize(model, "two", seed=2)
    model.eval()
    inputs = make_inputs(model_name, batch=3)
    expected = {}
    for name in ("one", "two"):
        model.set_adapter(name)
        expected[name] = logits(model, inputs)
        to_lora(model, tmp_path / name, adapter_name=name)
    with model.disable_adapter():
        expected["__base__"] = logits(model, inputs)
    assert (expected["one"] - expected["two"]).abs().max() > 1e-2

    lora = load_lora(make_model(model_name), tmp_path / "one", adapter_name="one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora.load_adapter(tmp_path / "two", adapter_name="two")
    names = ["two", "__base__", "one"]
    mixed = logits(lora, inputs, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], **TOLERANCE)


def test_exports_load_in_a_process_without_xpeft(tmp_path):
    """A plain peft install reads the export: a fresh process that imports only peft (not xpeft) loads both adapters."""
    config = dict(task_type="CAUSAL_LM", target_modules="all-linear", n_blocks=4)
    model = get_peft_model(make_model("llama"), EtherConfig(**config, variant="ether_plus"))
    model.add_adapter("other", EtherConfig(**config, variant="ether"))
    randomize(model, "default", seed=1)
    randomize(model, "other", seed=2)
    model.eval()
    inputs = make_inputs("llama")
    expected = {"default": logits(model, inputs)}
    model.set_adapter("other")
    expected["other"] = logits(model, inputs)
    to_lora(model, tmp_path / "adapter")
    to_lora(model, tmp_path / "adapter" / "other", adapter_name="other")

    output_file = tmp_path / "outputs.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(TESTS_DIR / "_fresh_process.py"), "peft", "llama"]
    command += [str(tmp_path / "adapter"), str(output_file), "other"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = load_file(output_file)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, **TOLERANCE, msg=f"adapter {name!r} differs")


def test_half_precision_export_and_explicit_dtype(tmp_path):
    model = ether_model("llama", "ether_plus", 4).to(torch.bfloat16)
    to_lora(model, tmp_path / "default")
    to_lora(model, tmp_path / "float32", dtype=torch.float32)
    assert {t.dtype for t in saved_tensors(tmp_path / "default").values()} == {torch.bfloat16}
    assert {t.dtype for t in saved_tensors(tmp_path / "float32").values()} == {torch.float32}
    inputs = make_inputs("llama")
    base = make_model("llama").to(torch.bfloat16)
    lora = load_lora(base, tmp_path / "float32")
    # bfloat16 models differ from each other by bfloat16 rounding, not fp32's.
    torch.testing.assert_close(logits(lora, inputs), logits(model, inputs), rtol=0.05, atol=0.05)


# -- module selection -----------------------------------------------------------------------------------------------


class Nested(nn.Module):
    """Two modules whose names end alike: `proj` and `inner.proj` (a list entry "proj" matches both)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.inner = nn.Module()
        self.inner.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.inner.proj(self.proj(x))


def test_targets_are_exact_when_a_name_is_the_end_of_another(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(Nested(), EtherConfig(target_modules="proj", n_blocks=2, variant="ether_plus"))
    randomize(model)
    model.eval()
    assert [type(m).__name__ for m in (model.base_model.model.proj, model.base_model.model.inner.proj)] == [
        "EtherLinear",
        "Linear",
    ]
    config = to_lora(model, tmp_path)
    assert config.target_modules == "proj"  # a regex matched in full: not `inner.proj`
    torch.manual_seed(0)
    lora = load_lora(Nested(), tmp_path)
    assert isinstance(lora.base_model.model.inner.proj, nn.Linear)
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), model(x), **TOLERANCE)


# -- convolutions ---------------------------------------------------------------------------------------------------


CONVS = {
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (6, 7)),
    "conv2d": (lambda: nn.Conv2d(6, 8, (3, 2), stride=2, padding=1), (6, 6, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3, padding="same"), (4, 4, 5, 3)),
}


@pytest.mark.parametrize("block_layout", ["paper", "reference_code"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(CONVS))
def test_convolutions_export_exactly(tmp_path, kind, variant, block_layout):
    make_conv, shape = CONVS[kind]
    torch.manual_seed(0)
    config = EtherConfig(target_modules=["0"], n_blocks=2, variant=variant, block_layout=block_layout)
    model = get_peft_model(nn.Sequential(make_conv()), config)
    randomize(model)
    model.eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = model(x)
        with model.disable_adapter():
            assert (expected - model(x)).abs().max() > 1e-2
    to_lora(model, tmp_path)
    torch.manual_seed(0)
    lora = load_lora(nn.Sequential(make_conv()), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), expected, **TOLERANCE)
        torch.testing.assert_close(lora.merge_and_unload()(x), expected, **TOLERANCE)


class CausalConv1d(nn.Conv1d):
    def forward(self, x):
        return super().forward(nn.functional.pad(x, (self.kernel_size[0] - 1, 0)))


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (lambda: nn.Conv2d(4, 8, 3, groups=2), r"convolution '0' exactly: it has groups=2 \(peft's lora_A is not"),
        (lambda: nn.Conv1d(4, 8, 3, dilation=2), r"it has dilation=\(2,\) \(peft's lora_A is not dilated\)"),
        (lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), r"padding_mode='reflect' \(peft's lora_A"),
        (lambda: CausalConv1d(4, 8, 3), r"module '0' exactly: its base layer `CausalConv1d` has its own forward"),
    ],
)
def test_convolutions_lora_cannot_reproduce_are_refused(tmp_path, conv, match):
    model = get_peft_model(nn.Sequential(conv()), EtherConfig(target_modules=["0"], n_blocks=2))
    with pytest.raises(ValueError, match=match + r".*Leave the module out of the ETHER adapter \(`exclude_modules`\)"):
        to_lora(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- refusals -------------------------------------------------------------------------------------------------------


def test_merged_adapter_is_refused(tmp_path):
    model = ether_model("gpt2", "ether", 4)
    model.merge_adapter()
    with pytest.raises(
        ValueError,
        match=r"module 'transformer\.h\.0\.attn\.c_attn' has adapter\(s\) \['default'\] "
        r"merged into its weight.*Unmerge first \(`model\.unmerge_adapter\(\)`\)",
    ):
        to_lora(model, tmp_path)
    model.unmerge_adapter()
    to_lora(model, tmp_path)


def test_wrong_model_adapter_or_dtype_is_refused(tmp_path):
    model = ether_model("llama", "ether", 4)
    with pytest.raises(TypeError, match=r"needs the `PeftModel` holding the ETHER adapter.*got `LlamaForCausalLM`"):
        to_lora(model.base_model.model, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"'other' is not an adapter of the model\. Pass `adapter_name=` one of the "
        r"model's ETHER adapters: 'default'",
    ):
        to_lora(model, tmp_path, adapter_name="other")
    lora = get_peft_model(make_model("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"but 'default' is a LORA adapter\. Pass .*ETHER adapters: none\."):
        to_lora(lora, tmp_path)
    with pytest.raises(ValueError, match=r"`dtype` must be a floating-point torch\.dtype or None, got torch\.int8"):
        to_lora(model, tmp_path, dtype=torch.int8)
    assert not os.listdir(tmp_path)


# -- crash safety ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_a_failed_export_leaves_the_previous_one(tmp_path, monkeypatch, failing):
    model = ether_model("gpt2", "ether", 4)
    to_lora(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    randomize(model, seed=5)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if failing == "weights":
        monkeypatch.setattr(ether_export, "save_file", fail)
    else:
        monkeypatch.setattr(LoraConfig, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        to_lora(model, tmp_path, adapter_name="default")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert sorted(before) == ["adapter_config.json", "adapter_model.safetensors"]


def test_gpt2_lora_weights_are_in_out_in_layout(tmp_path):
    """peft's LoRA on a Conv1D keeps lora_A `[r, in]`, lora_B `[out, r]`: the layout of `nn.Linear`, not Conv1D's."""
    model = ether_model("gpt2", "ether", 4)
    to_lora(model, tmp_path)
    tensors = saved_tensors(tmp_path)
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    assert isinstance(layer.get_base_layer(), Conv1D) and layer.get_base_layer().weight.shape == (32, 128)
    prefix = "base_model.model.transformer.h.0.mlp.c_fc"
    assert tensors[f"{prefix}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{prefix}.lora_B.weight"].shape == (128, 4)
