"""Exact export of an ETHER / ETHER+ adapter to a standard peft LoRA adapter folder (DESIGN.md §5, "ETHER as a LoRA").

Every transform here is `H = I + D` per layer side, with `D` block-diagonal and of low rank in each block:

- ETHER: `D_b = −2 û_b û_bᵀ` (rank 1 per block).
- ETHER+: `D_b = −û_b û_bᵀ + v̂_b v̂_bᵀ = −û_b ŵ_bᵀ − ŵ_b û_bᵀ + ŵ_b ŵ_bᵀ` with `ŵ_b = û_b + v̂_b` (rank 2 per block;
  expand `v̂v̂ᵀ = (ŵ − û)(ŵ − û)ᵀ`). The `ŵ` form makes the factors exactly zero at the paper's init `v̂ = −û`.

Written with the placement `P` (`[n·j, d]`, row `(b, i)` holds basis vector `i` of block `b` in block `b`'s columns)
and the mix `M` (`j × j`: `[[−2]]`, or `[[0, −1], [−1, 1]]` on the basis `[û, ŵ]`): `D = Pᵀ (I_n ⊗ M) P`, so
`X D = (X Pᵀ (I_n ⊗ M)) P` is a product of an `n·j`-column factor and an `n·j`-row one: that is the LoRA.

With `block_layout="reference_code"` block `r`'s transform acts on every input chunk `C_c` of output row group `R_r`:
`ΔW[R_r, C_c] = W[R_r, C_c] D_r = (W[R_r, C_c] P_rᵀ M) P_r`, one rank-`j` term per pair `(r, c)`, rank `n²·j`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..saving import save_folder
from ..tuners_utils import CONV_LAYER_TYPES
from .config import EtherConfig
from .layer import EtherLayer

# The layer normalises its vectors in float32 with this clamp (a zero vector gives û = 0, i.e. H = I): so does the
# export, so that its factors describe the very transform the layer applies.
NORM_EPS = 1e-12
# The peft prefix of module names in a saved adapter's tensor names.
PEFT_PREFIX = "base_model.model."
# Layer types whose peft LoRA counterpart computes `base(x) + B(A(x))` with the same weight layout: only for these is
# the export exact. Subclasses count only when they keep the class's own computation (checked in `_check_layer`).
EXPORTABLE_TYPES = (nn.Linear, Conv1D, *CONV_LAYER_TYPES)


@dataclass(frozen=True)
class Side:
    """One side's `D = Pᵀ (I_n ⊗ M) P` (module docstring): `basis` `[n, j, d/n]` (float64), `mix` `M` `[j, j]`."""

    basis: torch.Tensor
    mix: torch.Tensor

    def placement(self) -> torch.Tensor:
        """`P`, `[n·j, d]`: the basis vectors of block `b` in block `b`'s columns, zeros elsewhere."""
        return torch.block_diag(*self.basis)

    def block_mix(self) -> torch.Tensor:
        """`I_n ⊗ M`, `[n·j, n·j]`."""
        return torch.block_diag(*[self.mix] * self.basis.shape[0])

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """`X Pᵀ` for rows `x` `[rows, d]`: each row's projections on the block bases, `[rows, n·j]`."""
        n, j, k = self.basis.shape
        return torch.einsum("rnk,njk->rnj", x.unflatten(-1, (n, k)), self.basis).flatten(1)

    def right_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, A)` with `X D = B A`: `B = X Pᵀ (I_n ⊗ M)` `[rows, n·j]`, `A = P` `[n·j, d]`."""
        return self.coefficients(x) @ self.block_mix(), self.placement()


def unit_blocks(u: torch.Tensor) -> torch.Tensor:
    """`û = u / ‖u‖` per block row, normalised in float32 as the layer does (norm clamped at `NORM_EPS`), as float64."""
    u = u.detach().to("cpu", torch.float32)
    return (u / u.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)).double()


def reflection_side(u: torch.Tensor) -> Side:
    """ETHER's `H = I − 2 ûûᵀ` per block: basis `[û]`, mix `[[−2]]`."""
    u_hat = unit_blocks(u)
    return Side(u_hat.unsqueeze(1), torch.tensor([[-2.0]], dtype=torch.float64))


def ether_plus_side(u: torch.Tensor, v: torch.Tensor) -> Side:
    """ETHER+'s `H⁺ = I − ûûᵀ + v̂v̂ᵀ` per block: basis `[û, ŵ]` with `ŵ = û + v̂`, mix `[[0, −1], [−1, 1]]`."""
    u_hat, v_hat = unit_blocks(u), unit_blocks(v)
    mix = torch.tensor([[0.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    return Side(torch.stack([u_hat, u_hat + v_hat], dim=1), mix)


def input_side_factors(w: torch.Tensor, side_in: Side) -> tuple[torch.Tensor, torch.Tensor]:
    """`W H_in − W = W D_in = B A` for `W` `[out, in]` (float64): rank `n·j`, `B = W Pᵀ (I ⊗ M)`, `A = P`.

    For ETHER this is `−2 Σ_b (W_{:,b} û_b)(e_b ⊗ û_b)ᵀ`: column `b` of `B` is `−2 W_{:,b} û_b`, row `b` of `A` is `û_b`
    placed in block `b`.
    """
    return side_in.right_factors(w)


def reference_code_input_factors(w: torch.Tensor, side_in: Side) -> tuple[torch.Tensor, torch.Tensor]:
    """`W' − W = B A` for `block_layout="reference_code"`, `W'[R_r, C_c] = W[R_r, C_c] H_r` (`W` `[out, in]`, float64;
    row groups `R_r` of `out/n` rows, input chunks `C_c` of `in/n` features): rank `n²·j`.

    Column `(r, c, i)` of `B` is `(W[R_r, C_c] P_rᵀ M)_{:, i}` on the rows `R_r` (zero elsewhere); row `(r, c, i)` of `A`
    is basis vector `i` of block `r` on the columns `C_c`.
    """
    n, j, size = side_in.basis.shape
    out_features = w.shape[0]
    left = torch.einsum("rgcm,rkm->rgck", w.reshape(n, out_features // n, n, size), side_in.basis) @ side_in.mix
    eye = torch.eye(n, dtype=w.dtype)
    b = torch.einsum("rgci,rs->rgsci", left, eye).reshape(out_features, n * n * j)
    a = torch.einsum("sim,cd->scidm", side_in.basis, eye).reshape(n * n * j, n * size)
    return b, a


InputFactors = Callable[[torch.Tensor, Side], tuple[torch.Tensor, torch.Tensor]]
# How the input side's blocks act on `W` in each `block_layout`: `(W [out, in] float64, side) -> (B, A)`.
INPUT_FACTORS: dict[str, InputFactors] = {"paper": input_side_factors, "reference_code": reference_code_input_factors}


def two_sided_factors(
    w: torch.Tensor, side_in: Side, side_out: Side, input_factors: InputFactors = input_side_factors
) -> tuple[torch.Tensor, torch.Tensor]:
    """`H_out W' − W = D_out W' + (W' − W) = B A` for `W` `[out, in]` (float64), with `W' = W + B_in A_in` the input
    side's transform (`input_factors`), rank `n_out·j` more than the input side's:

    `D_out W' = P_outᵀ (I ⊗ M_out) · (P_out W + (P_out B_in) A_in)`. So `B = [P_outᵀ (I ⊗ M_out) | B_in]` and
    `A = [P_out W + (P_out B_in) A_in ; A_in]`.
    """
    b_in, a_in = input_factors(w, side_in)
    projected = side_out.coefficients(w.T).T + side_out.coefficients(b_in.T).T @ a_in  # P_out W', [n_out·j, in]
    b_out = side_out.placement().T @ side_out.block_mix()
    return torch.cat([b_out, b_in], dim=1), torch.cat([projected, a_in], dim=0)


def ether_factors(
    layer: EtherLayer, name: str, w: torch.Tensor, layout: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ETHER, `W' = W H`: rank n (`n²` in the reference code's layout)."""
    return INPUT_FACTORS[layout](w, reflection_side(layer.ether_u[name]))


def ether_plus_factors(
    layer: EtherLayer, name: str, w: torch.Tensor, layout: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """ETHER+, `W' = H⁺_out W H⁺_in`: rank 2·n_out + 2·n_in (`2n + 2n²` in the reference code's layout)."""
    side_in = ether_plus_side(layer.ether_u[name], layer.ether_v[name])
    side_out = ether_plus_side(layer.ether_u_out[name], layer.ether_v_out[name])
    return two_sided_factors(w, side_in, side_out, INPUT_FACTORS[layout])


def ether_plus_one_sided_factors(
    layer: EtherLayer, name: str, w: torch.Tensor, layout: str = "paper"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided ETHER+, `W' = W H⁺_in`: rank 2·n (`2n²` in the reference code's layout)."""
    return INPUT_FACTORS[layout](w, ether_plus_side(layer.ether_u[name], layer.ether_v[name]))


Factors = Callable[[EtherLayer, str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# The factor function of each block layout and variant: `(layer, adapter name, W [out, in] float64) -> (B, A)`.
FACTORS: dict[str, dict[str, Factors]] = {
    layout: {
        "ether": partial(ether_factors, layout=layout),
        "ether_plus": partial(ether_plus_factors, layout=layout),
        "ether_plus_one_sided": partial(ether_plus_one_sided_factors, layout=layout),
    }
    for layout in INPUT_FACTORS
}


def smallest_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, A)`, or an identity times the dense `ΔW = B A` when that has the smaller rank (`min(out, in)` below the
    rank of `B A`: ETHER+ with many blocks on a narrow layer)."""
    out_features, rank = b.shape
    in_features = a.shape[1]
    if rank <= min(out_features, in_features):
        return b, a
    delta = b @ a
    if out_features <= in_features:
        return torch.eye(out_features, dtype=delta.dtype), delta
    return delta, torch.eye(in_features, dtype=delta.dtype)


def to_lora(
    model: PeftModel, out_dir: str | os.PathLike, *, adapter_name: str = "default", dtype: torch.dtype | None = None
) -> LoraConfig:
    """Write the ETHER adapter `adapter_name` of `model` as a standard peft LoRA adapter folder that computes the same
    function: `out_dir/adapter_config.json` and `out_dir/adapter_model.safetensors`, loadable with peft's own LoRA
    (`PeftModel.from_pretrained(base_model, out_dir)`, `load_adapter`, mixed batches with `adapter_names=`), so every
    engine that serves peft LoRA adapters serves ETHER adapters.

    Each adapted weight `W` (as `[out, in]`) changes by a low-rank `ΔW = W' − W`, factored exactly as `ΔW = B A`
    (`lora_B.weight = B`, `lora_A.weight = A`, `lora_alpha = r` so that peft's scaling is 1):

    - ETHER, `W' = W H`, `H = diag_b(I − 2 û_b û_bᵀ)`: `ΔW = −2 Σ_b (W_{:,b} û_b)(e_b ⊗ û_b)ᵀ`, rank n.
    - ETHER+, `W' = H⁺_out W H⁺_in`, `H⁺ = I + D`, `D = diag_b(−û_b û_bᵀ + v̂_b v̂_bᵀ)`:
      `ΔW = D_out (W H⁺_in) + W D_in`, rank 2·n_out + 2·n_in (one-sided ETHER+: `ΔW = W D_in`, rank 2·n).
    - `block_layout="reference_code"`: the input side's `ΔW[R_r, C_c] = W[R_r, C_c] D_r` has one term per output row
      group `r` and input chunk `c`, so ranks n², 2n² + 2n and 2n² for the three variants.

    Where that rank exceeds `min(out, in)` the layer gets the dense `ΔW` against an identity instead (rank
    `min(out, in)`); layers whose rank differs from the largest, `r`, are listed in `rank_pattern`/`alpha_pattern`.
    The factors are computed in float64 from the vectors normalised as the layer normalises them, then cast to `dtype`
    (default: each layer's base weight dtype). `target_modules` lists exactly the adapted modules (a regex matching
    just them if a plain list of names would also match other modules). `modules_to_save` and their weights (e.g. a
    classifier head) are carried over; GPT-2's `Conv1D` layers set `fan_in_fan_out=True`. Convolutions export to
    peft's LoRA convolutions (`lora_A` with the base kernel, stride and padding, `lora_B` 1×1).

    `B` contains the base weights (`W_{:,b} û_b`): the export equals the ETHER model **on the base weights `model`
    holds now**, and must be loaded onto the same base model (same checkpoint and revision, not quantized
    differently). It equals the ETHER model with this adapter alone active: several LoRA adapters active at once add
    their changes, where stacked ETHER adapters compose (`H_b H_a W`). The folder is written crash-safely
    (`xpeft.saving.save_folder`): a crash leaves the previous contents of `out_dir` or the complete export; a commit
    cut short is rolled back by the next `to_lora`, `save_pretrained`, `PeftModel.from_pretrained` or `load_adapter`
    of the folder in a process that imported xpeft. Engines that load without xpeft should get a new folder per
    export.

    Args:
        model (`PeftModel`): The peft model holding the ETHER adapter, unmerged.
        out_dir (`str` or `os.PathLike`): The folder to write (created if needed; the two files are replaced).
        adapter_name (`str`): The ETHER adapter to export.
        dtype (`torch.dtype`, *optional*): The dtype of the LoRA tensors; default each layer's base weight dtype.

    Returns:
        The `LoraConfig` written to `out_dir`.

    Raises:
        TypeError: `model` is not a `PeftModel`.
        ValueError: `adapter_name` is not an ETHER adapter of `model`, a layer has adapters merged into its weight,
            or a layer is one peft's LoRA would not compute the same way (grouped, dilated or non-zero-padded
            convolutions, layer subclasses with their own forward).
    """
    config = _ether_config(model, adapter_name)
    layout = getattr(config, "block_layout", "paper")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"`dtype` must be a floating-point torch.dtype or None, got {dtype!r}.")
    layers = _adapted_layers(model, adapter_name)
    for module_name, layer in layers.items():
        _check_layer(layer, module_name, adapter_name)
    tensors, ranks = {}, {}
    with torch.no_grad():
        for module_name, layer in layers.items():
            b, a = _lora_weights(layer, adapter_name, FACTORS[layout][layer.ether_variant[adapter_name]], dtype)
            tensors[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = a
            tensors[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = b
            ranks[module_name] = a.shape[0]
    tensors.update(_auxiliary_tensors(model, adapter_name))
    lora_config = _lora_config(model, config, layers, ranks)

    def save(directory: str) -> None:
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        lora_config.save_pretrained(directory)

    save_folder(save, Path(out_dir))
    return lora_config


def _ether_config(model: PeftModel, adapter_name: str) -> EtherConfig:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"to_lora needs the `PeftModel` holding the ETHER adapter (from `get_peft_model` or "
            f"`PeftModel.from_pretrained`), got `{type(model).__name__}`."
        )
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, EtherConfig):
        ether_names = [name for name, c in model.peft_config.items() if isinstance(c, EtherConfig)]
        peft_type = getattr(config, "peft_type", None)
        what = (
            "not an adapter of the model" if config is None else f"a {getattr(peft_type, 'value', peft_type)} adapter"
        )
        raise ValueError(
            f"to_lora exports ETHER adapters, but {adapter_name!r} is {what}. Pass `adapter_name=` one of the model's "
            f"ETHER adapters: {', '.join(map(repr, ether_names)) or 'none'}."
        )
    return config


def _adapted_layers(model: PeftModel, adapter_name: str) -> dict[str, EtherLayer]:
    """The ETHER layers holding `adapter_name`, by name in the base model (the names LoRA targets)."""
    return {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, EtherLayer) and adapter_name in module.ether_u
    }


def _check_layer(layer: EtherLayer, module_name: str, adapter_name: str) -> None:
    """Refuse what the export cannot reproduce exactly, naming the module, the reason and the fix."""
    if layer.merged_adapters:
        # A merged adapter's transform is in the stored weight, so it is not the base weight the LoRA is added to.
        raise ValueError(
            f"Cannot export ETHER adapter {adapter_name!r} to LoRA: module {module_name!r} has adapter(s) "
            f"{layer.merged_adapters} merged into its weight, which is then not the base weight a LoRA is added to. "
            "Unmerge first (`model.unmerge_adapter()`), or export from a model loaded without merging."
        )
    base = layer.get_base_layer()
    own_class = next(cls for cls in EXPORTABLE_TYPES if isinstance(base, cls))
    if not _computes_as(base, own_class):
        raise ValueError(
            f"Cannot export ETHER adapter {adapter_name!r} on module {module_name!r} exactly: its base layer "
            f"`{type(base).__name__}` has its own forward, while peft's LoRA adds `B A x` to the base output, which "
            f"equals ETHER only for `{own_class.__name__}`'s own computation. Leave the module out of the ETHER "
            "adapter (`exclude_modules`) to export it."
        )
    weight = base.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        raise ValueError(
            f"Cannot export ETHER adapter {adapter_name!r}: the weight of module {module_name!r} is "
            f"{'on the meta device (offloaded)' if weight.device.type == 'meta' else f'of dtype {weight.dtype}'}, "
            "and the LoRA factors are computed from the base weight. Load the model in a floating-point dtype, "
            "without offloading the adapted layers."
        )
    if isinstance(base, CONV_LAYER_TYPES):
        _check_conv(base, module_name, adapter_name)


def _computes_as(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling `module` runs `cls`'s own computation (no override of `__call__`, `forward` or a convolution's
    `_conv_forward`, on the class or the instance)."""
    methods = [name for name in ("__call__", "forward", "_conv_forward") if hasattr(cls, name)]
    overridden = any(getattr(type(module), name) is not getattr(cls, name) for name in methods)
    return not overridden and not any(name in vars(module) for name in methods)


def _check_conv(conv: nn.Module, module_name: str, adapter_name: str) -> None:
    # peft 0.21.2's LoRA convolution builds `lora_A` from the base's kernel size, stride and padding only, and gives
    # `lora_B` the base's groups: a grouped, dilated or non-zero-padded base would be computed differently.
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups} (peft's lora_A is not grouped)")
    if any(d != 1 for d in conv.dilation):
        problems.append(f"dilation={conv.dilation} (peft's lora_A is not dilated)")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r} (peft's lora_A pads with zeros)")
    if problems:
        raise ValueError(
            f"Cannot export ETHER adapter {adapter_name!r} on convolution {module_name!r} exactly: it has "
            f"{', '.join(problems)}, so peft's LoRA convolution would not compute the same function. Leave the "
            "module out of the ETHER adapter (`exclude_modules`) to export it."
        )


def _weight_out_in(layer: EtherLayer) -> torch.Tensor:
    """The base weight as the float64 CPU matrix `[out, in]` the transforms act on (a convolution's filters
    flattened to `[out_channels, in_channels · kernel elements]`)."""
    weight = layer.get_base_layer().weight.detach()
    if isinstance(layer.get_base_layer(), Conv1D):
        weight = weight.T  # stored [in, out]
    return weight.flatten(1).to("cpu", torch.float64)


def _lora_weights(
    layer: EtherLayer, adapter_name: str, factors: Factors, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(lora_B.weight, lora_A.weight)` of one layer, in peft's shapes and the requested dtype."""
    base = layer.get_base_layer()
    b, a = smallest_factors(*factors(layer, adapter_name, _weight_out_in(layer)))
    dtype = dtype or base.weight.dtype
    if isinstance(base, CONV_LAYER_TYPES):
        # lora_A convolves with the base kernel into r channels, lora_B is a 1×1 convolution back to out_channels.
        kernel = base.weight.shape[2:]
        a = a.reshape(len(a), base.in_channels, *kernel)
        b = b.reshape(*b.shape, *[1] * len(kernel))
    return b.to(dtype).contiguous(), a.to(dtype).contiguous()


def _auxiliary_tensors(model: PeftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's saved tensors other than the ETHER layers' (`modules_to_save`, e.g. a classifier head), under
    the names peft saves them by, which are the same for a LoRA adapter."""
    ether_prefixes = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, EtherLayer))
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {key: tensor.detach().cpu() for key, tensor in state.items() if not key.startswith(ether_prefixes)}


def _exact_targets(model: PeftModel, names: list[str]) -> list[str] | str:
    """`target_modules` that peft matches to exactly `names`: the list of names, unless one of them is also the end of
    another module's name (peft matches a list entry as a suffix after a dot), then a regex of just them (matched in
    full)."""
    wanted = set(names)
    for other, _ in model.base_model.model.named_modules():
        parts = other.split(".")
        if other not in wanted and any(".".join(parts[i:]) in wanted for i in range(1, len(parts))):
            return "|".join(re.escape(name) for name in sorted(names))
    return sorted(names)


def _lora_config(
    model: PeftModel, config: EtherConfig, layers: dict[str, EtherLayer], ranks: dict[str, int]
) -> LoraConfig:
    r = max(ranks.values())
    # peft matches a pattern key `k` with `re.match(rf"(.*\.)?({k})$", name)`: "^" stops it matching a longer name.
    pattern = {f"^{re.escape(name)}": rank for name, rank in ranks.items() if rank != r}
    return LoraConfig(
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=_exact_targets(model, list(layers)),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        use_dora=False,
        fan_in_fan_out=any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values()),
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
    )
