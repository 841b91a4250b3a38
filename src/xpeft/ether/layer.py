"""ETHER / ETHER+ layers: block-diagonal hyperplane reflections of a layer's weight (DESIGN.md §1), applied to the
activations of linear layers and to the filters of convolutions."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from ..quantization import check_conv_not_quantized, input_dtype, is_quantized, merge_weight, write_merged_weight
from ..tuners_utils import (
    CONV_LAYER_TYPES,
    SUPPORTED_LAYER_TYPES,
    adapter_index_groups,
    check_mixed_batch_args,
    conv_fan_in,
    layer_features,
    weight_as_out_in,
)
from . import fused
from .config import EtherConfig
from .fused import Mix, mixed_basis

ETHER_LAYER_TYPES = SUPPORTED_LAYER_TYPES + CONV_LAYER_TYPES

# A zero vector has no direction; clamping its norm makes û = 0, i.e. H = I for that block, instead of NaN.
NORM_EPS = 1e-12
UNMERGE_RTOL = 1e-3
"""The largest estimated relative error (Frobenius norm) of the base weight that `unmerge` may hand back; above it,
unmerging an ETHER+ adapter is refused (see [`unmerge_error_estimate`]). For float16 and bfloat16 weights, whose own
rounding is about this size, the limit is twice the estimate for a perfectly conditioned merge and unmerge."""


def valid_block_counts(*sizes: int) -> list[int]:
    """Block counts n that split every size in `sizes` into blocks of at least two features."""
    return [n for n in range(1, min(sizes) // 2 + 1) if all(size % n == 0 for size in sizes)]


def normalize_blocks(u: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """û = u / ‖u‖ per block row of `u` (shape `[n, d/n]`), in `dtype` or the parameter's dtype, whichever is wider,
    and float32 at least (half-precision vectors are normalized in float32).

    DESIGN.md §1, "û = u/‖u‖"; the norm is clamped at `NORM_EPS` so that a zero vector gives û = 0, not NaN. Merging
    asks for float64, so that `‖û‖ = 1` to float64 rounding: `H H = I` and the Woodbury inverse hold to that precision.
    """
    u = u.to(torch.promote_types(torch.promote_types(u.dtype, dtype), torch.float32))
    return u / u.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


# H = I + A M Aᵀ per block (DESIGN.md §1), with the basis A = [a_1 .. a_k] of each block and a symmetric k×k mix M:
# ETHER is A = [û], M = [−2]. ETHER+ is I − ûûᵀ + v̂v̂ᵀ written on A = [û, ŵ] with ŵ = û + v̂ and M = [[0, −1], [−1, 1]]
# (expand (ŵ − û)(ŵ − û)ᵀ): at the init v̂ = −û, so ŵ = 0 and every update term is exactly zero, so the adapter is
# exactly the identity (the direct form −ûp + v̂q leaves rounding residues with fused multiply-adds).
REFLECTION_MIX: Mix = ((-2.0,),)
ETHER_PLUS_MIX: Mix = ((0.0, -1.0), (-1.0, 1.0))


def block_update(x: torch.Tensor, basis: torch.Tensor, mix: Mix, shift: torch.Tensor | None = None) -> torch.Tensor:
    """`x_b ↦ x_b + A_b M A_bᵀ (x_b − s_b)` for each block `b` of the last axis of `x`, i.e. `x ↦ s + H (x − s)` with
    `H = diag(I + A_b M A_bᵀ)` (`s` = 0 without `shift`); `basis` is `[n, k, d/n]`. Runs as [`fused.BlockUpdate`]
    unless that path is switched off."""
    if fused.ENABLED["block_update"]:
        return fused.BlockUpdate.apply(x, basis, mix, shift)
    blocks = x.unflatten(-1, basis.shape[::2])
    centered = blocks if shift is None else blocks - shift.view(basis.shape[::2])
    coefficients = torch.einsum("nkd,...nd->...nk", mixed_basis(basis, mix), centered)
    return (blocks + torch.einsum("...nk,nkd->...nd", coefficients, basis)).flatten(-2)


def householder_reflect(x: torch.Tensor, u_hat: torch.Tensor) -> torch.Tensor:
    """ETHER, DESIGN.md §1: `x_b ← x_b − 2 û_b (û_bᵀ x_b)` for each of the n blocks of the last axis of `x`.

    This is `x ↦ H x` with `H = diag(I − 2 û_b û_bᵀ)`, never built. `u_hat` is `[n, d/n]` in the dtype of `x`.
    `H` is symmetric and orthogonal, so it is its own inverse, and applied to the rows of `W` it gives `W H`.
    """
    return block_update(x, u_hat.unsqueeze(1), REFLECTION_MIX)


def ether_plus_transform(
    x: torch.Tensor, u_hat: torch.Tensor, v_hat: torch.Tensor, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """ETHER+, DESIGN.md §1: `x_b ← x_b − û_b (û_bᵀ x_b) + v̂_b (v̂_bᵀ x_b)`, i.e. `x ↦ H⁺ x`, block by block; with a
    `shift` `s` (a vector of the width of `x`, e.g. a bias to keep out of the transform), `x ↦ s + H⁺ (x − s)`.

    `H⁺ = diag(I − û_b û_bᵀ + v̂_b v̂_bᵀ)` is symmetric, so applied to the rows of `W` it gives `W H⁺`.
    """
    return block_update(x, ether_plus_basis(u_hat, v_hat), ETHER_PLUS_MIX, shift)


def ether_plus_linear(
    x: torch.Tensor,
    hat_in: tuple[torch.Tensor, torch.Tensor],
    hat_out: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """Two-sided ETHER+ on a frozen linear layer, DESIGN.md §1: `y = H⁺_out W H⁺_in x + b`, with `hat_in = (û, v̂)` of
    `H⁺_in` and `hat_out` of `H⁺_out` (`[n, d/n]` each, in the dtype of `x`), `weight` `[out, in]` (`[in, out]` with
    `fan_in_fan_out`, as transformers' `Conv1D`). Gradients flow to `x` and the vectors, not to `weight` or `bias`.

    Runs as [`fused.TwoSidedLinear`], which keeps `x` for the backward, not an output-sized activation, unless that
    path is switched off.
    """
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (weight, bias)):
        raise ValueError(
            "ether_plus_linear computes no gradient for `weight` or `bias`, but one of them requires grad. Freeze "
            "them, or compose `ether_plus_transform` and `F.linear` to train them too."
        )
    out_features, in_features = weight_as_out_in(weight, fan_in_fan_out).shape
    for side, size, (u_hat, v_hat) in (("hat_in", in_features, hat_in), ("hat_out", out_features, hat_out)):
        if u_hat.shape != v_hat.shape or u_hat.dim() != 2 or u_hat.numel() != size:
            raise ValueError(
                f"`{side}` must be two `[n, {size} // n]` tensors for a layer with in_features={in_features} and "
                f"out_features={out_features}, got shapes {tuple(u_hat.shape)} and {tuple(v_hat.shape)}."
            )
    if fused.ENABLED["two_sided_linear"]:
        basis_in, basis_out = ether_plus_basis(*hat_in), ether_plus_basis(*hat_out)
        return fused.TwoSidedLinear.apply(x, basis_in, basis_out, ETHER_PLUS_MIX, weight, bias, fan_in_fan_out)
    y = F.linear(ether_plus_transform(x, *hat_in), weight_as_out_in(weight, fan_in_fan_out), bias)
    return ether_plus_transform(y, *hat_out, shift=bias)


def ether_plus_basis(u_hat: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """The basis `A = [û, ŵ]`, `ŵ = û + v̂`, of `H⁺ = I + A M Aᵀ` (see `ETHER_PLUS_MIX`), `[n, 2, d/n]`."""
    return torch.stack([u_hat, u_hat + v_hat], dim=1)


def ether_plus_inverse(x: torch.Tensor, u_hat: torch.Tensor, v_hat: torch.Tensor) -> torch.Tensor:
    """`x ↦ (H⁺)⁻¹ x` per block by the Woodbury identity (rank-2 Sherman–Morrison), for unmerging ETHER+.

    With `H⁺ = I + A C Aᵀ`, `A = [û, v̂]`, `C = diag(−1, 1)` and `c = û·v̂`:
    `(H⁺)⁻¹ = I − A (C⁻¹ + AᵀA)⁻¹ Aᵀ`, and `(C⁻¹ + AᵀA)⁻¹ = [[−2/c², 1/c], [1/c, 0]]`, so
    `(H⁺)⁻¹ x = x − û (q/c − 2p/c²) − v̂ (p/c)` with `p = ûᵀx`, `q = v̂ᵀx`. Needs `c ≠ 0` (`det H⁺ = c²`).
    """
    blocks = x.unflatten(-1, u_hat.shape)
    c = (u_hat * v_hat).sum(-1)  # [n]
    p = torch.einsum("...nb,nb->...n", blocks, u_hat)
    q = torch.einsum("...nb,nb->...n", blocks, v_hat)
    alpha = q / c - 2 * p / c**2
    beta = p / c
    return (blocks - alpha.unsqueeze(-1) * u_hat - beta.unsqueeze(-1) * v_hat).flatten(-2)


def reference_code_regroup(w: torch.Tensor, n: int) -> torch.Tensor:
    """`W` `[out, in]` rearranged for `block_layout="reference_code"` (mwbini/ether, `ETHERLinear.forward`), whose
    `W.reshape(n, out, in/n)` then `einsum("rfm,rmn->rfn", ·, H)` gives `W'[R_r, C_c] = W[R_r, C_c] H_r`: output row group
    `R_r` (rows `r·out/n ..`) has every input chunk `C_c` transformed by `H_r`.

    Returns `[out/n · n, in]` with row `(g, c)` = `[W[R_1 g, C_c], .., W[R_n g, C_c]]`: column block `r` holds a chunk of
    row group `r`, so a row-wise transform by `diag(H_1 .. H_n)` (the paper layout's) applies that layout. Inverse:
    [`reference_code_ungroup`].
    """
    out, size = w.shape[0], w.shape[1] // n
    return w.reshape(n, out // n, n, size).permute(1, 2, 0, 3).reshape(out // n * n, n * size)


def reference_code_ungroup(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of [`reference_code_regroup`]: `[out/n · n, in]` back to `W` `[out, in]`."""
    rows, size = t.shape[0] // n, t.shape[1] // n
    return t.reshape(rows, n, n, size).permute(2, 0, 1, 3).reshape(rows * n, n * size)


def reference_code_delta(x: torch.Tensor, w: torch.Tensor, basis: torch.Tensor, mix: Mix) -> torch.Tensor:
    """`(W' − W) x` for `block_layout="reference_code"`, `W'[R_r, C_c] = W[R_r, C_c] H_r` (see
    [`reference_code_regroup`]) with `H_r = I + A_r M A_rᵀ` (`basis` `[n, k, in/n]`), on the activations:

    `(W' x − W x)[R_r] = Σ_c (W[R_r, C_c] A_r) (M A_rᵀ x_c)`: the `[n, out/n, n, k]` products `W A` take one pass over
    `W`, and `M A_rᵀ x_c` is `[n, n, k]` per row of `x`; no transformed weight or `d×d` matrix is built.
    """
    n, _, size = basis.shape
    weight_products = torch.einsum("rgcm,rkm->rgck", w.reshape(n, -1, n, size), basis)
    projections = torch.einsum("...cm,rkm->...rck", x.unflatten(-1, (n, size)), mixed_basis(basis, mix))
    return torch.einsum("rgck,...rck->...rg", weight_products, projections).flatten(-2)


def ether_plus_amplification(u_hat: torch.Tensor, v_hat: torch.Tensor) -> float:
    """How much merging then unmerging `H⁺ = diag(I − û_b û_bᵀ + v̂_b v̂_bᵀ)` (`[n, d/n]` unit vectors) amplifies a
    rounding error spread evenly over the weight: `γ ρ`, the root mean squares of the singular values of `H⁺` and of
    its inverse, `γ = ‖H⁺‖_F / √d`, `ρ = ‖(H⁺)⁻¹‖_F / √d`. 1 for `H⁺ = I`.

    On span{û_b, v̂_b} a block has the eigenvalues `1 ± s_b`, `s_b = √(1 − c_b²)`, `c_b = û_b·v̂_b`, and 1 on the
    other `d/n − 2` directions (`det = c_b²`). The worst case, the condition number `max (1 + s) / min (1 − s)`
    (about `4/c²`), overstates the error of a typical weight by 100× or more: a rounding error has only a `√(n/d)`
    share along the one nearly singular direction of a block.
    """
    c = (u_hat.double() * v_hat.double()).sum(-1).abs().clamp_max(1.0)
    s = (1 - c**2).sqrt()
    small = c**2 / (1 + s)  # 1 − s, without cancellation
    others = u_hat.shape[-1] - 2
    size = u_hat.numel()
    spread = (others + (1 + s) ** 2 + small**2).sum() / size
    inverse_spread = (others + (1 + s) ** -2 + small**-2).sum() / size
    return (spread * inverse_spread).sqrt().item()


def unmerge_error_estimate(amplifications: Sequence[float], dtype: torch.dtype) -> float:
    """Expected relative error (Frobenius norm) of the base weight that unmerging restores, for the adapters merged in
    turn into a weight of `dtype`, with amplifications `a_1 .. a_m` (`a_out a_in` per adapter, see
    [`ether_plus_amplification`]; 1 for ETHER, a reflection).

    Each merge and each unmerge step rounds its float64 result to `dtype`, a relative error of RMS `u/√3` (unit
    roundoff `u = eps/2`). Unmerging adapters `k .. 1` amplifies the rounding of merge `k` by `P_k = a_1 ⋯ a_k`, and
    that of the unmerge step restoring the weight before merge `k` by `P_{k−1}` (`P_0 = 1`), so

        error ≈ (u/√3) · √(Σ_{k=1..m} P_k² + Σ_{k=0..m−1} P_k²).

    An estimate, not a bound: over 240 random two-sided ETHER+ layers (float32, 1–4 blocks, `|û·v̂|` from 1e-4 to 1;
    `tests/test_ether_unmerge.py`) the measured error was at most 1.45× this and a median 0.55×. The worst-case bound
    from condition numbers, `(eps/2)(1 + κ_out κ_in)`, exceeded the measured error by a median 110×.
    """
    products = [1.0]
    for amplification in amplifications:
        products.append(products[-1] * amplification)
    squares = sum(p * p for p in products[1:]) + sum(p * p for p in products[:-1])
    return torch.finfo(dtype).eps / 2 / math.sqrt(3) * math.sqrt(squares)


def unmerge_tolerance(dtype: torch.dtype) -> float:
    """The error estimate above which unmerging a weight of `dtype` is refused: [`UNMERGE_RTOL`], or, for coarser
    dtypes, twice the estimate of a perfectly conditioned merge and unmerge."""
    return max(UNMERGE_RTOL, 2 * unmerge_error_estimate([1.0], dtype))


def _require_in_memory(tensor: torch.Tensor, what: str) -> None:
    """Raise a clear error for a tensor that accelerate's offloading left on the meta device between calls."""
    if tensor.device.type == "meta":
        raise RuntimeError(
            f"ETHER needs {what} in memory, but it is on the meta device (offloaded, e.g. by accelerate's device_map "
            "to CPU or disk). Load the model without offloading the adapted layers, or leave them out of "
            "`target_modules`."
        )


def _weight_is_computed(layer: nn.Module) -> bool:
    """Whether `layer.weight` is recomputed at each access (weight_norm and other parametrizations) rather than stored
    as a parameter: nothing written to it would last."""
    return "weight" not in layer._parameters


def _listed(counts: list[int]) -> str:
    return ", ".join(map(str, counts)) or "none"


def _merge_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class EtherLayer(BaseTunerLayer):
    """ETHER / ETHER+ (Bini et al., ICML 2024, https://arxiv.org/abs/2405.20271), block-diagonal over n blocks.

    With the base weight `W` as `[out, in]` and bias `b`:

    - ETHER: :math:`y = W H x + b`, :math:`H = \\mathrm{diag}_b(I - 2\\hat u_b \\hat u_b^\\top)`; `d_in` parameters.
      `H` is a reflection (orthogonal, symmetric, det −1 per block), hence its own inverse: unmerging applies it again.
    - ETHER+: :math:`y = H^+_{out} W H^+_{in} x + b`, :math:`H^+ = \\mathrm{diag}_b(I - \\hat u_b \\hat u_b^\\top +
      \\hat v_b \\hat v_b^\\top)`; `2(d_in + d_out)` parameters. The bias is not transformed, as in the merged form.
      Unmerging inverts `H⁺` (see [`ether_plus_inverse`]).
    - ETHER+ one-sided: :math:`y = W H^+_{in} x + b`; `2 d_in` parameters.

    On linear layers the transforms act on activations (`O(tokens·d)` extra work), never on a `d×d` matrix, except
    in merge; on convolutions ([`EtherConv`]) they act on the flattened filters. Trainable vectors are stored per
    block as `[n, d/n]` and normalized in float32 at least (see [`normalize_blocks`]).

    Above, `H_in = diag(H_1 .. H_n)` acts on the n chunks `C_c` of the input features (`block_layout="paper"`). With
    `block_layout="reference_code"` (the official code's layout, see [`EtherConfig`]) `H_r` acts instead on every input
    chunk of output row group `R_r`: `W'[R_r, C_c] = W[R_r, C_c] H_r`. Linear layers then add
    [`reference_code_delta`] to the base output; merge, unmerge and convolutions act on the regrouped weight (see
    [`reference_code_regroup`]). `ether_dropout` drops the layer's input before the adapted forward, as the official
    code does.
    """

    adapter_layer_names = ("ether_u", "ether_v", "ether_u_out", "ether_v_out")
    other_param_names = ("ether_variant", "ether_block_layout", "ether_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.ether_u = nn.ParameterDict({})  # input side, every variant
        self.ether_v = nn.ParameterDict({})  # input side, ETHER+ variants
        self.ether_u_out = nn.ParameterDict({})  # output side, two-sided ETHER+ only
        self.ether_v_out = nn.ParameterDict({})
        self.ether_variant: dict[str, str] = {}
        self.ether_block_layout: dict[str, str] = {}
        self.ether_dropout = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.cast_input_dtype_enabled = True
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(
            self.get_base_layer(), "ETHER", ETHER_LAYER_TYPES
        )

    def update_layer(self, adapter_name: str, config: EtherConfig, module_name: str = "") -> None:
        """Create the vectors of `adapter_name` for this layer (`module_name` only serves error messages)."""
        n, variant = config.n_blocks, config.variant
        self._check_layer(config, module_name)
        if config.fan_in_fan_out is not None and config.fan_in_fan_out != self.fan_in_fan_out:
            # One text per layer type (not per module), so Python shows it once, not once per adapted layer.
            layer_type = type(self.get_base_layer()).__name__
            warnings.warn(
                f"fan_in_fan_out is set to {config.fan_in_fan_out} but some target modules are `{layer_type}` "
                f"layers, whose weight is stored as {'[in, out]' if self.fan_in_fan_out else '[out, in]'}; using "
                f"fan_in_fan_out={self.fan_in_fan_out} for them. Leave `fan_in_fan_out=None` to read it from each "
                "layer's type.",
                stacklevel=2,
            )
        self.ether_variant[adapter_name] = variant
        self.ether_block_layout[adapter_name] = config.block_layout
        p = config.ether_dropout
        self.ether_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.ether_u[adapter_name] = nn.Parameter(self._init_vectors(n, self.in_features))
        if variant != "ether":
            v = -self.ether_u[adapter_name].data if config.init_weights else self._init_vectors(n, self.in_features)
            self.ether_v[adapter_name] = nn.Parameter(v.clone())
        if variant == "ether_plus":
            u_out = self._init_vectors(n, self.out_features)
            v_out = -u_out if config.init_weights else self._init_vectors(n, self.out_features)
            self.ether_u_out[adapter_name] = nn.Parameter(u_out)
            self.ether_v_out[adapter_name] = nn.Parameter(v_out.clone())
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _check_layer(self, config: EtherConfig, module_name: str) -> None:
        """Refuse what ETHER cannot adapt on this layer, with an error that names the module and the fix."""
        n, two_sided = config.n_blocks, config.variant == "ether_plus"
        sizes = {"in": self.in_features, "out": self.out_features} if two_sided else {"in": self.in_features}
        for side, size in sizes.items():
            # A block of one feature is a fixed sign flip (ETHER) or the identity (ETHER+): nothing left to train.
            if size % n or size // n < 2:
                raise ValueError(
                    f"ETHER `n_blocks`={n} does not split {self._axis_label(side)} of module {module_name!r} into "
                    "blocks of at least two features. Valid block counts for this layer: "
                    f"{_listed(self._valid_block_counts(config))}. Set `n_blocks` to one of them, or leave the "
                    "module out with `exclude_modules`."
                )
        if config.block_layout == "reference_code" and is_quantized(self.get_base_layer()):
            raise TypeError(
                f"ETHER block_layout='reference_code' reads the weight of module {module_name!r} at every forward, "
                f"but it is quantized ({type(self.get_base_layer().weight).__name__}). Use block_layout='paper' on a "
                "quantized base (it calls the layer as a black box), or load the base model unquantized."
            )
        if config.block_layout == "reference_code" and self.out_features % n:
            raise ValueError(
                f"ETHER block_layout='reference_code' with `n_blocks`={n} groups {self._axis_label('out')} of module "
                f"{module_name!r} into {n} equal groups of output rows, which does not divide. Valid block counts for "
                f"this layer: {_listed(self._valid_block_counts(config))}. Set `n_blocks` to one of them, use "
                "block_layout='paper', or leave the module out with `exclude_modules`."
            )

    def _valid_block_counts(self, config: EtherConfig) -> list[int]:
        """The block counts this layer accepts with `config`'s variant and layout (for error messages)."""
        two_sided = config.variant == "ether_plus"
        counts = valid_block_counts(*((self.in_features, self.out_features) if two_sided else (self.in_features,)))
        if config.block_layout == "reference_code":
            counts = [n for n in counts if self.out_features % n == 0]
        return counts

    def _axis_label(self, side: str) -> str:
        """How errors name the input (`side="in"`) or output axis of this layer."""
        return f"in_features={self.in_features}" if side == "in" else f"out_features={self.out_features}"

    def _init_vectors(self, n_blocks: int, size: int) -> torch.Tensor:
        # The official code's init (Kaiming-uniform, a=√5); only each block's direction matters.
        weight = self.get_base_layer().weight
        vectors = torch.empty(n_blocks, size // n_blocks, device=weight.device)
        return nn.init.kaiming_uniform_(vectors, a=math.sqrt(5))

    # -- the transforms, shared by forward, mixed batch and merge ------------------------------------------------

    def _unit(self, container: nn.ParameterDict, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
        return normalize_blocks(container[adapter_name], dtype).to(dtype)

    def transform_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """`x ↦ H_in x` (last axis = input features) for one adapter, in the dtype of `x`: block `b` of `x` by `H_b`."""
        return block_update(x, *self._input_basis(adapter_name, x.dtype))

    def _input_basis(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, Mix]:
        """The basis `A` `[n, k, d/n]` and mix `M` of the input side's `H = I + A M Aᵀ` per block."""
        if self.ether_variant[adapter_name] == "ether":
            return self._unit(self.ether_u, adapter_name, dtype).unsqueeze(1), REFLECTION_MIX
        return ether_plus_basis(*self._hats(adapter_name, "in", dtype)), ETHER_PLUS_MIX

    def transform_output(self, y: torch.Tensor, adapter_name: str, shift: torch.Tensor | None = None) -> torch.Tensor:
        """`y ↦ H⁺_out y` (last axis = output features), or `y ↦ s + H⁺_out (y − s)` with a `shift` `s`; the identity
        unless the variant is two-sided ETHER+."""
        if adapter_name not in self.ether_u_out:
            return y
        return ether_plus_transform(y, *self._hats(adapter_name, "out", y.dtype), shift=shift)

    def _hats(self, adapter_name: str, side: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`(û, v̂)` of the ETHER+ adapter `adapter_name` on `side` ("in" or "out")."""
        u, v = (self.ether_u, self.ether_v) if side == "in" else (self.ether_u_out, self.ether_v_out)
        return self._unit(u, adapter_name, dtype), self._unit(v, adapter_name, dtype)

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The base weight as the matrix `[out, in]` that the transforms act on (a view)."""
        return weight_as_out_in(weight, self.fan_in_fan_out)

    def _weight_from_matrix(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`matrix` (`[out, in]`) back in the stored layout of the base `weight`: the inverse of `_weight_matrix`."""
        return weight_as_out_in(matrix, self.fan_in_fan_out)

    def _transformed_matrix(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """`H_out W H_in` for a weight matrix `w` `[out, in]`: row-wise transforms of `W` give `W H_in`, column-wise
        ones (rows of `Wᵀ`) give `H_out W`; with `block_layout="reference_code"` the row-wise transforms act on
        [`reference_code_regroup`]`(W)`. Differentiable; computed in the dtype of `w`."""
        return self.transform_output(self._on_input_blocks(w, name, self.transform_input).T, name).T

    def _on_input_blocks(self, w: torch.Tensor, name: str, transform: Any) -> torch.Tensor:
        """`transform(w, name)`, a row-wise transform by the input side's blocks, in adapter `name`'s block layout."""
        if self.ether_block_layout[name] == "paper":
            return transform(w, name)
        n = len(self.ether_u[name])
        return reference_code_ungroup(transform(reference_code_regroup(w, n), name), n)

    def _output_chain(self, y: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """`H_out (W x') + b` from the base output `y = W x' + b`: `b + H_out (y − b)`, the bias kept out of `H_out` as
        in the merged form (each output transform of the chain shifted by `b`)."""
        names = [name for name in names if name in self.ether_u_out]
        bias = self.get_base_layer().bias
        if names and bias is not None:
            _require_in_memory(bias, "the bias of a layer with two-sided ETHER+")
            bias = bias.to(y.dtype)
        for name in names:
            y = self.transform_output(y, name, shift=bias)
        return y

    def _active_names(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.ether_u]


class _EtherModule(nn.Module, EtherLayer):
    """What the ETHER layer types share: construction, the forward's dispatch (disabled, merged, mixed batch) and
    merging. Subclasses define `_adapted_forward(x, names, *args, **kwargs)` (the layer with the adapters `names`, in
    the order of successive merges) and `_mixed_batch_forward(x, *args, adapter_names, **kwargs)`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: EtherConfig, module_name: str = "") -> None:
        super().__init__()
        EtherLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = check_mixed_batch_args(self, x, kwargs.pop("adapter_names", None))
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is None and (self.merged or not self._active_names()):
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        x = self._cast_input_dtype(x, input_dtype(self.get_base_layer(), x.dtype))
        if adapter_names is not None:
            result = self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        else:
            result = self._adapted_forward(x, self._active_names(), *args, **kwargs)
        return result.to(previous_dtype)

    def __repr__(self) -> str:
        return "ether." + super().__repr__()

    def _dropout(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The layer's input after the `ether_dropout` of each adapter in `names` (identities at p = 0 or in eval)."""
        for name in names:
            x = self.ether_dropout[name](x)
        return x

    def _adapted_weight(self, names: Sequence[str], what: str = "the weight of this layer") -> torch.Tensor:
        """The base weight (stored layout) with `names` merged in turn, differentiable in the vectors: in float32 at
        least, cast once to the weight's dtype."""
        weight = self.get_base_layer().weight
        _require_in_memory(weight, what)
        matrix = self._weight_matrix(weight).to(torch.promote_types(weight.dtype, torch.float32))
        for name in names:
            matrix = self._transformed_matrix(matrix, name)
        return self._weight_from_matrix(matrix, weight).to(weight.dtype)

    # -- merge ---------------------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge adapters into the base weight: `W ← H_out W H_in` (ETHER: `W ← W H`), computed in float64 (float32
        on MPS) one layer at a time: the extra memory is a few float64 copies of the largest adapted weight.

        With `safe_merge=True` the new weight is computed on a copy and checked for NaN/inf before it replaces `W`.
        """
        base = self.get_base_layer()
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.ether_u]
        if names and _weight_is_computed(base):
            raise ValueError(
                f"Cannot merge ETHER into a `{type(base).__name__}` whose weight is computed by a parametrization "
                "(such as weight_norm), not stored as a parameter. Keep the model unmerged (it runs as is), or remove "
                "the parametrization first (`torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')`)."
            )
        for name in names:
            new_weight = self._merged_weight(merge_weight(base), name, inverse=False)
            if safe_merge and not torch.isfinite(new_weight).all():
                raise ValueError(f"NaNs or infs detected in the merged weights of adapter {name!r}; not merging it.")
            write_merged_weight(base, new_weight)
            self.merged_adapters.append(name)
        if names and self.unmerge_error() > unmerge_tolerance(self._float_dtype()):
            warnings.warn(
                f"ETHER+ adapter(s) {', '.join(map(repr, names))} merged fine, but could not be unmerged accurately "
                f"later: {self._unmerge_problem()} Keep a copy of the base weights if you need them back.",
                stacklevel=2,
            )

    def unmerge(self) -> None:
        """Undo `merge`. ETHER: a reflection is its own inverse, so `W H H = W` (exact up to rounding).

        ETHER+: `W ← (H⁺_out)⁻¹ W (H⁺_in)⁻¹` in float64 (float32 on MPS) by the rank-2 Woodbury inverse; refused, before
        anything changes, when the restored weight's estimated error exceeds the tolerance (see [`check_unmerge`]).
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.check_unmerge()
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters[-1]
            write_merged_weight(base, self._merged_weight(merge_weight(base), name, inverse=True))
            self.merged_adapters.pop()

    def unmerge_error(self) -> float:
        """Estimated relative error of the base weight that `unmerge` would restore now (see
        [`unmerge_error_estimate`]); 0 when nothing is merged."""
        if not self.merged:
            return 0.0
        amplifications = [self._amplification(name) for name in self.merged_adapters]
        return unmerge_error_estimate(amplifications, self._float_dtype())

    def check_unmerge(self) -> None:
        """Raise if the merged adapters cannot be unmerged accurately: inverting a nearly singular ETHER+ transform
        would amplify the merged weight's rounding error beyond [`unmerge_tolerance`] of its dtype."""
        if self.unmerge_error() > unmerge_tolerance(self._float_dtype()):
            names = ", ".join(map(repr, self.merged_adapters))
            raise ValueError(
                f"Cannot unmerge ETHER+ adapter {names}: {self._unmerge_problem()} Reload the base model instead, or "
                "use `merge_and_unload()` on a copy when you need both the merged and the unmerged model."
            )

    def _float_dtype(self) -> torch.dtype:
        """The dtype the unmerge error is estimated in: the weight's, or float32 for a quantized weight (its int storage
        has no eps; the requantization rounding the merge warned about comes on top)."""
        dtype = self.get_base_layer().weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    def _unmerge_problem(self) -> str:
        dtype = self._float_dtype()
        alignments = [self._min_alignment(name) for name in self.merged_adapters if name in self.ether_v]
        return (
            f"restoring the {str(dtype).removeprefix('torch.')} base weight would carry a relative error of about "
            f"{self.unmerge_error():.1e}, above the tolerance {unmerge_tolerance(dtype):.0e} (see UNMERGE_RTOL), "
            f"because H⁺ is nearly singular (min |û·v̂| = {min(alignments, default=1.0):.2e}; det H⁺ = (û·v̂)²)."
        )

    def _amplification(self, name: str) -> float:
        """`a_out a_in` of adapter `name` (see [`ether_plus_amplification`]; 1 for ETHER, whose reflections are
        orthogonal)."""
        if name not in self.ether_v:
            return 1.0
        sides = ("in", "out") if name in self.ether_u_out else ("in",)
        return math.prod(ether_plus_amplification(*self._hats(name, side, torch.float64)) for side in sides)

    def _min_alignment(self, name: str) -> float:
        pairs = [(self.ether_u, self.ether_v), (self.ether_u_out, self.ether_v_out)]
        values = [
            (normalize_blocks(u[name]) * normalize_blocks(v[name])).sum(-1).abs().min() for u, v in pairs if name in u
        ]
        return min(values).item()

    def _merged_weight(self, weight: torch.Tensor, name: str, inverse: bool) -> torch.Tensor:
        """The base weight (stored layout) with adapter `name` merged in, or taken out when `inverse`."""
        # In float64, so the stored weight is W H correctly rounded and a later unmerge starts from the least error
        # (float32 on MPS, which has no float64).
        w = self._weight_matrix(weight).to(_merge_dtype(weight.device))
        if not inverse or self.ether_variant[name] == "ether":
            merged = self._transformed_matrix(w, name)  # H_ether⁻¹ = H_ether
        else:
            # H_out acts on row blocks, which the input side's (either layout) maps to themselves: the inverses commute.
            merged = self._on_input_blocks(w, name, self._invert_input)
            if name in self.ether_u_out:
                merged = ether_plus_inverse(merged.T, *self._hats(name, "out", merged.dtype)).T
        # Cast here (not in the in-place copy) so that safe_merge sees what overflows the weight's dtype.
        return self._weight_from_matrix(merged, weight).to(weight.dtype)

    def _invert_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return ether_plus_inverse(x, *self._hats(name, "in", x.dtype))


class EtherLinear(_EtherModule):
    """ETHER / ETHER+ on an `nn.Linear` or a transformers `Conv1D` (GPT-2): see [`EtherLayer`] for the math.

    The transforms act on the activations, block by block, never on the weight (except in merge). One active
    two-sided ETHER+ adapter on a plain frozen layer runs as [`ether_plus_linear`], which keeps no output-sized
    activation for the backward; otherwise (stacked adapters, a base layer with another forward or with hooks, also
    global ones such as `FlopCounterMode`'s, autocast, a trainable base weight or bias) the transforms run around the
    base layer's own call.
    """

    def _adapted_forward(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self._dropout(x, names)
        if any(self.ether_block_layout[name] == "reference_code" for name in names):
            return self._reference_code_forward(x, names, *args, **kwargs)
        if not args and not kwargs and self._runs_as_one_function(x, names):
            hat_in, hat_out = (self._hats(names[0], side, x.dtype) for side in ("in", "out"))
            base = self.base_layer
            return ether_plus_linear(x, hat_in, hat_out, base.weight, base.bias, self.fan_in_fan_out)
        # Merging a then b gives H_out,b H_out,a W H_in,a H_in,b: the input sees the last adapter first.
        for name in reversed(names):
            x = self.transform_input(x, name)
        return self._output_chain(self.base_layer(x, *args, **kwargs), names)

    def _reference_code_forward(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """One adapter: `W x + b` plus [`reference_code_delta`], then the output side. Stacked adapters (the input side
        of one would act on the weight the previous ones changed): the base layer run with the transformed weight, by
        `F.linear` for a plain `nn.Linear`/`Conv1D` (nothing is put on the module, so threads are safe), else through
        `torch.func.functional_call`, which puts it on the module for the call (not thread-safe)."""
        if len(names) > 1:
            weight = self._adapted_weight(names)
            if fused.is_plain_linear(self.base_layer):
                return F.linear(x, weight_as_out_in(weight, self.fan_in_fan_out), self.base_layer.bias)
            return functional_call(self.base_layer, {"weight": weight}, (x, *args), kwargs)
        y = self.base_layer(x, *args, **kwargs) + self._reference_code_delta(x, names[0])
        return self._output_chain(y, names)

    def _reference_code_delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = self.get_base_layer().weight
        _require_in_memory(weight, "the weight of a layer with block_layout='reference_code'")
        return reference_code_delta(x, self._weight_matrix(weight).to(x.dtype), *self._input_basis(name, x.dtype))

    def _runs_as_one_function(self, x: torch.Tensor, names: list[str]) -> bool:
        """Whether `names` is one two-sided ETHER+ adapter on a layer that [`fused.TwoSidedLinear`] can run (see
        [`fused.two_sided_linear_applies`])."""
        if len(names) != 1 or names[0] not in self.ether_u_out:
            return False
        return self.ether_block_layout[names[0]] == "paper" and fused.two_sided_linear_applies(self.base_layer, x)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each leading row of `x` goes through its own adapter (or none for `"__base__"`), one base matmul in all."""
        # "__base__" (and adapters that do not reach this layer) keep their rows untouched.
        groups = {
            name: rows for name, rows in adapter_index_groups(adapter_names, x.device).items() if name in self.ether_u
        }
        transformed, deltas = x.clone(), {}
        for name, rows in groups.items():
            dropped = self._dropout(x[rows], [name])
            if self.ether_block_layout[name] == "reference_code":
                transformed[rows], deltas[name] = dropped, self._reference_code_delta(dropped, name)
            else:
                transformed[rows] = self.transform_input(dropped, name)
        result = self.base_layer(transformed, *args, **kwargs)
        out = result.clone()
        for name, rows in groups.items():
            out[rows] = self._output_chain(result[rows] + deltas[name] if name in deltas else result[rows], [name])
        return out


class EtherConv(_EtherModule):
    """ETHER / ETHER+ on an `nn.Conv1d`, `nn.Conv2d` or `nn.Conv3d` (or a subclass): the math of [`EtherLayer`] on the
    filter matrix `W = weight.flatten(1)`, `[out_channels, in_channels / groups · kernel elements]`, so `n_blocks` must
    divide that fan-in (and `out_channels` for two-sided ETHER+). With `groups > 1`, `H_in` acts alike on every group's
    filters, and two-sided ETHER+ needs `n_blocks` to be a multiple of `groups`, so that `H_out` mixes filters of one
    group only (otherwise the result would not be a grouped convolution).

    Each forward transforms the weight (in float32 at least, cast once to the weight's dtype; a few passes over `W`,
    few next to the convolution's own `|W| · positions` multiply-adds), then convolves with it: the unmerged forward is
    the merged layer's. A plain convolution without hooks of its own runs `_conv_forward` with the new weight, touching
    nothing on the module. A subclass with its own `forward` or `__call__` (causal padding, weight standardization) or
    a layer with hooks runs through `torch.func.functional_call`, which puts the new weight on the module for the
    call: such layers must not be called from several threads at once.
    """

    def _check_layer(self, config: EtherConfig, module_name: str) -> None:
        check_conv_not_quantized(self.get_base_layer(), module_name)
        if _weight_is_computed(self.get_base_layer()):
            raise ValueError(
                f"ETHER cannot adapt the convolution {module_name!r}: its weight is computed by a parametrization "
                "(such as weight_norm), not stored as a parameter, so the transformed filters could not replace it. "
                "Remove the parametrization first (`torch.nn.utils.parametrize.remove_parametrizations(module, "
                "'weight')`), or leave the module out with `exclude_modules`."
            )
        super()._check_layer(config, module_name)
        groups = self.get_base_layer().groups
        if config.variant == "ether_plus" and config.n_blocks % groups:
            raise ValueError(
                f"Two-sided ETHER+ on module {module_name!r}, a convolution with groups={groups}, needs `n_blocks` to "
                f"be a multiple of groups (got {config.n_blocks}), so that each output block stays within one group. "
                f"Valid block counts for this layer: {_listed(self._valid_block_counts(config))}. Or use "
                "variant='ether_plus_one_sided', which transforms the input side only."
            )

    def _valid_block_counts(self, config: EtherConfig) -> list[int]:
        counts = super()._valid_block_counts(config)
        groups = self.get_base_layer().groups
        return [n for n in counts if n % groups == 0] if config.variant == "ether_plus" else counts

    def _axis_label(self, side: str) -> str:
        if side == "out":
            return f"out_channels={self.out_features}"
        channels, kernel = conv_fan_in(self.get_base_layer())
        return f"the fan-in in_channels/groups × kernel elements = {channels} × {kernel} = {self.in_features}"

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def _weight_from_matrix(self, matrix: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(weight.shape)

    def _adapted_forward(self, x: torch.Tensor, names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if not names:
            return base(x, *args, **kwargs)
        x = self._dropout(x, names)
        adapted = self._adapted_weight(names, "a convolution's weight")
        if fused.runs_plain_conv(base):
            return base._conv_forward(x, adapted, base.bias)
        return functional_call(base, {"weight": adapted}, (x, *args), kwargs)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """One convolution per adapter present in the batch, on its own samples."""
        out = None
        for name, rows in adapter_index_groups(adapter_names, x.device).items():
            # "__base__" (and adapters that do not reach this layer) run with the base weight.
            result = self._adapted_forward(x[rows], [name] if name in self.ether_u else [], *args, **kwargs)
            if out is None:
                out = result.new_empty((len(x), *result.shape[1:]))
            out[rows] = result
        return self.get_base_layer()(x, *args, **kwargs) if out is None else out
