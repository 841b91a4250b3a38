"""`block_layout="reference_code"` against a literal float64 re-implementation of the official code's formula, and
`ether_dropout`; both config fields through save and load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from xpeft import EtherConfig
from xpeft.ether import EtherLayer
from xpeft.ether.layer import normalize_blocks

VARIANTS = ("ether", "ether_plus", "ether_plus_one_sided")
IN, OUT = 12, 8


# -- the official code's formula, literally (mwbini/ether, lit_gpt/ether.py, ETHERLinear.forward) ------------------


def reference_code_weight(weight, h_in, h_out=None):
    """`weight` `[f, d]`, `h_in` `[nb, d/nb, d/nb]` and (two-sided, 'etherplusHH') `h_out` `[nb, f/nb, f/nb]`: the
    official code's reshape and einsum, as written there."""
    nb = h_in.shape[0]
    f, d = weight.shape
    filt = weight.reshape(nb, f, d // nb)
    filt = torch.einsum("rfm,rmn->rfn", filt, h_in)
    filt = filt.reshape(f, d)
    if h_out is not None:
        filt = filt.reshape(nb, f // nb, d)
        filt = torch.einsum("rnm,rmd->rnd", h_out, filt)
        filt = filt.reshape(f, d)
    return filt


def dense_blocks(u, v=None, normalized=False):
    """`[n, d/n, d/n]`: `I − 2ûûᵀ` per block, or `I − ûûᵀ + v̂v̂ᵀ` with `v` (differentiable, in the dtype of `u`)."""
    u_hat = u if normalized else u / u.norm(dim=-1, keepdim=True)
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    if v is None:
        return eye - 2 * u_hat.unsqueeze(-1) * u_hat.unsqueeze(-2)
    v_hat = v if normalized else v / v.norm(dim=-1, keepdim=True)
    return eye - u_hat.unsqueeze(-1) * u_hat.unsqueeze(-2) + v_hat.unsqueeze(-1) * v_hat.unsqueeze(-2)


def layer_blocks(layer: EtherLayer, name: str = "default"):
    """`(h_in, h_out)` dense float64 blocks of adapter `name` (`h_out` None unless two-sided), from the unit vectors as
    the layer normalizes them (see `normalize_blocks`)."""

    def hat(container):
        return normalize_blocks(container[name], torch.float64) if name in container else None

    h_in = dense_blocks(hat(layer.ether_u), hat(layer.ether_v), normalized=True)
    if name not in layer.ether_u_out:
        return h_in, None
    return h_in, dense_blocks(hat(layer.ether_u_out), hat(layer.ether_v_out), normalized=True)


def out_in(base: nn.Module) -> torch.Tensor:
    weight = base.weight.double()
    return weight.T if isinstance(base, Conv1D) else weight


def test_the_reference_formula_transforms_every_input_chunk_of_a_row_group_by_its_block():
    """The issue's reading of the official code, checked in float64: `W'[R_r, C_c] = W[R_r, C_c] H_r`, which is not the
    paper's `W diag(H_1 .. H_n)` unless n = 1."""
    generator = torch.Generator().manual_seed(0)
    for nb in (1, 2, 4):
        weight = torch.randn(OUT, IN, dtype=torch.float64, generator=generator)
        h_in = dense_blocks(torch.randn(nb, IN // nb, dtype=torch.float64, generator=generator))
        rows, cols = OUT // nb, IN // nb
        expected = torch.empty_like(weight)
        for r in range(nb):
            for c in range(nb):
                block = weight[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols]
                expected[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = block @ h_in[r]
        torch.testing.assert_close(reference_code_weight(weight, h_in), expected, rtol=1e-14, atol=1e-14)
        paper = weight @ torch.block_diag(*h_in)
        assert torch.allclose(paper, expected) == (nb == 1)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)
        self.conv = Conv1D(OUT, IN)
        nn.init.normal_(self.conv.bias)

    def forward(self, x):
        return self.lin(x) + self.conv(x)


def layout_model(variant, n_blocks=2, layout="reference_code", seed=0, **kwargs):
    torch.manual_seed(seed)
    config = EtherConfig(
        target_modules=["lin", "conv"], n_blocks=n_blocks, variant=variant, block_layout=layout, **kwargs
    )
    model = get_peft_model(TwoLayers(), config).double()
    with torch.no_grad():  # away from H⁺ = I, but well conditioned
        for name, param in model.named_parameters():
            if "ether_" in name:
                param.add_(0.3 * torch.randn_like(param) * param.norm(dim=-1, keepdim=True))
    return model


def layers(model) -> list[EtherLayer]:
    return [m for m in model.modules() if isinstance(m, EtherLayer)]


def reference_output(model, x, names=("default",)):
    """The model's output from the literal formula, adapters merged in turn (float64)."""
    total = 0
    for layer in layers(model):
        base = layer.get_base_layer()
        weight = out_in(base)
        for name in names:
            weight = reference_code_weight(weight, *layer_blocks(layer, name))
        total = total + x @ weight.T + base.bias.double()
    return total


@pytest.mark.parametrize("n_blocks", [2, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_code_layout_forward_merge_and_gradients_match_the_formula(variant, n_blocks):
    model = layout_model(variant, n_blocks)
    x = torch.randn(3, 5, IN, dtype=torch.float64)
    out = model(x)
    expected = reference_output(model, x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    vectors = [p for n, p in model.named_parameters() if "ether_" in n]
    grads = torch.autograd.grad(out.square().sum(), vectors)
    expected_grads = torch.autograd.grad(expected.square().sum(), vectors)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    originals = [out_in(layer.get_base_layer()).detach().clone() for layer in layers(model)]
    with torch.no_grad():
        merged_expected = [
            reference_code_weight(w, *layer_blocks(layer)) for w, layer in zip(originals, layers(model), strict=True)
        ]
        model.merge_adapter()
        for layer, weight in zip(layers(model), merged_expected, strict=True):
            torch.testing.assert_close(out_in(layer.get_base_layer()), weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        model.unmerge_adapter()
        for layer, weight in zip(layers(model), originals, strict=True):
            torch.testing.assert_close(out_in(layer.get_base_layer()), weight, rtol=1e-10, atol=1e-12)


def test_reference_code_ether_plus_starts_exactly_at_the_base_model():
    torch.manual_seed(0)
    config = EtherConfig(
        target_modules=["lin", "conv"], n_blocks=2, variant="ether_plus", block_layout="reference_code"
    )
    base = TwoLayers()
    x = torch.randn(4, IN)
    expected = base(x)
    assert torch.equal(get_peft_model(base, config)(x), expected)


def test_mixed_batch_and_stacked_adapters_with_both_layouts():
    """Per-sample adapter_names over a reference_code adapter, a paper one and the base equal each alone; two active
    adapters (one reference_code) equal the formula with both merged in turn."""
    model = layout_model("ether_plus", layout="reference_code")
    torch.manual_seed(1)
    model.add_adapter(
        "paper", EtherConfig(target_modules=["lin", "conv"], n_blocks=2, variant="ether", init_weights=False)
    )
    model.double().eval()
    x = torch.randn(3, 4, IN, dtype=torch.float64)
    with torch.no_grad():
        mixed = model(x, adapter_names=["default", "paper", "__base__"])
        alone = []
        for index, name in enumerate(["default", "paper"]):
            model.set_adapter(name)
            alone.append(model(x[index : index + 1]))
        with model.disable_adapter():
            alone.append(model(x[2:]))
        torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-12, atol=1e-12)
        model.base_model.set_adapter(["default", "paper"])
        stacked = model(x)
    # Merged in turn: "default" (reference_code) first, then "paper" (W H on the input side, a paper-layout block
    # transform: the literal formula at the paper's layout is W @ block_diag).
    total = 0
    for layer in layers(model):
        base = layer.get_base_layer()
        weight = reference_code_weight(out_in(base), *layer_blocks(layer, "default"))
        weight = weight @ torch.block_diag(*layer_blocks(layer, "paper")[0])
        total = total + x @ weight.T + base.bias.double()
    torch.testing.assert_close(stacked, total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_code_on_a_convolution_transforms_the_flattened_filters(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    config = EtherConfig(
        target_modules=["0"], n_blocks=2, variant=variant, block_layout="reference_code", init_weights=False
    )
    peft_model = get_peft_model(model, config).double()
    (layer,) = layers(peft_model)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    base = layer.get_base_layer()
    weight = reference_code_weight(base.weight.double().flatten(1), *layer_blocks(layer)).reshape(base.weight.shape)
    torch.testing.assert_close(peft_model(x), F.conv2d(x, weight, base.bias), rtol=1e-12, atol=1e-12)


def test_reference_code_needs_output_rows_divisible_by_n_blocks():
    model = nn.Sequential(nn.Linear(12, 6))
    config = EtherConfig(target_modules=["0"], n_blocks=4, block_layout="reference_code")
    message = (
        r"block_layout='reference_code' with `n_blocks`=4 groups out_features=6 of module '0' into 4 equal groups "
        r"of output rows, which does not divide\. Valid block counts for this layer: 1, 2, 3, 6\. Set `n_blocks` to "
        r"one of them, use block_layout='paper'"
    )
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config)
    get_peft_model(nn.Sequential(nn.Linear(12, 6)), EtherConfig(target_modules=["0"], n_blocks=4))  # paper: fine


def test_config_refuses_unknown_layout_and_bad_dropout():
    with pytest.raises(
        ValueError, match=r"`block_layout`='official' is not an ETHER block layout; choose one of 'paper'"
    ):
        EtherConfig(block_layout="official")
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match=r"`ether_dropout` must be a probability in \[0, 1\).*use 0\.0 for no"):
            EtherConfig(ether_dropout=bad)


@pytest.mark.parametrize("layout", ["paper", "reference_code"])
def test_ether_dropout_drops_the_layer_input_in_training_only(layout):
    model = layout_model("ether_plus", layout=layout, ether_dropout=0.5)
    assert all(isinstance(layer.ether_dropout["default"], nn.Dropout) for layer in layers(model))
    x = torch.randn(6, IN, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(3)
        trained = model.train()(x)
        torch.manual_seed(3)
        # Each layer draws its own mask, in module order.
        dropped = [F.dropout(x, 0.5, training=True) for _ in layers(model)]
        merged = []
        for layer, x_dropped in zip(layers(model), dropped, strict=True):
            base = layer.get_base_layer()
            h_in, h_out = layer_blocks(layer)
            if layout == "reference_code":
                weight = reference_code_weight(out_in(base), h_in, h_out)
            else:
                weight = torch.block_diag(*h_out) @ out_in(base) @ torch.block_diag(*h_in)
            merged.append(x_dropped @ weight.T + base.bias)
        torch.testing.assert_close(trained, sum(merged), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(trained, model.eval()(x))
        torch.testing.assert_close(model.eval()(x), layout_model("ether_plus", layout=layout)(x), rtol=0, atol=0)
    assert all(isinstance(layer.ether_dropout["default"], nn.Identity) for layer in layers(layout_model("ether")))


def test_new_fields_save_and_load_and_old_configs_load_as_paper_without_dropout(tmp_path):
    model = layout_model("ether_plus", layout="reference_code", ether_dropout=0.1).eval()
    x = torch.randn(2, IN, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert saved["block_layout"] == "reference_code" and saved["ether_dropout"] == 0.1
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TwoLayers().double(), tmp_path / "new").eval()
    assert loaded.peft_config["default"].block_layout == "reference_code"
    assert loaded.peft_config["default"].ether_dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    # An adapter_config.json written before these fields existed.
    for key in ("block_layout", "ether_dropout"):
        del saved[key]
    (tmp_path / "new" / "adapter_config.json").write_text(json.dumps(saved))
    old = PeftModel.from_pretrained(TwoLayers().double(), tmp_path / "new")
    assert old.peft_config["default"].block_layout == "paper" and old.peft_config["default"].ether_dropout == 0.0
    assert all(layer.ether_block_layout["default"] == "paper" for layer in layers(old))
