"""The special (fast) paths of ETHER's layers, kept apart from the math in `layer.py`, and the checks that decide when
they may run. Each computes exactly what `layer.py`'s plain torch ops compute, only faster or in less memory:

- `block_update`: [`BlockUpdate`], a hand-written autograd Function for `x ↦ (I + A M Aᵀ) x` per block (every ETHER
  transform of activations), instead of autograd over the same ops.
- `two_sided_linear`: [`TwoSidedLinear`], one Function for `H⁺_out W H⁺_in x + b` on a plain frozen linear layer (one
  two-sided ETHER+ adapter), which keeps `x` for the backward instead of an output-sized activation.

Each path can be switched off, for measuring it (`benchmarks/bench_ether.py --ablation`) or for ruling it out when
debugging: set the environment variable `XPEFT_ETHER_PLAIN` to a comma-separated list of path names (or `all`) before
importing xpeft, or use [`plain_paths`] in code. The switch is read at each forward, process-wide.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import reduce
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from transformers.pytorch_utils import Conv1D

from ..tuners_utils import CONV_LAYER_TYPES, weight_as_out_in

PATHS = ("block_update", "two_sided_linear")


def _enabled_from_env() -> dict[str, bool]:
    names = {name.strip() for name in os.environ.get("XPEFT_ETHER_PLAIN", "").split(",") if name.strip()}
    unknown = names - {*PATHS, "all"}
    if unknown:
        raise ValueError(
            f"XPEFT_ETHER_PLAIN names unknown ETHER paths {sorted(unknown)}; use a comma-separated list of "
            f"{', '.join(PATHS)}, or 'all'."
        )
    return {path: not ({path, "all"} & names) for path in PATHS}


# Whether each special path may run (see the module docstring); the plain torch ops run where it is False.
ENABLED: dict[str, bool] = _enabled_from_env()


@contextmanager
def plain_paths(*paths: str) -> Iterator[None]:
    """Run the plain torch ops instead of the named special paths (all of them without names) inside the block."""
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"Unknown ETHER paths {sorted(unknown)}; choose among {', '.join(PATHS)}.")
    before = dict(ENABLED)
    ENABLED.update(dict.fromkeys(paths or PATHS, False))
    try:
        yield
    finally:
        ENABLED.update(before)


# M Aᵀ in `H = I + A M Aᵀ` per block, the form every ETHER transform takes (see `layer.py`): A = [a_1 .. a_k] is the
# basis `[n, k, d/n]` of each block and M a symmetric k×k mix, given as nested tuples of Python floats.
Mix = tuple[tuple[float, ...], ...]


def mixed_basis(basis: torch.Tensor, mix: Mix) -> torch.Tensor:
    """`M Aᵀ` as rows, `[n, k, d/n]` (row `i` = `Σ_j M_ij a_j`). `M` is applied with Python scalars, skipping its
    zeros, so that a zero basis vector gives exactly zero coefficients."""
    return torch.stack([reduce(operator.add, (w * basis[:, j] for j, w in enumerate(row) if w)) for row in mix], dim=1)


def _mixed_projections(
    rows: torch.Tensor, mixed_basis: torch.Tensor, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """`M Aᵀ (x_b − s_b)` for every row and block: `rows` `[R, n, d/n]`, `mixed_basis` (`M Aᵀ`, see [`mixed_basis`])
    `[n, k, d/n]`, optional `shift` `s` (a vector of the full width) → `[n, k, R]`.

    One batched matmul over the blocks reads `rows` once, through a strided view, with no full-size temporary
    (`A · rowsᵀ` rather than `rows · A`: MKL runs it ~25% faster on CPU).
    """
    coefficients = torch.bmm(mixed_basis, rows.permute(1, 2, 0))
    if shift is not None:
        coefficients = coefficients - torch.bmm(mixed_basis, shift.reshape(*mixed_basis.shape[::2], 1))
    return coefficients


def _add_update(
    rows: torch.Tensor, coefficients: torch.Tensor, basis: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`x_b + Σ_j c_j a_j` per block, written into `out` (shaped like `x`, through a `rows`-shaped view; may be `x`
    itself) or, without `out`, into a new `rows`-shaped tensor (differentiable: no `out=`)."""
    per_row = coefficients.permute(2, 0, 1).unsqueeze(-1)  # [R, n, k, 1]
    blocks = torch.addcmul(rows, per_row[:, :, 0], basis[:, 0], out=None if out is None else out.view(rows.shape))
    for j in range(1, basis.shape[1]):
        blocks.addcmul_(per_row[:, :, j], basis[:, j])
    return blocks if out is None else out


def _basis_grad(
    coefficients: torch.Tensor,
    grad_rows: torch.Tensor,
    grad_coefficients: torch.Tensor,
    rows: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """`∂L/∂A = Σ_rows (M Aᵀ(x − s)) gᵀ + (M Aᵀg) (x − s)ᵀ` for `x ↦ x + A M Aᵀ (x − s)` per block (`M` symmetric):
    two batched matmuls that reduce over the rows."""
    grad_basis = torch.bmm(coefficients, grad_rows.transpose(0, 1))
    grad_basis = grad_basis.baddbmm(grad_coefficients, rows.transpose(0, 1))
    if shift is not None:
        grad_basis = grad_basis - grad_coefficients.sum(-1, keepdim=True) * shift.reshape(-1, 1, rows.shape[2])
    return grad_basis


def _new_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like `x` that reshapes to blocks as a view. It is a tensor of its own, not a view, so the
    model may modify a Function output made of it in place (autograd forbids that on a view). A matrix keeps the
    layout of `x` (a convolution's transposed filter matrix stays a plain transposition, which `conv2d` reads fast)."""
    return torch.empty_like(x) if x.dim() == 2 else x.new_empty(x.shape)


class BlockUpdate(torch.autograd.Function):
    """`x_b ↦ (I + A M Aᵀ) x_b` per block of the last axis, with a hand-written backward; with a `shift` `s` (a bias),
    `x ↦ s + H (x − s)`. `H` is symmetric, so `∂L/∂x = H g`, `∂L/∂s = g − H g` summed over the rows, and `∂L/∂A` is
    [`_basis_grad`]. Saves `x` and the `[n, k, R]` coefficients only when `A` needs a gradient. Runs in the dtype of
    `x` even under autocast (its matmuls would otherwise return another dtype than the backward's gradients).

    Under `create_graph=True` the backward runs the same formulas as differentiable ops, with the coefficients
    recomputed from `x`, so that second derivatives (gradient penalties, Hessian-vector products) are exact."""

    @staticmethod
    def forward(ctx, x, basis, mix, shift=None):
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, basis.shape[0], basis.shape[2])
            coefficients = _mixed_projections(rows, mixed_basis(basis, mix), shift)
            out = _add_update(rows, coefficients, basis, out=_new_like(x))
        basis_needs_grad = ctx.needs_input_grad[1]
        saved_x, saved_coefficients = (x, coefficients) if basis_needs_grad else (None, None)
        ctx.save_for_backward(saved_x, basis, saved_coefficients, shift)
        ctx.mix, ctx.rows_shape = mix, rows.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, basis, coefficients, shift = ctx.saved_tensors
        create_graph = torch.is_grad_enabled()  # grad mode is on in backward only under create_graph=True
        grad_x = grad_basis = grad_shift = None
        with torch.autocast(grad.device.type, enabled=False):
            mixed = mixed_basis(basis, ctx.mix)
            grad_rows = grad.reshape(ctx.rows_shape)
            grad_coefficients = _mixed_projections(grad_rows, mixed)
            if ctx.needs_input_grad[0]:
                out = None if create_graph else _new_like(grad)  # `out=` ops are not differentiable
                grad_x = _add_update(grad_rows, grad_coefficients, basis, out=out).reshape(grad.shape)
            if ctx.needs_input_grad[1]:
                rows = x.reshape(ctx.rows_shape)
                if create_graph:  # the saved coefficients carry no graph
                    coefficients = _mixed_projections(rows, mixed, shift)
                grad_basis = _basis_grad(coefficients, grad_rows, grad_coefficients, rows, shift)
            if shift is not None and ctx.needs_input_grad[3]:
                # −Σ_rows A M Aᵀ g: the update's part of g, with the opposite sign
                grad_shift = -(grad_coefficients.sum(-1, keepdim=True) * basis).sum(1).reshape(shift.shape)
        return grad_x, grad_basis, None, grad_shift


def _two_sided_composed(x, basis_in, basis_out, mix, weight, bias):
    """`H⁺_out (W H⁺_in x) + b` (`weight` `[out, in]`) from `BlockUpdate`s: what [`TwoSidedLinear`] computes in one
    Function."""
    x_in = BlockUpdate.apply(x, basis_in, mix)
    y = torch.nn.functional.linear(x_in, weight, bias)
    return BlockUpdate.apply(y, basis_out, mix, bias)


def _linear_into_own_tensor(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x Wᵀ + b` (`weight` `[out, in]`) in a tensor that is not a view, as `F.linear` may return on 3-D inputs."""
    out = x.new_empty(*x.shape[:-1], len(weight))
    rows, out_rows = x.reshape(-1, x.shape[-1]), out.view(-1, len(weight))
    if bias is None:
        torch.mm(rows, weight.T, out=out_rows)
    else:
        torch.addmm(bias, rows, weight.T, out=out_rows)
    return out


def _projected_input(
    grad_coefficients: torch.Tensor, rows: torch.Tensor, coefficients_in: torch.Tensor, basis_in: torch.Tensor
) -> torch.Tensor:
    """`Σ_rows (M Aᵀg) x'ᵀ` for every output basis row (`grad_coefficients` `[n_out, k, R]`) against the transformed
    input `x' = H_in x`, `[n_out·k, in]`, from `x` itself (`rows` `[R, n_in, in/n_in]`) without building `x'`: per input
    block `x' = x + A_in c` (`c` = `coefficients_in`, `[n_in, k, R]`), so the product is
    `Σ_rows (M Aᵀg) xᵀ + K A_in` with the small `K = Σ_rows (M Aᵀg) cᵀ`, `[n_out·k, n_in·k]`."""
    grad_flat = grad_coefficients.flatten(0, 1)
    projected = grad_flat @ rows.flatten(1)
    k_matrix = (grad_flat @ coefficients_in.flatten(0, 1).T).view(len(grad_flat), *basis_in.shape[:2])
    projected.view(len(grad_flat), *basis_in.shape[::2]).add_(
        torch.bmm(k_matrix.transpose(0, 1), basis_in).transpose(0, 1)
    )
    return projected


class TwoSidedLinear(torch.autograd.Function):
    """`y = H⁺_out (W H⁺_in x) + b` for one two-sided ETHER+ adapter on a plain linear layer (frozen `W`, `b`), in one
    Function that keeps `x` and `[n, 2, rows]` coefficients per side for the backward instead of an output-sized
    activation: the output update is written into the matmul's own output, and the backward gets `W x'`
    (`x' = H⁺_in x`) through `W` instead of saving it:

    `Σ_rows (M Aᵀg) (W_b x')ᵀ = (Σ_rows (M Aᵀg) x'ᵀ) W_bᵀ` for output block `b`, with the middle product taken from the
    saved `x` (see [`_projected_input`]). Saves nothing of the activations when only `x` needs a gradient (a frozen
    adapter).

    Under `create_graph=True` the backward differentiates [`_two_sided_composed`] instead (or, when only `x` needs a
    gradient, the transposed chain `H_in Wᵀ H_out g`), for exact second derivatives.
    """

    @staticmethod
    def forward(ctx, x, basis_in, basis_out, mix, weight, bias, fan_in_fan_out):
        rows = x.reshape(-1, basis_in.shape[0], basis_in.shape[2])
        mixed_in, mixed_out = mixed_basis(basis_in, mix), mixed_basis(basis_out, mix)
        coefficients_in = _mixed_projections(rows, mixed_in)
        x_in = _add_update(rows, coefficients_in, basis_in, out=_new_like(x))
        y = _linear_into_own_tensor(x_in, weight_as_out_in(weight, fan_in_fan_out), bias)
        rows_out = y.view(-1, basis_out.shape[0], basis_out.shape[2])
        coefficients_out = _mixed_projections(rows_out, mixed_out, bias)
        _add_update(rows_out, coefficients_out, basis_out, out=y)  # in place: y is ours alone
        needs_in, needs_out = ctx.needs_input_grad[1:3]
        saved_x, saved_in = (x, coefficients_in) if needs_in or needs_out else (None, None)
        saved_out = coefficients_out if needs_out else None
        ctx.save_for_backward(saved_x, basis_in, basis_out, mixed_in, mixed_out, saved_in, saved_out, weight, bias)
        ctx.mix, ctx.fan_in_fan_out = mix, fan_in_fan_out
        return y

    @staticmethod
    def backward(ctx, grad):
        x, basis_in, basis_out, mixed_in, mixed_out, coefficients_in, coefficients_out, weight, bias = (
            ctx.saved_tensors
        )
        weight = weight_as_out_in(weight, ctx.fan_in_fan_out)
        if torch.is_grad_enabled():  # create_graph=True
            return TwoSidedLinear._differentiable_backward(ctx, grad, x, basis_in, basis_out, weight, bias)
        needs_x, needs_in, needs_out = ctx.needs_input_grad[:3]
        (out_features, in_features), n_rows = weight.shape, grad.numel() // grad.shape[-1]
        grad_rows_out = grad.reshape(n_rows, *basis_out.shape[::2])
        grad_coefficients_out = _mixed_projections(grad_rows_out, mixed_out)
        rows = None if x is None else x.reshape(n_rows, *basis_in.shape[::2])
        grad_basis_in = grad_basis_out = grad_x = None
        if needs_out:
            projected = _projected_input(grad_coefficients_out, rows, coefficients_in, basis_in)
            weight_blocks = weight.view(basis_out.shape[0], -1, in_features)
            grad_basis_out = torch.bmm(projected.view(*basis_out.shape[:2], in_features), weight_blocks.mT)
            grad_basis_out.baddbmm_(coefficients_out, grad_rows_out.transpose(0, 1))
        if needs_x or needs_in:
            grad_y = _add_update(grad_rows_out, grad_coefficients_out, basis_out, out=_new_like(grad))
            grad_y = grad_y.reshape(n_rows, out_features)
            grad_x_in = grad_y @ weight
            grad_rows_in = grad_x_in.view(n_rows, *basis_in.shape[::2])
            grad_coefficients_in = _mixed_projections(grad_rows_in, mixed_in)
            if needs_in:
                grad_basis_in = _basis_grad(coefficients_in, grad_rows_in, grad_coefficients_in, rows)
            if needs_x:  # in place: grad_x_in is ours alone
                grad_x = _add_update(grad_rows_in, grad_coefficients_in, basis_in, out=grad_x_in)
                grad_x = grad_x.view(*grad.shape[:-1], in_features)
        return grad_x, grad_basis_in, grad_basis_out, None, None, None, None

    @staticmethod
    def _differentiable_backward(ctx, grad, x, basis_in, basis_out, weight, bias):
        needed = ctx.needs_input_grad[:3]
        if x is None:  # only x needs a gradient: H_in Wᵀ H_out g (both H symmetric), differentiable in g
            grad_y = BlockUpdate.apply(grad, basis_out, ctx.mix)
            return (BlockUpdate.apply(grad_y @ weight, basis_in, ctx.mix), *[None] * 6)
        with torch.enable_grad():
            y = _two_sided_composed(x, basis_in, basis_out, ctx.mix, weight, bias)
        wanted = [t for t, need in zip((x, basis_in, basis_out), needed, strict=True) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
        return (*[next(grads) if need else None for need in needed], None, None, None, None)


# The hooks a module's own call runs, and those that every module's call runs (`torch.nn.modules.module`).
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOK_DICTS = tuple("_global" + name for name in _HOOK_DICTS)


def runs_only_its_forward(module: nn.Module) -> bool:
    """Whether calling `module` runs its class's `forward` and nothing else: neither `__call__` nor (on the instance)
    `forward` overridden, as accelerate's hooks do, and no hooks of its own."""
    plain_call = type(module).__call__ is nn.Module.__call__ and "forward" not in vars(module)
    return plain_call and not any(getattr(module, name) for name in _HOOK_DICTS)


def is_own_forward(forward: Any, cls: type) -> bool:
    """Whether `forward` is the one `cls`'s library defines (also when inherited by a subclass), not a patch or a
    wrapper put on the class since."""
    defined_there = getattr(forward, "__module__", None) == cls.__module__
    named_so = getattr(forward, "__qualname__", None) == f"{cls.__qualname__}.forward"
    return defined_there and named_so and not hasattr(forward, "__wrapped__")


def is_plain_linear(module: nn.Module) -> bool:
    """Whether calling `module` would run just `nn.Linear`'s or `Conv1D`'s own forward: the exact class, unpatched,
    without wrapper, parametrization or hooks, its own or global (those see the base layer's call, so it must
    happen)."""
    cls = type(module)
    unpatched = cls in (nn.Linear, Conv1D) and is_own_forward(cls.forward, cls)
    no_global_hooks = not any(getattr(module_hooks, name) for name in _GLOBAL_HOOK_DICTS)
    return unpatched and no_global_hooks and runs_only_its_forward(module)


def two_sided_linear_applies(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether [`TwoSidedLinear`] may run a two-sided ETHER+ adapter on `base` for input `x`: the path is enabled,
    calling `base` would run just `nn.Linear`'s or `Conv1D`'s forward (see [`is_plain_linear`]), with frozen plain
    (not subclassed: quantized, distributed) parameters on the device of `x`, outside autocast."""
    if not ENABLED["two_sided_linear"] or not is_plain_linear(base):
        return False
    if base.weight.device != x.device or not torch.amp.is_autocast_available(x.device.type):
        return False  # e.g. meta tensors, which autocast does not know
    parameters = [p for p in (base.weight, base.bias) if p is not None]
    plain_tensors = all(type(p) in (nn.Parameter, torch.Tensor) and not p.requires_grad for p in parameters)
    return plain_tensors and not torch.is_autocast_enabled(x.device.type)


def runs_plain_conv(base: nn.Module) -> bool:
    """Whether calling the convolution `base` would run just torch's own `Conv*d.forward`: neither `forward` nor
    `__call__` overridden, and no hooks of its own, forward or backward (calling `_conv_forward` would skip them).
    Global module hooks (`register_module_forward_hook`, used by e.g. `FlopCounterMode`) do not count: they do not see
    the base convolution, which keeps plain convolutions thread-safe."""
    plain = any(is_own_forward(type(base).forward, cls) for cls in CONV_LAYER_TYPES)
    return plain and runs_only_its_forward(base)
