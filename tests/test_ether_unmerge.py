"""The ETHER+ unmerge guard: the error estimate against a float64 dense reference and against measured errors,
refusals, and `disable_adapter()`."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from xpeft import EtherConfig
from xpeft.ether import EtherLayer
from xpeft.ether import layer as ether_layer
from xpeft.ether.layer import UNMERGE_RTOL, unmerge_tolerance

IN, OUT, N_BLOCKS = 32, 16, 2


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(IN, OUT)
        self.second = nn.Linear(OUT, IN)

    def forward(self, x):
        return self.second(self.first(x))


def ether_plus_model(variant: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = EtherConfig(target_modules=["first", "second"], n_blocks=N_BLOCKS, variant=variant)
    return get_peft_model(TwoLinears().to(dtype), config)


def layers(model) -> list[EtherLayer]:
    return [module for module in model.modules() if isinstance(module, EtherLayer)]


def set_alignment(u: torch.Tensor, v: torch.Tensor, c: float, generator: torch.Generator) -> None:
    """Set `v` so that `û·v̂ = c` in every block: `v = c û + √(1 − c²) w`, `w` a unit vector ⟂ `û`."""
    with torch.no_grad():
        u_hat = u / u.norm(dim=-1, keepdim=True)
        w = torch.randn(u.shape, generator=generator)
        w -= (w * u_hat).sum(-1, keepdim=True) * u_hat
        w /= w.norm(dim=-1, keepdim=True)
        v.copy_(c * u_hat + math.sqrt(1 - c**2) * w)


def align(layer: EtherLayer, c: float, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    set_alignment(layer.ether_u["default"], layer.ether_v["default"], c, generator)
    if "default" in layer.ether_u_out:
        set_alignment(layer.ether_u_out["default"], layer.ether_v_out["default"], c, generator)


def dense_h_plus(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Block-diagonal `H⁺ = diag(I − û ûᵀ + v̂ v̂ᵀ)` in float64, built explicitly."""
    blocks = []
    for u_b, v_b in zip(u.detach().double(), v.detach().double(), strict=True):
        u_b, v_b = u_b / u_b.norm(), v_b / v_b.norm()
        blocks.append(torch.eye(len(u_b), dtype=torch.float64) - torch.outer(u_b, u_b) + torch.outer(v_b, v_b))
    return torch.block_diag(*blocks)


def dense_transforms(layer: EtherLayer) -> tuple[torch.Tensor, torch.Tensor]:
    h_in = dense_h_plus(layer.ether_u["default"], layer.ether_v["default"])
    if "default" not in layer.ether_u_out:
        return torch.eye(layer.out_features, dtype=torch.float64), h_in
    return dense_h_plus(layer.ether_u_out["default"], layer.ether_v_out["default"]), h_in


def perfect_round_trip(dtype: torch.dtype) -> float:
    """The expected error of merging and unmerging an orthogonal transform: two roundings to `dtype`, each of RMS
    `u/√3` relative (round to nearest, unit roundoff `u = eps/2`)."""
    return torch.finfo(dtype).eps / 2 / math.sqrt(3) * math.sqrt(2)


def rms_spread(h: torch.Tensor) -> float:
    """`γ ρ` from the SVD of a dense `h`: root mean square of its singular values times that of their inverses."""
    sigma = torch.linalg.svdvals(h)
    return (sigma.pow(2).mean() * sigma.pow(-2).mean()).sqrt().item()


def dense_estimate(layer: EtherLayer, dtype: torch.dtype) -> float:
    """`(u/√3) √(1 + (a_out a_in)²)` for one merged adapter, with the amplifications taken from the dense matrices'
    singular values, independently of the layer's closed form."""
    h_out, h_in = dense_transforms(layer)
    amplification = rms_spread(h_out) * rms_spread(h_in)
    return perfect_round_trip(dtype) / math.sqrt(2) * math.sqrt(1 + amplification**2)


def relative_error(restored: torch.Tensor, weight: torch.Tensor) -> float:
    return ((restored.double() - weight).norm() / weight.norm()).item()


@pytest.mark.parametrize(
    ("variant", "c"),
    [
        ("ether_plus_one_sided", 0.9),
        ("ether_plus_one_sided", 0.08),  # the example: κ ≈ 625
        ("ether_plus_one_sided", 0.03),
        ("ether_plus", 0.9),
        ("ether_plus", 0.3),
        ("ether_plus", 0.08),  # κ_out κ_in ≈ 625²: refused by the old worst-case bound
    ],
)
def test_unmerge_error_matches_the_estimate(variant, c):
    """Merge and unmerge in float32 against float64 dense math: the merged weight is `H_out W H_in` correctly rounded,
    the layer's estimate is the one the dense singular values give, and the restored weight is within a small factor
    of it (an estimate of the expected error, not a bound)."""
    model = ether_plus_model(variant)
    for index, layer in enumerate(layers(model)):
        align(layer, c, seed=index)
    originals = [layer.get_base_layer().weight.detach().double().clone() for layer in layers(model)]
    model.merge_adapter()
    estimates = []
    for layer, weight in zip(layers(model), originals, strict=True):
        h_out, h_in = dense_transforms(layer)
        merged = layer.get_base_layer().weight.detach().double()
        torch.testing.assert_close(merged, h_out @ weight @ h_in, rtol=2e-7, atol=2e-7)
        estimate = layer.unmerge_error()
        assert estimate == pytest.approx(dense_estimate(layer, torch.float32), rel=1e-6)
        assert estimate <= UNMERGE_RTOL
        estimates.append(estimate)
    model.unmerge_adapter()
    for layer, weight, estimate in zip(layers(model), originals, estimates, strict=True):
        assert relative_error(layer.get_base_layer().weight.detach(), weight) <= 3 * estimate
        assert not layer.merged


def test_the_estimate_tracks_measured_unmerge_errors(monkeypatch):
    """Calibration over 240 random two-sided ETHER+ layers (sizes 2–64, 1–4 blocks, |û·v̂| from 1e-4 to 1, the
    guard lifted): the measured error of the restored float32 weight is never above 3× the estimate and typically
    about half of it, so the estimate neither hides real errors nor refuses adapters 100× too early, as the
    worst-case condition-number bound `(eps/2)(1 + κ_out κ_in)` does."""
    monkeypatch.setattr(ether_layer, "UNMERGE_RTOL", math.inf)
    generator = torch.Generator().manual_seed(0)
    shapes = [(10, 20, 1), (20, 2, 1), (32, 16, 2), (64, 32, 4), (16, 16, 4), (48, 24, 2)]
    ratios, worst_case_ratios = [], []
    for trial in range(240):
        in_features, out_features, n_blocks = shapes[trial % len(shapes)]
        layer = get_peft_model(
            nn.Sequential(nn.Linear(in_features, out_features)),
            EtherConfig(target_modules=["0"], n_blocks=n_blocks, variant="ether_plus"),
        ).base_model.model[0]
        c = 10 ** (-4 * torch.rand((), generator=generator).item())
        set_alignment(layer.ether_u["default"], layer.ether_v["default"], c, generator)
        set_alignment(layer.ether_u_out["default"], layer.ether_v_out["default"], c, generator)
        weight = layer.get_base_layer().weight.detach().double().clone()
        layer.merge()
        estimate = layer.unmerge_error()
        h_out, h_in = dense_transforms(layer)
        worst_case = torch.finfo(torch.float32).eps / 2 * (1 + (torch.linalg.cond(h_out) * torch.linalg.cond(h_in)).item())
        layer.unmerge()
        error = relative_error(layer.get_base_layer().weight.detach(), weight)
        ratios.append(error / estimate)
        worst_case_ratios.append(error / worst_case)
    ratios = torch.tensor(ratios)
    print(f"measured/estimate: max {ratios.max():.2f}, 99% {ratios.quantile(0.99):.2f}, median {ratios.median():.2f}; "
          f"measured/worst case: median {torch.tensor(worst_case_ratios).median():.4f}")
    assert ratios.max() <= 3, ratios.max()
    assert 0.2 <= ratios.median() <= 1, ratios.median()
    assert torch.tensor(worst_case_ratios).median() < 0.05


def test_unmerge_above_the_tolerance_is_refused_and_changes_nothing():
    """Two-sided ETHER+ with |û·v̂| = 0.03 on both sides: the float32 error estimate is about 2e-2. Only one of the
    two layers is ill-conditioned: the model refuses before unmerging either, so no layer is left half-done."""
    model = ether_plus_model("ether_plus")
    bad, good = layers(model)
    align(bad, 0.03)
    with pytest.warns(UserWarning, match=r"merged fine, but could not be unmerged accurately.*Keep a copy"):
        model.merge_adapter()
    merged = [layer.get_base_layer().weight.detach().clone() for layer in (bad, good)]
    assert bad.unmerge_error() > UNMERGE_RTOL >= good.unmerge_error()
    problem = r"restoring the float32 base weight would carry a relative error of about [0-9.e+-]+, above the tolerance 1e-03 \(see UNMERGE_RTOL\).*min \|û·v̂\| = 3\.00e-02"
    fix = r"Reload the base model instead, or use `merge_and_unload\(\)` on a copy"
    message = rf"Module 'first': Cannot unmerge ETHER\+ adapter 'default': {problem}.*{fix}"
    with pytest.raises(ValueError, match=message):
        model.unmerge_adapter()
    with pytest.raises(ValueError, match=rf"Cannot unmerge ETHER\+ adapter 'default': {problem}"):
        bad.unmerge()
    for layer, weight in zip((bad, good), merged, strict=True):
        assert layer.merged and torch.equal(layer.get_base_layer().weight, weight)


def test_disable_adapter_on_an_adapter_that_cannot_be_unmerged_raises_at_entry():
    model = ether_plus_model("ether_plus")
    align(layers(model)[0], 0.03)
    with pytest.warns(UserWarning, match="could not be unmerged accurately"):
        model.merge_adapter()
    entered = False
    with pytest.raises(ValueError, match=r"Cannot unmerge ETHER\+ adapter 'default'.*Reload the base model"):
        with model.disable_adapter():
            entered = True
    assert not entered
    # Nothing changed: still merged, adapters enabled, and the model runs as the merged model.
    assert all(layer.merged and not layer.disable_adapters for layer in layers(model))
    x = torch.randn(3, IN)
    with torch.no_grad():
        expected = model.base_model.model.second(model.base_model.model.first(x))
        torch.testing.assert_close(model(x), expected)


def test_disable_adapter_on_a_well_conditioned_merged_adapter_restores_the_base():
    model = ether_plus_model("ether_plus")
    for index, layer in enumerate(layers(model)):
        align(layer, 0.5, seed=index)
    x = torch.randn(3, IN)
    with torch.no_grad():
        with model.disable_adapter():
            base = model(x)
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tolerance_is_twice_a_well_conditioned_round_trip(dtype):
    """In half precision the merged weight's own rounding is about UNMERGE_RTOL: the limit becomes twice the estimate
    of a perfect round trip where that is larger (bfloat16: 6.4e-3; float16: 8.0e-4, so 1e-3 holds), which an adapter
    at its initialization (H⁺ = I) meets and a poorly conditioned one (|û·v̂| = 0.5 on both sides, amplification
    ≈ 6.7) does not."""
    perfect = perfect_round_trip(dtype)
    assert unmerge_tolerance(dtype) == pytest.approx(max(UNMERGE_RTOL, 2 * perfect))
    assert unmerge_tolerance(torch.float32) == unmerge_tolerance(torch.float64) == UNMERGE_RTOL
    model = ether_plus_model("ether_plus", dtype=dtype)
    model.merge_adapter()  # at init: H⁺ = I on both sides
    assert layers(model)[0].unmerge_error() == pytest.approx(perfect)
    model.unmerge_adapter()
    align(layers(model)[0], 0.5)
    with pytest.warns(UserWarning, match="could not be unmerged accurately"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=rf"{str(dtype).removeprefix('torch.')} base weight .* above the tolerance"):
        model.unmerge_adapter()


def test_plain_ether_always_unmerges():
    """A reflection is orthogonal and its own inverse: the estimate is a perfect round trip's, never refused."""
    torch.manual_seed(0)
    config = EtherConfig(target_modules=["first", "second"], n_blocks=N_BLOCKS, variant="ether")
    model = get_peft_model(TwoLinears().to(torch.bfloat16), config)
    model.merge_adapter()
    perfect = perfect_round_trip(torch.bfloat16)
    assert all(layer.unmerge_error() == pytest.approx(perfect) for layer in layers(model))
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers(model))
