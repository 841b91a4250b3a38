"""ETHER / ETHER+ against independent dense float64 math (DESIGN.md §1), plus errors, dtypes and training."""

from __future__ import annotations

import copy
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import fields

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from peft import HRAConfig, PeftModel, get_peft_model
from torch import nn
from torch.nn import functional as F
from transformers import ResNetConfig, ResNetForImageClassification
from transformers.pytorch_utils import Conv1D

from models import make_inputs, make_model, task_type
from xpeft import EtherConfig
from xpeft.ether import EtherConv, EtherLayer, EtherLinear
from xpeft.ether.layer import (
    ether_plus_inverse,
    ether_plus_linear,
    ether_plus_transform,
    householder_reflect,
    unmerge_tolerance,
)

VARIANTS = ("ether", "ether_plus", "ether_plus_one_sided")
IN, OUT = 12, 8


# -- independent dense reference ------------------------------------------------------------------------------------


def dense_h(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal H = diag(I − 2 û_b û_bᵀ) without `v`, else H⁺ = diag(I − û_b û_bᵀ + v̂_b v̂_bᵀ), built explicitly
    (differentiable; in the dtype of `u`)."""
    blocks = []
    for b in range(len(u)):
        a = u[b] / u[b].norm()
        eye = torch.eye(len(a), dtype=u.dtype)
        if v is None:
            blocks.append(eye - 2 * torch.outer(a, a))
        else:
            c = v[b] / v[b].norm()
            blocks.append(eye - torch.outer(a, a) + torch.outer(c, c))
    return torch.block_diag(*blocks)


def dense_reflection(u: torch.Tensor) -> torch.Tensor:
    return dense_h(u.detach().double())


def dense_ether_plus(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return dense_h(u.detach().double(), v.detach().double())


def dense_transforms(layer: EtherLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_out, H_in) of adapter `name` as dense float64 matrices."""
    if layer.ether_variant[name] == "ether":
        h_in = dense_reflection(layer.ether_u[name])
    else:
        h_in = dense_ether_plus(layer.ether_u[name], layer.ether_v[name])
    if layer.ether_variant[name] == "ether_plus":
        h_out = dense_ether_plus(layer.ether_u_out[name], layer.ether_v_out[name])
    else:
        h_out = torch.eye(layer.out_features, dtype=torch.float64)
    return h_out, h_in


def out_in(layer_or_weight) -> torch.Tensor:
    """Base weight as float64 [out, in], whatever the layer type."""
    if isinstance(layer_or_weight, Conv1D):
        return layer_or_weight.weight.detach().double().T
    return layer_or_weight.weight.detach().double()


class TwoLayers(nn.Module):
    """An nn.Linear and a GPT-2 Conv1D (weight [in, out]) side by side, both IN → OUT."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)
        self.conv = Conv1D(OUT, IN)
        nn.init.normal_(self.conv.bias)

    def forward(self, x):
        return self.lin(x) + self.conv(x)


def two_layer_model(variant: str, n_blocks: int = 2, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    base = TwoLayers()
    config = EtherConfig(target_modules=["lin", "conv"], n_blocks=n_blocks, variant=variant, **kwargs)
    return get_peft_model(base, config)


def ether_layers(model) -> list[EtherLayer]:
    return [m for m in model.modules() if isinstance(m, EtherLayer)]


def move_away_from_identity(model, name: str = "default", std: float = 0.3, seed: int = 0) -> None:
    """Perturb v around −u: ETHER+ leaves H⁺ = I but stays well-conditioned (|û·v̂| near 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ether_layers(model):
            for u, v in ((layer.ether_u, layer.ether_v), (layer.ether_u_out, layer.ether_v_out)):
                if name in v:
                    noise = torch.randn(v[name].shape, generator=generator)
                    v[name].copy_(-u[name] + std * noise * u[name].norm(dim=-1, keepdim=True))


def reference_output(model, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Σ_layers (H_out,names[-1]…H_out,names[0]) W (H_in,names[0]…H_in,names[-1]) x + b, in float64."""
    y = 0
    for layer in ether_layers(model):
        weight = out_in(layer.get_base_layer())
        for name in names:
            h_out, h_in = dense_transforms(layer, name)
            weight = h_out @ weight @ h_in
        y = y + x.double() @ weight.T + layer.get_base_layer().bias.detach().double()
    return y


# Random (init_weights=False) ETHER+ vectors may be nearly singular; merging them warns, as it should.
NEARLY_SINGULAR = pytest.mark.filterwarnings(r"ignore:ETHER\+ adapter '\w+' is nearly singular")


# -- math -----------------------------------------------------------------------------------------------------------


@NEARLY_SINGULAR
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_merge_match_dense_reference(variant):
    model = two_layer_model(variant, init_weights=False).eval()
    x = torch.randn(5, 3, IN)
    expected = reference_output(model, x, ["default"])
    expected_weights = {}
    for layer in ether_layers(model):
        h_out, h_in = dense_transforms(layer, "default")
        expected_weights[layer] = h_out @ out_in(layer.get_base_layer()) @ h_in
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        for layer, weight in expected_weights.items():
            torch.testing.assert_close(out_in(layer.get_base_layer()), weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


@NEARLY_SINGULAR
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_active_adapters_compose_like_successive_merges(variant):
    model = two_layer_model(variant, init_weights=False)
    model.add_adapter("other", EtherConfig(target_modules=["lin", "conv"], n_blocks=4, variant=variant))
    if variant != "ether":
        move_away_from_identity(model, "other", std=1.0)
    model.base_model.set_adapter(["default", "other"])
    model.eval()
    x = torch.randn(4, IN)
    expected = reference_output(model, x, ["default", "other"])
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter(["default", "other"])
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 6])
def test_ether_is_orthogonal_with_det_minus_one_per_block(n_blocks):
    model = two_layer_model("ether", n_blocks=n_blocks)
    layer = ether_layers(model)[0]
    # The layer's own transform applied to the rows of I gives I H = H.
    h = layer.transform_input(torch.eye(IN, dtype=torch.float64), "default")
    # û is normalized in float32 (by design), hence the 1e-6 tolerance of a float64 comparison.
    torch.testing.assert_close(h, dense_reflection(layer.ether_u["default"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(h @ h.T, torch.eye(IN, dtype=torch.float64), rtol=0, atol=1e-6)
    size = IN // n_blocks
    for b in range(n_blocks):
        rows = slice(b * size, (b + 1) * size)
        block = h[rows, rows]
        assert torch.linalg.det(block).item() == pytest.approx(-1.0, abs=1e-6)
        off_block = h[rows].clone()
        off_block[:, rows] = 0
        assert off_block.abs().max() == 0
        # A reflection is never the identity: ‖H_b − I‖_F = 2 for every block (the paper's distance bound).
        assert torch.linalg.norm(block - torch.eye(size, dtype=torch.float64)).item() == pytest.approx(2.0)


@pytest.mark.parametrize("x_requires_grad", [True, False])
@pytest.mark.parametrize("variant", ["ether", "ether_plus"])
def test_hand_written_gradients_match_finite_differences(variant, x_requires_grad):
    """First and second derivatives (create_graph=True: gradient penalties, Hessian-vector products) of the
    hand-written backward, against finite differences; values against the dense H."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 12, dtype=torch.float64, generator=generator).requires_grad_(x_requires_grad)
    u = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    if variant == "ether":
        inputs, dense = (x, u), dense_reflection(u)

        def transform(x, u):
            return householder_reflect(x, unit_grad(u))
    else:
        inputs, dense = (x, u, v), dense_ether_plus(u, v)

        def transform(x, u, v):
            return ether_plus_transform(x, unit_grad(u), unit_grad(v))

    assert torch.autograd.gradcheck(transform, inputs)
    assert torch.autograd.gradgradcheck(transform, inputs)
    torch.testing.assert_close(transform(*inputs), x @ dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["ether", "ether_plus"])
def test_input_gradient_through_a_frozen_adapter_is_the_dense_transpose(variant):
    """A frozen adapter (vectors without grad) still passes the input gradient: ∂L/∂x = g Hᵀ, from the dense H."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(5, 12, dtype=torch.float64, generator=generator, requires_grad=True)
    u = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    v = torch.randn(3, 4, dtype=torch.float64, generator=generator)
    g = torch.randn(5, 12, dtype=torch.float64, generator=generator)
    if variant == "ether":
        out, dense = householder_reflect(x, unit_grad(u)), dense_reflection(u)
    else:
        out, dense = ether_plus_transform(x, unit_grad(u), unit_grad(v)), dense_ether_plus(u, v)
    out.backward(g)
    torch.testing.assert_close(x.grad, g @ dense.T, rtol=1e-12, atol=1e-12)


def dense_layer_output(layer: EtherLayer, x: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict]:
    """`x (H_out W H_in)ᵀ + b` of a linear ETHER layer from leaf copies of its vectors, built densely in float64 (the
    adapters `names` composed like successive merges); returns the output and the leaves, keyed (container, name)."""
    leaves, weight = {}, out_in(layer.get_base_layer())
    for name in names:
        sides = {}
        for key in ("ether_u", "ether_v", "ether_u_out", "ether_v_out"):
            if name in getattr(layer, key):
                leaves[key, name] = sides[key] = getattr(layer, key)[name].detach().double().requires_grad_(True)
        h_in = dense_h(sides["ether_u"], sides.get("ether_v"))
        h_out = dense_h(sides["ether_u_out"], sides["ether_v_out"]) if "ether_u_out" in sides else None
        weight = weight @ h_in if h_out is None else h_out @ weight @ h_in
    bias = layer.get_base_layer().bias
    return x @ weight.T + (0 if bias is None else bias.detach().double()), leaves


@NEARLY_SINGULAR
@pytest.mark.parametrize("names", [["default"], ["default", "other"]])
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_gradients_match_dense_autograd(variant, names):
    """∂L/∂(x, every vector) of adapted nn.Linear and Conv1D layers (with bias; one adapter or two stacked) equal
    autograd through the dense float64 H."""
    model = two_layer_model(variant, init_weights=False).double()
    model.add_adapter("other", EtherConfig(target_modules=["lin", "conv"], n_blocks=4, variant=variant))
    if variant != "ether":
        move_away_from_identity(model, "other", std=1.0)
    model.base_model.set_adapter(names)
    x = torch.randn(5, 3, IN, dtype=torch.float64, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    outputs = [dense_layer_output(layer, x_ref, names) for layer in ether_layers(model)]
    (sum(out for out, _ in outputs) * g).sum().backward()

    # û is normalized in float32 (by design), hence tolerances of float32 size in a float64 comparison.
    torch.testing.assert_close(y.detach(), sum(out for out, _ in outputs).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for layer, (_, leaves) in zip(ether_layers(model), outputs, strict=True):
        assert len(leaves) == len(names) * {"ether": 1, "ether_plus": 4, "ether_plus_one_sided": 2}[variant]
        for (key, name), leaf in leaves.items():
            torch.testing.assert_close(getattr(layer, key)[name].grad, leaf.grad, rtol=1e-5, atol=1e-5)


class ProjectionThenInPlace(nn.Module):
    """`h = linear(x); h += x[..., :OUT]; relu_(h)`: in-place ops on a projection's output, as models write them
    (Gemma 4's `hidden_states = self.linear_end(hidden_states); hidden_states += residual`, LED's `/=`)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.lin = nn.Linear(IN, OUT, bias=bias)

    def forward(self, x):
        h = self.lin(x)
        h += x[..., :OUT]
        return h.relu_()


@NEARLY_SINGULAR
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_adapted_output_can_be_modified_in_place_downstream(variant, bias):
    torch.manual_seed(0)
    config = EtherConfig(target_modules=["lin"], n_blocks=2, variant=variant, init_weights=False)
    model = get_peft_model(ProjectionThenInPlace(bias), config).double()
    x = torch.randn(5, 3, IN, dtype=torch.float64, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    (layer,) = ether_layers(model)
    out, leaves = dense_layer_output(layer, x_ref, ["default"])
    y_ref = (out + x_ref[..., :OUT]).relu()
    (y_ref * g).sum().backward()

    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (key, name), leaf in leaves.items():
        torch.testing.assert_close(getattr(layer, key)[name].grad, leaf.grad, rtol=1e-5, atol=1e-5)


def plus_model(bias: bool):
    """Two-sided ETHER+ away from the identity on a Linear and a Conv1D (both with bias), or on a bias-free Linear."""
    if bias:
        model = two_layer_model("ether_plus", init_weights=False).double()
    else:
        torch.manual_seed(0)
        config = EtherConfig(target_modules=["lin"], n_blocks=2, variant="ether_plus", init_weights=False)
        model = get_peft_model(ProjectionThenInPlace(bias=False), config).double()
    move_away_from_identity(model, std=1.0)
    return model


@pytest.mark.parametrize("wrt", ["all", "vectors", "x"])
@pytest.mark.parametrize("layout", ["linear", "linear_without_bias", "conv1d"])
def test_two_sided_linear_values_and_derivatives(layout, wrt):
    """`ether_plus_linear` (what a two-sided ETHER+ linear layer runs) against the dense `H⁺_out W H⁺_in x + b`, and its
    first and second derivatives (create_graph=True) against finite differences, w.r.t. everything, the vectors only
    or `x` only (a frozen adapter)."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    x = draw(3, 2, IN).requires_grad_(wrt != "vectors")
    vectors = tuple(draw(*shape).requires_grad_(wrt != "x") for shape in [(3, 4), (3, 4), (2, 4), (2, 4)])
    weight, bias = draw(OUT, IN), None if layout == "linear_without_bias" else draw(OUT)
    stored, fan_in_fan_out = (weight.T.contiguous(), True) if layout == "conv1d" else (weight, False)

    def layer(x, u_in, v_in, u_out, v_out):
        hat_in, hat_out = (unit_grad(u_in), unit_grad(v_in)), (unit_grad(u_out), unit_grad(v_out))
        return ether_plus_linear(x, hat_in, hat_out, stored, bias, fan_in_fan_out)

    dense = dense_ether_plus(*vectors[2:]) @ weight @ dense_ether_plus(*vectors[:2])
    expected = x @ dense.T + (0 if bias is None else bias)
    torch.testing.assert_close(layer(x, *vectors), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(layer, (x, *vectors))
    assert torch.autograd.gradgradcheck(layer, (x, *vectors))


def test_two_sided_linear_refuses_trainable_weights_and_wrong_vector_shapes():
    weight, unit = torch.randn(OUT, IN), torch.ones(2, IN // 2)
    hat_out = (torch.ones(2, OUT // 2), torch.ones(2, OUT // 2))
    with pytest.raises(ValueError, match=r"computes no gradient for `weight` or `bias`.*Freeze them"):
        ether_plus_linear(torch.randn(3, IN), (unit, unit), hat_out, weight.requires_grad_(True))
    with pytest.raises(ValueError, match=r"`hat_out` must be two `\[n, 8 // n\]` tensors .* got shapes \(2, 3\)"):
        ether_plus_linear(torch.randn(3, IN), (unit, unit), (torch.ones(2, 3), torch.ones(2, 3)), weight.detach())


@pytest.mark.parametrize("bias", [True, False])
def test_two_sided_linear_keeps_no_output_sized_activation(bias):
    """Training memory: between forward and backward, two-sided ETHER+ on a linear layer keeps the input (as OFT does)
    and per-row coefficients, never a tensor of the layer's output size."""
    model = plus_model(bias)
    x = torch.randn(7, 5, IN, dtype=torch.float64, requires_grad=True)
    saved = []

    def keep_shape(tensor):
        saved.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep_shape, lambda tensor: tensor):
        y = model.base_model.model.lin(x)
    activations = [shape for shape in saved if shape.numel() >= y.numel()]
    assert activations == [x.shape], saved
    (y * torch.randn_like(y)).sum().backward()


@NEARLY_SINGULAR
@pytest.mark.parametrize("trainable", ["weight", "bias"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_trainable_base_parameters_get_the_dense_gradient(variant, trainable):
    """A base weight or bias left trainable gets its gradient of the dense `H_out W H_in x + b`."""
    model = two_layer_model(variant, init_weights=False).double()
    layers = ether_layers(model)
    trained = [getattr(layer.get_base_layer(), trainable).requires_grad_(True) for layer in layers]
    x = torch.randn(5, 3, IN, dtype=torch.float64, requires_grad=True)
    y = model(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, references = 0, []
    for layer in layers:
        base = layer.get_base_layer()
        weight = base.weight.detach().double().requires_grad_(trainable == "weight")
        bias = base.bias.detach().double().requires_grad_(trainable == "bias")
        h_out, h_in = dense_transforms(layer, "default")
        matrix = weight.T if isinstance(base, Conv1D) else weight  # [out, in]
        y_ref = y_ref + x_ref @ (h_out @ matrix @ h_in).T + bias
        references.append(weight if trainable == "weight" else bias)
    (y_ref * g).sum().backward()

    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for parameter, reference in zip(trained, references, strict=True):
        torch.testing.assert_close(parameter.grad, reference.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0, IN), (2, 0, IN)])
def test_two_sided_linear_on_an_empty_batch(shape):
    """No rows (an MoE expert without tokens): an empty output and zero gradients, forward and backward."""
    model = plus_model(bias=True)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = model(x)
    assert y.shape == (*shape[:-1], OUT)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for layer in ether_layers(model):
        for vectors in (layer.ether_u, layer.ether_v, layer.ether_u_out, layer.ether_v_out):
            assert not vectors["default"].grad.any()


@pytest.mark.parametrize("bias", [True, False])
def test_two_sided_linear_2d_input_and_strided_gradient(bias):
    """A 2-D input and a gradient that arrives as a transposed view (as from attention's head reshapes) match the
    dense reference."""
    model = plus_model(bias)
    layer = model.base_model.model.lin
    x = torch.randn(6, IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(OUT, 6, dtype=torch.float64)
    (layer(x).T * g).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    out, leaves = dense_layer_output(layer, x_ref, ["default"])
    (out.T * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for (key, name), leaf in leaves.items():
        torch.testing.assert_close(getattr(layer, key)[name].grad, leaf.grad, rtol=1e-5, atol=1e-5)


def test_frozen_adapter_lets_the_input_change_in_place_after_the_call():
    """With the adapter frozen, nothing of the input is kept for the backward: the model may modify it in place after
    the call, as it could without the adapter."""
    model = plus_model(bias=True)
    model.requires_grad_(False)
    layer = model.base_model.model.lin
    x = torch.randn(5, IN, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    y = layer(h)
    h.mul_(2)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    h_out, h_in = dense_transforms(layer, "default")
    torch.testing.assert_close(x.grad, g @ h_out @ out_in(layer.get_base_layer()) @ h_in, rtol=1e-5, atol=1e-5)


class ShiftedLinear(nn.Linear):
    """A Linear subclass with a forward of its own (here: + 1)."""

    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("kind", ["subclass", "patched_class"])
def test_a_linear_with_another_forward_runs_it(kind, monkeypatch):
    """Two-sided ETHER+ calls the base layer's own forward when it is not torch's (a subclass, or `nn.Linear.forward`
    patched at class level): the output is that forward's on `H_in x`, transformed by `H_out` around the bias."""
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(lin=ShiftedLinear(IN, OUT) if kind == "subclass" else nn.Linear(IN, OUT)))
    if kind == "patched_class":
        original = nn.Linear.forward
        monkeypatch.setattr(nn.Linear, "forward", lambda self, x: original(self, x) + 1)
    config = EtherConfig(target_modules=["lin"], n_blocks=2, variant="ether_plus", init_weights=False)
    model = get_peft_model(base, config).double()
    x = torch.randn(5, IN, dtype=torch.float64)
    (layer,) = ether_layers(model)
    h_out, h_in = dense_transforms(layer, "default")
    weight, bias = out_in(layer.get_base_layer()), layer.get_base_layer().bias.detach().double()
    # The base output W H_in x + b + 1: H_out acts on all of it but the bias.
    expected = (x @ h_in.T @ weight.T + 1) @ h_out.T + bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["module", "global"])
def test_forward_hook_on_the_base_layer_keeps_the_base_output(kind):
    """ETHER+ never writes into the base layer's output: a forward hook on the base layer (its own or a global one)
    sees `W H_in x + b`, not the adapted output."""
    model = two_layer_model("ether_plus", init_weights=False)
    bases = [layer.get_base_layer() for layer in ether_layers(model)]
    seen = []

    def keep(module, args, out):
        if module in bases:
            seen.append(out)

    if kind == "module":
        handles = [base.register_forward_hook(keep) for base in bases]
    else:
        handles = [nn.modules.module.register_module_forward_hook(keep)]
    x = torch.randn(4, IN)
    with torch.no_grad():
        model(x)
        for handle in handles:
            handle.remove()
        assert len(seen) == len(bases)
        for layer, out in zip(ether_layers(model), seen, strict=True):
            _, h_in = dense_transforms(layer, "default")
            base = layer.get_base_layer()
            expected = x.double() @ (out_in(base) @ h_in).T + base.bias.detach().double()
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def unit_grad(u: torch.Tensor) -> torch.Tensor:
    return u / u.norm(dim=-1, keepdim=True)


def test_ether_plus_inverse_matches_dense_inverse():
    torch.manual_seed(0)
    u, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    inverse = ether_plus_inverse(torch.eye(15, dtype=torch.float64), unit_grad(u), unit_grad(v))
    torch.testing.assert_close(inverse, torch.linalg.inv(dense_ether_plus(u, v)), rtol=1e-10, atol=1e-10)
    # det H⁺ = (û·v̂)² per block: the reason unmerge refuses when û·v̂ is near zero.
    for a, b in zip(unit_grad(u), unit_grad(v), strict=True):
        single = dense_ether_plus(a[None], b[None])
        assert torch.linalg.det(single).item() == pytest.approx((a @ b).item() ** 2, rel=1e-9)


def test_ether_with_one_block_equals_peft_hra_r1():
    # peft's HRA (tuners/hra/layer.py) merges W·H on the input side, with hra_u of shape [in, r].
    inputs = make_inputs("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    hra = get_peft_model(make_model("llama"), HRAConfig(r=1, target_modules=targets, init_weights=False)).eval()
    ether = get_peft_model(make_model("llama"), EtherConfig(target_modules=targets, n_blocks=1)).eval()
    hra_vectors = {n: p for n, p in hra.named_parameters() if "hra_u" in n}
    with torch.no_grad():
        for name, param in ether.named_parameters():
            if "ether_u" in name:
                param.copy_(hra_vectors[name.replace("ether_u", "hra_u")].T)
        assert len(hra_vectors) == 2 * 3
        torch.testing.assert_close(ether(**inputs).logits, hra(**inputs).logits, rtol=1e-5, atol=1e-5)
        base = make_model("llama")(**inputs).logits
        assert not torch.allclose(ether(**inputs).logits, base, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_blocks", [2, 4, 8])
def test_parameter_count_is_independent_of_n_blocks(variant, n_blocks):
    targets = ["q_proj", "k_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        make_model("llama"), EtherConfig(target_modules=targets, n_blocks=n_blocks, variant=variant)
    )
    per_layer = {
        "ether": lambda i, o: i,
        "ether_plus": lambda i, o: 2 * (i + o),
        "ether_plus_one_sided": lambda i, o: 2 * i,
    }
    # llama: hidden 32, k_proj 32 → 16 (2 kv heads), intermediate 64; two decoder layers.
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "up_proj": (32, 64), "down_proj": (64, 32)}
    expected = 2 * sum(per_layer[variant](i, o) for i, o in shapes.values())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["ether_plus", "ether_plus_one_sided"])
def test_ether_plus_starts_at_identity_exactly(model_name, variant):
    inputs = make_inputs(model_name)
    base = make_model(model_name)(**inputs).logits
    config = EtherConfig(target_modules="all-linear", n_blocks=4, variant=variant, task_type=task_type(model_name))
    model = get_peft_model(make_model(model_name), config).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base, rtol=0, atol=0)
    random_config = EtherConfig(
        target_modules="all-linear", n_blocks=4, variant=variant, init_weights=False, task_type=task_type(model_name)
    )
    model = get_peft_model(make_model(model_name), random_config).eval()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, base, atol=1e-3)


@pytest.mark.parametrize("init_weights", [True, False])
def test_plain_ether_starts_from_a_random_reflection(init_weights):
    inputs = make_inputs("llama")
    base = make_model("llama")(**inputs).logits
    config = EtherConfig(target_modules=["q_proj", "v_proj"], n_blocks=4, init_weights=init_weights)
    model = get_peft_model(make_model("llama"), config).eval()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, base, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_vectors_give_identity_not_nan(variant):
    model = two_layer_model(variant).eval()
    with torch.no_grad():
        for layer in ether_layers(model):
            for container in (layer.ether_u, layer.ether_v, layer.ether_u_out, layer.ether_v_out):
                if "default" in container:
                    container["default"].zero_()
        x = torch.randn(3, IN)
        out = model(x)
        with model.disable_adapter():
            base = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, rtol=0, atol=1e-6)


@NEARLY_SINGULAR
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_forward_and_merge(dtype, variant):
    inputs = make_inputs("llama")
    config = EtherConfig(target_modules="all-linear", n_blocks=4, variant=variant, init_weights=False)
    reference = get_peft_model(make_model("llama"), config).eval()
    torch.manual_seed(0)
    half = get_peft_model(make_model("llama").to(dtype), config).eval()
    half.load_state_dict(reference.state_dict())
    # peft upcasts half-precision adapter vectors to float32 (autocast_adapter_dtype); normalization is float32 too.
    assert all(p.dtype == torch.float32 for n, p in half.named_parameters() if "ether_" in n)
    with torch.no_grad():
        expected = reference(**inputs).logits
        out = half(**inputs).logits
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)
        half.merge_adapter()
        assert all(layer.get_base_layer().weight.dtype == dtype for layer in ether_layers(half))
        torch.testing.assert_close(half(**inputs).logits.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_step_under_bf16_autocast_matches_float32(variant):
    """Trainer(bf16=True) and accelerate run the model under autocast: the adapter's gradients must still flow."""
    inputs = make_inputs("llama")
    config = EtherConfig(target_modules="all-linear", n_blocks=4, variant=variant, init_weights=False)
    gradients = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), config)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "ether_" in n]))
    assert torch.isfinite(gradients[1]).all()
    assert torch.nn.functional.cosine_similarity(gradients[0], gradients[1], dim=0) > 0.99


# transformers 5.24 renames it activation_checkpointing_enable; the old name still works from 5.23 (our lower bound).
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(model_name):
    """Recomputing the forward in backward (reentrant or not) gives the gradients of a plain backward."""
    inputs = make_inputs(model_name)
    config = EtherConfig(target_modules="all-linear", n_blocks=4, variant="ether_plus", init_weights=False)
    gradients = []
    for checkpointing in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        torch.manual_seed(0)
        model = get_peft_model(make_model(model_name), config).train()
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            model.enable_input_require_grads()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "ether_" in n]))
    assert gradients[0].abs().max() > 0
    for other in gradients[1:]:
        torch.testing.assert_close(other, gradients[0], rtol=1e-5, atol=1e-7)


def test_inference_mode_call_first_does_not_break_training_later():
    """Nothing computed under torch.inference_mode (e.g. a pipeline call) may be kept and reused by training."""
    inputs = make_inputs("llama")
    model = get_peft_model(make_model("llama"), EtherConfig(target_modules="all-linear", n_blocks=4))
    with torch.inference_mode():
        model(**inputs)
        model.merge_adapter()
        model.unmerge_adapter()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "ether_" in n)


# -- merge / unmerge ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_restores_weights(variant):
    model = two_layer_model(variant)
    move_away_from_identity(model, std=1.0)
    before = {layer: layer.get_base_layer().weight.detach().clone() for layer in ether_layers(model)}
    model.merge_adapter()
    assert all(not torch.allclose(layer.get_base_layer().weight, w) for layer, w in before.items())
    model.unmerge_adapter()
    for layer, weight in before.items():
        restored = layer.get_base_layer().weight.detach()
        relative = ((restored - weight).norm() / weight.norm()).item()
        # ETHER: H is its own inverse (an involution), so unmerge is exact up to float32 rounding.
        assert relative < (1e-6 if variant == "ether" else 1e-5), relative


def test_ether_plus_unmerge_refuses_when_ill_conditioned():
    model = two_layer_model("ether_plus")
    layer = ether_layers(model)[0]
    with torch.no_grad():
        u = layer.ether_u["default"]
        v = torch.randn_like(u)
        v -= (v * u).sum(-1, keepdim=True) / (u * u).sum(-1, keepdim=True) * u  # v ⟂ u: det H⁺ = 0
        layer.ether_v["default"].copy_(v)
    with pytest.warns(UserWarning, match="could not be unmerged accurately"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot unmerge ETHER\+ adapter 'default'.*Reload the base model"):
        model.unmerge_adapter()
    # The refusal leaves the adapter merged (and the model usable), the threshold being the documented one.
    assert layer.merged and layer.unmerge_error() > unmerge_tolerance(torch.float32)


def test_safe_merge_rejects_non_finite_weights():
    model = two_layer_model("ether")
    with torch.no_grad():
        ether_layers(model)[0].ether_u["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs detected"):
        model.merge_and_unload(safe_merge=True)


def test_disabling_a_merged_adapter_unmerges_it():
    model = two_layer_model("ether").eval()
    x = torch.randn(2, IN)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        adapted = model(x)
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ether_layers(model)[0].unmerge()
        ether_layers(model)[0].unmerge()
    assert any("Already unmerged" in str(w.message) for w in caught)


# -- behaviour through peft -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_few_training_steps_lower_the_loss(model_name, variant):
    torch.manual_seed(0)
    inputs = make_inputs(model_name, batch=4, seq_len=12)
    config = EtherConfig(target_modules="all-linear", n_blocks=4, variant=variant, task_type="CAUSAL_LM")
    model = get_peft_model(make_model(model_name), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def eval_loss() -> float:
        # In eval mode, so that GPT-2's dropout does not blur the comparison.
        with torch.no_grad():
            return model.eval()(**inputs, labels=labels).loss.item()

    before = eval_loss()
    model.train()
    for _ in range(10):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = eval_loss()
    assert after < before - 0.03, (before, after)


def test_generate_with_mixed_adapter_names():
    inputs = make_inputs("llama", batch=2)
    inputs["attention_mask"][:] = 1
    config = EtherConfig(target_modules=["q_proj", "v_proj"], n_blocks=4, variant="ether")
    model = get_peft_model(make_model("llama"), config).eval()
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    mixed = model.generate(**inputs, adapter_names=["default", "__base__"], **kwargs)
    alone = model.generate(**{k: v[:1] for k, v in inputs.items()}, **kwargs)
    with model.disable_adapter():
        base = model.generate(**{k: v[1:] for k, v in inputs.items()}, **kwargs)
    assert mixed[0].equal(alone[0]) and mixed[1].equal(base[0])


# -- convolutions ---------------------------------------------------------------------------------------------------


class CausalConv1d(nn.Conv1d):
    """Left-pads its input in its own forward, as audio models' causal convolutions do."""

    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - 1, 0)))


# Fan-ins (in_channels / groups · kernel elements): 6·3 = 18, 3·3·2 = 18 (two groups), 6·9 = 54, 6·2·2·2 = 48.
CONVS = {
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, padding=1), (6, 7)),
    "causal_conv1d": (lambda: CausalConv1d(6, 8, 3), (6, 7)),
    "conv2d": (lambda: nn.Conv2d(6, 8, (3, 2), stride=2, padding=1, groups=2), (6, 6, 5)),
    "conv2d_reflect_no_bias": (lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect", bias=False), (6, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(6, 8, 2, dilation=(1, 2, 1)), (6, 4, 5, 3)),
}


def conv_model(kind: str, variant: str, **kwargs):
    torch.manual_seed(0)
    return get_peft_model(
        nn.Sequential(CONVS[kind][0]()), EtherConfig(target_modules=["0"], n_blocks=2, variant=variant, **kwargs)
    )


def conv_input(kind: str, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, *CONVS[kind][1])


def dense_conv_weight(layer: EtherLayer, names: list[str]) -> torch.Tensor:
    """H_out W H_in (per adapter, in merge order) in float64, with W = weight.flatten(1) and each H built densely."""
    base = layer.get_base_layer()
    weight = base.weight.detach().double().flatten(1)
    for name in names:
        h_out, h_in = dense_transforms(layer, name)
        weight = h_out @ weight @ h_in
    return weight.reshape(base.weight.shape)


def conv_reference(layer: EtherLayer, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """A float64 copy of the base layer with the dense weight, run through the layer's own forward (padding modes,
    subclasses' padding)."""
    reference = copy.deepcopy(layer.get_base_layer()).double()
    with torch.no_grad():
        reference.weight.copy_(dense_conv_weight(layer, names))
        return reference(x.double())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_forward_merge_unmerge_match_dense_reference(kind, variant):
    model = conv_model(kind, variant).eval()
    move_away_from_identity(model, std=0.1)  # blocks of up to 27 features: keeps |û·v̂| well above the unmerge limit
    layer = ether_layers(model)[0]
    assert isinstance(layer, EtherConv)
    x = conv_input(kind)
    expected = conv_reference(layer, x, ["default"])
    base_weight = layer.get_base_layer().weight.detach().clone()
    expected_weight = dense_conv_weight(layer, ["default"])
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(layer.get_base_layer().weight.double(), expected_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    restored = layer.get_base_layer().weight.detach()
    assert ((restored - base_weight).norm() / base_weight.norm()).item() < (1e-6 if variant == "ether" else 1e-5)


def test_conv_identity_adapter_keeps_a_subclass_forward():
    """ETHER+ at init is the identity: a subclass that pads in its own forward must give the base output exactly."""
    model = conv_model("causal_conv1d", "ether_plus").eval()
    x = conv_input("causal_conv1d")
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)


@NEARLY_SINGULAR
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_half_precision_forward_close_to_float32_and_to_merged(dtype):
    """The filters are transformed in float32 and rounded once, as merging does: unmerged ≈ merged in half precision
    (rounding each transform in the half dtype gave 8e-3 apart in bf16)."""
    model = conv_model("conv2d_reflect_no_bias", "ether_plus", init_weights=False).eval()
    layer = ether_layers(model)[0]
    x = conv_input("conv2d_reflect_no_bias")
    expected = conv_reference(layer, x, ["default"])
    model.to(dtype)
    with torch.no_grad():
        out = model(x.to(dtype))
        model.merge_adapter()
        merged = model(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, rtol=0.02, atol=0.02)
    assert (out.float() - merged.float()).abs().max() <= (2e-3 if dtype == torch.bfloat16 else 3e-4)


@NEARLY_SINGULAR
@pytest.mark.parametrize("variant", VARIANTS)
def test_conv_gradients_match_dense_autograd(variant):
    """∂L/∂(x, u, v, u_out, v_out) of an adapted Conv2d equal autograd through the dense float64 H."""
    model = conv_model("conv2d", variant, init_weights=False).double()
    layer = ether_layers(model)[0]
    x = conv_input("conv2d").double().requires_grad_(True)
    y = model(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()

    params = {
        k: layer_dict["default"].detach().clone().requires_grad_(True)
        for k, layer_dict in [
            ("u", layer.ether_u),
            ("v", layer.ether_v),
            ("u_out", layer.ether_u_out),
            ("v_out", layer.ether_v_out),
        ]
        if "default" in layer_dict
    }
    x_ref = x.detach().clone().requires_grad_(True)
    base = layer.get_base_layer()
    h_in = dense_h(params["u"], params.get("v"))
    h_out = dense_h(params["u_out"], params["v_out"]) if "u_out" in params else torch.eye(base.out_channels).double()
    weight = (h_out @ base.weight.detach().flatten(1) @ h_in).reshape(base.weight.shape)
    y_ref = F.conv2d(x_ref, weight, base.bias.detach(), base.stride, base.padding, base.dilation, base.groups)
    (y_ref * g).sum().backward()

    # û is normalized in float32 (by design), hence tolerances of float32 size in a float64 comparison.
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    containers = {"u": layer.ether_u, "v": layer.ether_v, "u_out": layer.ether_u_out, "v_out": layer.ether_v_out}
    for key, leaf in params.items():
        torch.testing.assert_close(containers[key]["default"].grad, leaf.grad, rtol=1e-5, atol=1e-6)


@NEARLY_SINGULAR
@pytest.mark.parametrize("variant", ["ether", "ether_plus"])
def test_conv_mixed_batch_and_two_active_adapters(variant):
    """Two convolutions; "other" adapts the second one only, so its samples see the base first layer."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    config = EtherConfig(target_modules=["0", "1"], n_blocks=2, variant=variant, init_weights=False)
    model = get_peft_model(base, config)
    model.add_adapter("other", EtherConfig(target_modules=["1"], n_blocks=2, variant=variant, init_weights=False))
    model.eval()
    first, second = ether_layers(model)
    x = torch.randn(4, 6, 5, 5)

    def reference(sample: torch.Tensor, names: list[str]) -> torch.Tensor:
        hidden = conv_reference(first, sample, [name for name in names if name in first.ether_u])
        return conv_reference(second, hidden, names)

    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names).double()
        for i, name in enumerate(names):
            expected = reference(x[i : i + 1], [] if name == "__base__" else [name])
            torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-5)
        model.base_model.set_adapter(["default", "other"])
        torch.testing.assert_close(model(x).double(), reference(x, ["default", "other"]), rtol=1e-5, atol=1e-5)


def tiny_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
    )
    return ResNetForImageClassification(config)


@pytest.mark.parametrize("variant", ["ether", "ether_plus"])
def test_conv_model_trains_and_reloads(tmp_path, variant):
    """A tiny ResNet's 3×3 convolutions (fan-ins 72 and 144): training lowers the loss; save/load reproduces it."""
    config = EtherConfig(target_modules=r".*layer\.\d\.convolution", n_blocks=4, variant=variant)
    model = get_peft_model(tiny_resnet(), config)
    assert sum(isinstance(m, EtherConv) for m in model.modules()) == 4
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (8,), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)

    def eval_loss() -> float:
        with torch.no_grad():
            return model(pixel_values=pixels, labels=labels).loss.item()

    # Kept in eval mode: batch norm's running statistics are base-model buffers, not saved with the adapter.
    model.eval()
    before = eval_loss()
    for _ in range(10):
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = eval_loss()
    assert after < before - 0.03, (before, after)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_resnet(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_conv_errors_name_the_problem():
    def adapt(conv: nn.Module, **kwargs):
        return get_peft_model(nn.Sequential(conv), EtherConfig(target_modules=["0"], **kwargs))

    fan_in = r"the fan-in in_channels/groups × kernel elements = 3 × 9 = 27 of module '0'"
    with pytest.raises(ValueError, match=fan_in + r".*Valid block counts for this layer: 1, 3, 9\."):
        adapt(nn.Conv2d(6, 8, 3, groups=2), n_blocks=4)
    with pytest.raises(
        ValueError, match=r"does not split out_channels=9 of module '0'.*block counts for this layer: 1, 3\."
    ):
        adapt(nn.Conv1d(6, 9, 2), n_blocks=2, variant="ether_plus")
    # An output block spanning two groups would mix filters that read different input channels.
    with pytest.raises(ValueError, match=r"groups=2, needs `n_blocks` to be a multiple of groups \(got 1\).*: 2\. Or"):
        adapt(nn.Conv2d(4, 4, 3, groups=2), n_blocks=1, variant="ether_plus")
    adapt(nn.Conv2d(4, 4, 3, groups=2), n_blocks=1, variant="ether_plus_one_sided")
    with pytest.raises(ValueError, match=r"= 2 × 9 = 18 of module '0'.*Valid block counts for this layer: 2\. Set"):
        adapt(nn.Conv2d(4, 8, 3, groups=2), n_blocks=4, variant="ether_plus")  # 1 and 2 divide both; groups=2 → 2
    with pytest.raises(ValueError, match=r"convolution '0': its weight is computed by a parametrization \(such as "):
        adapt(nn.utils.parametrizations.weight_norm(nn.Conv1d(6, 8, 3)), n_blocks=2)
    with pytest.raises(TypeError, match=r"type `ConvTranspose2d`; supported layer types are .*Linear.*Conv1D.*Conv2d"):
        adapt(nn.ConvTranspose2d(4, 4, 3), n_blocks=2)


def test_conv_safe_merge_rejects_non_finite_weights():
    model = conv_model("conv1d", "ether")
    with torch.no_grad():
        ether_layers(model)[0].ether_u["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or infs detected"):
        model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("global_hook", [False, True])
def test_conv_threads_leave_the_base_weight_untouched(global_hook):
    """Serving threads share the model: an adapted plain convolution must not write to its base layer, even while a
    global module hook (as `FlopCounterMode` registers) is active."""
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None) if global_hook else None
    model = conv_model("conv1d", "ether_plus", init_weights=False).eval()
    base = ether_layers(model)[0].get_base_layer()
    weight, values = base.weight, base.weight.detach().clone()
    x = conv_input("conv1d")
    with torch.no_grad():
        expected = model(x)

        def serve() -> None:
            for _ in range(50):
                model(x)

        threads = [threading.Thread(target=serve) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert base.weight is weight and torch.equal(base.weight, values)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_full_backward_hook_on_the_base_layer_fires_and_keeps_gradients(kind):
    """A full backward hook on the base layer runs (so a convolution must go through the module call, not
    `_conv_forward`) and wraps the output in a view, and the gradients are those without the hook."""
    if kind == "linear":
        model, x = two_layer_model("ether_plus", init_weights=False), torch.randn(4, IN, requires_grad=True)
    else:
        model, x = conv_model("conv2d", "ether_plus", init_weights=False), conv_input("conv2d").requires_grad_(True)
    bases = [layer.get_base_layer() for layer in ether_layers(model)]
    gradients, calls = [], []
    for hooked in (False, True):
        if hooked:
            for base in bases:
                base.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(module))
        model.zero_grad()
        x.grad = None
        out = model(x)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        gradients.append([x.grad.clone()] + [p.grad.clone() for n, p in model.named_parameters() if "ether_" in n])
    assert sorted(map(id, calls)) == sorted(map(id, bases))
    for with_hook, without in zip(gradients[1], gradients[0], strict=True):
        torch.testing.assert_close(with_hook, without)


def test_conv_subclass_with_its_own_call_runs_it():
    """A convolution whose class overrides `__call__` (instrumentation wrappers do) is called, not bypassed."""

    class CountingConv(nn.Conv2d):
        calls = 0

        def __call__(self, *args, **kwargs):
            CountingConv.calls += 1
            return super().__call__(*args, **kwargs)

    torch.manual_seed(0)
    config = EtherConfig(target_modules=["0"], n_blocks=2, variant="ether_plus", init_weights=False)
    model = get_peft_model(nn.Sequential(CountingConv(4, 6, 3)), config)
    layer = ether_layers(model)[0]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = model(x)
    assert CountingConv.calls == 1
    base = layer.get_base_layer()
    expected = F.conv2d(x.double(), dense_conv_weight(layer, ["default"]), base.bias.detach().double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_conv_empty_mixed_batch():
    model = conv_model("conv1d", "ether").eval()
    with torch.no_grad():
        assert model(conv_input("conv1d")[:0], adapter_names=[]).shape == (0, 8, 7)


def offload_base_layers(model) -> None:
    """accelerate's CPU offload: weights live on the meta device and are loaded by a hook for each call."""
    for layer in ether_layers(model):
        base = layer.get_base_layer()
        weights = {key: value.detach().clone() for key, value in base.state_dict().items()}
        add_hook_to_module(
            base, AlignDevicesHook(execution_device=torch.device("cpu"), offload=True, weights_map=weights)
        )


@pytest.mark.parametrize(
    ("kind", "variant", "error"),
    [
        ("linear", "ether", None),
        ("linear", "ether_plus_one_sided", None),
        ("linear", "ether_plus", r"needs the bias of a layer with two-sided ETHER\+ in memory, but it is on the meta"),
        ("conv", "ether", r"needs a convolution's weight in memory, but it is on the meta device \(offloaded"),
    ],
)
def test_offloaded_base_layers_run_or_raise_a_clear_error(kind, variant, error):
    if kind == "linear":
        model, x = two_layer_model(variant, init_weights=False), torch.randn(2, IN)
    else:
        model, x = conv_model("conv1d", variant, init_weights=False), conv_input("conv1d")
    model.eval()
    with torch.no_grad():
        expected = model(x)
        offload_base_layers(model)
        assert ether_layers(model)[0].get_base_layer().weight.device.type == "meta"
        if error is None:
            torch.testing.assert_close(model(x), expected)
        else:
            with pytest.raises(RuntimeError, match=error):
                model(x)


def test_parametrized_linear_weight_runs_but_refuses_to_merge():
    """weight_norm recomputes `weight` at each access: the activation-side forward works, a merge would be lost."""
    torch.manual_seed(0)
    # Named "lin": a target "0" would also match the parametrization's own submodule "0.parametrizations.weight.0".
    model = nn.Sequential(OrderedDict(lin=nn.utils.parametrizations.weight_norm(nn.Linear(8, 6))))
    model = get_peft_model(model, EtherConfig(target_modules=["lin"], n_blocks=2)).eval()
    layer = ether_layers(model)[0]
    x = torch.randn(3, 8)
    weight = layer.get_base_layer().weight.detach().double()
    expected = x.double() @ (weight @ dense_reflection(layer.ether_u["default"])).T
    expected = expected + layer.get_base_layer().bias.detach().double()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"Cannot merge ETHER into a `ParametrizedLinear` whose weight is computed"):
        model.merge_adapter()


# -- errors and config ----------------------------------------------------------------------------------------------


def test_block_count_that_does_not_divide_names_module_and_valid_counts():
    config = EtherConfig(target_modules=["up_proj"], n_blocks=5)
    with pytest.raises(ValueError, match=re.escape("in_features=32 of module 'model.layers.0.mlp.up_proj'")) as info:
        get_peft_model(make_model("llama"), config)
    assert "Valid block counts for this layer: 1, 2, 4, 8, 16." in str(info.value)


def test_ether_plus_block_count_must_divide_both_sides():
    model = TwoLayers()
    model.lin = nn.Linear(12, 10)
    with pytest.raises(
        ValueError, match=r"out_features=10 of module 'lin'.*Valid block counts for this layer: 1, 2\."
    ):
        get_peft_model(model, EtherConfig(target_modules=["lin"], n_blocks=3, variant="ether_plus"))
    # One-sided ETHER+ only splits the input side, so n_blocks=3 is fine there.
    get_peft_model(TwoLayers(), EtherConfig(target_modules=["lin"], n_blocks=3, variant="ether_plus_one_sided"))


def test_block_of_one_feature_is_refused():
    with pytest.raises(ValueError, match="blocks of at least two features"):
        get_peft_model(TwoLayers(), EtherConfig(target_modules=["lin"], n_blocks=12))


def test_unsupported_layer_type_lists_supported_ones():
    with pytest.raises(TypeError, match=r"type `Embedding`; supported layer types are .*Linear.*Conv1D"):
        get_peft_model(make_model("llama"), EtherConfig(target_modules=["embed_tokens"], n_blocks=4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "ether+"}, r"`variant`='ether\+' is not an ETHER variant; choose one of 'ether', 'ether_plus'"),
        ({"n_blocks": 0}, "`n_blocks` must be a positive integer, got 0"),
        ({"n_blocks": 2.0}, "`n_blocks` must be a positive integer, got 2.0"),
        ({"fan_in_fan_out": "yes"}, "`fan_in_fan_out` must be None, True or False, got 'yes'"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "`layers_to_transform` cannot be used"),
        ({"target_modules": ".*q_proj", "layers_pattern": "layers"}, "`layers_pattern` cannot be used"),
        ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, "`layers_to_transform` is None"),
    ],
)
def test_config_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EtherConfig(**kwargs)


@NEARLY_SINGULAR
@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_contradicting_fan_in_fan_out_warns_and_keeps_each_layers_layout(fan_in_fan_out):
    # TwoLayers holds one layer of each layout, so exactly one of them contradicts the explicit value.
    wrong_type = "Linear" if fan_in_fan_out else "Conv1D"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explicit = two_layer_model("ether_plus", init_weights=False, fan_in_fan_out=fan_in_fan_out).eval()
    messages = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert len(messages) == 1, messages
    assert re.match(
        rf"fan_in_fan_out is set to {fan_in_fan_out} but some target modules are `{wrong_type}`", messages[0]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inferred = two_layer_model("ether_plus", init_weights=False).eval()
    x = torch.randn(4, IN)
    expected = reference_output(inferred, x, ["default"])
    with torch.no_grad():
        torch.testing.assert_close(explicit(x).double(), expected, rtol=1e-5, atol=1e-5)
        explicit.merge_adapter()
        torch.testing.assert_close(explicit(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_layers_to_transform_adapts_only_those_layers():
    config = EtherConfig(target_modules=["q_proj"], n_blocks=4, layers_to_transform=[1], layers_pattern="layers")
    model = get_peft_model(make_model("llama"), config)
    adapted = [name for name, module in model.named_modules() if isinstance(module, EtherLinear)]
    assert adapted == ["base_model.model.model.layers.1.self_attn.q_proj"]


def test_default_config_and_help_equal_docstring():
    config = EtherConfig()
    assert (config.n_blocks, config.variant, config.init_weights) == (32, "ether", True)
    assert (config.block_layout, config.ether_dropout) == ("paper", 0.0)
    assert config.peft_type.value == "ETHER"
    doc = " ".join(EtherConfig.__doc__.split())
    for f in fields(EtherConfig):
        if f.name in {"target_modules", "exclude_modules", "n_blocks", "variant", "init_weights"} | {
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
            "fan_in_fan_out",
            "block_layout",
            "ether_dropout",
        }:
            help_text = " ".join(f.metadata["help"].split())
            assert help_text in doc, f.name
