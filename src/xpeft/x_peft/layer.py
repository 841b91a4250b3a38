"""X-PEFT layer: a feed-forward output projection followed by a bottleneck adapter composed from a frozen bank."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..tuners_utils import BASE_ADAPTER_NAME, check_mixed_batch_args, layer_features
from .bank import XPeftBank

# Why X-PEFT never merges; shown by the tuner model's and the layer's merge refusals alike.
UNMERGEABLE_REASON = "the bottleneck B f(A h + a) + b is nonlinear in h, so no weight matrix reproduces it."
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
Composed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def mask_weights(logits: torch.Tensor, mask_type: str, hard_k: int) -> torch.Tensor:
    """Mixing weights over the bank from mask logits `[..., N]` (DESIGN.md §2, "Soft masks" / "Hard masks").

    Soft: `softmax(S)`. Hard: the binary top-k mask divided by k (the mean of the k selected adapters), with a
    straight-through estimator: the forward value is exactly the hard mask, the gradient is that of `softmax(S)`.
    """
    soft = torch.softmax(logits.float(), dim=-1)
    if mask_type == "soft":
        return soft
    index = logits.topk(hard_k, dim=-1).indices
    hard = torch.zeros_like(soft).scatter_(-1, index, 1.0 / hard_k)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return hard
    # Parenthesised so that the forward value is `hard + 0` exactly, bit for bit the value without gradients.
    return hard + (soft - soft.detach())


def compose_adapter(bank: Composed, weights_A: torch.Tensor, weights_B: torch.Tensor) -> Composed:
    """`A* = Σ_i wA_i A_i`, `a* = Σ_i wA_i a_i`, `B* = Σ_j wB_j B_j`, `b* = Σ_j wB_j b_j` (DESIGN.md §2).

    Weights of shape `[N]` give one adapter; `[P, N]` give P adapters at once. Mixing the weights first means a
    single bottleneck runs per token, never N.
    """
    A, a, B, b = bank
    # The bank may have been cast with the model (e.g. `model.half()`); the mixing weights follow it.
    weights_A, weights_B = weights_A.to(A.dtype), weights_B.to(B.dtype)
    lead = weights_A.shape[:-1]
    A_star = (weights_A @ A.flatten(1)).view(*lead, *A.shape[1:])
    B_star = (weights_B @ B.flatten(1)).view(*lead, *B.shape[1:])
    return A_star, weights_A @ a, B_star, weights_B @ b


def bottleneck_delta(h: torch.Tensor, composed: Composed, activation) -> torch.Tensor:
    """The Pfeiffer bottleneck `B f(A h + a) + b` (DESIGN.md §2, "Adapter"), added to `h` by the caller.

    `h: [..., T, d]`. One adapter: `A: [r, d]`, `a: [r]`, `B: [d, r]`, `b: [d]`. Per-sample adapters: a leading
    sample axis on all four and `h: [S, T, d]`, computed as batched matmuls.
    """
    A, a, B, b = composed
    if A.dim() == 2:
        return F.linear(activation(F.linear(h, A, a)), B, b)
    # Per-sample adapters: batched matmuls with the biases fused in.
    z = torch.baddbmm(a.unsqueeze(1), h, A.mT)
    return torch.baddbmm(b.unsqueeze(1), activation(z), B.mT)


class XPeftLayer(nn.Module, BaseTunerLayer):
    """X-PEFT (arXiv 2401.16137, https://arxiv.org/abs/2401.16137) on a feed-forward output projection.

    With `h = W x + c` the output of the wrapped projection and, for this layer, a frozen bank of N adapters
    `(A_i, a_i, B_i, b_i)`:

    :math:`y = h + B^* f(A^* h + a^*) + b^*`, `A^* = Σ_i w^A_i A_i` (and `a^*`), `B^* = Σ_j w^B_j B_j` (and `b^*`),

    with `w^A = softmax(S_A)`, `w^B = softmax(S_B)` (soft masks) or the top-k of `S_A`, `S_B` divided by k (hard
    masks, straight-through). Only the mask logits `S_A, S_B ∈ R^N` of each profile are trainable; the bank lives
    once on the tuner model (`XPeftModel.xpeft_bank`) and this layer reads its own slice by layer name. For BERT the
    adapter thus sits between `output.dense` and the dropout/residual/LayerNorm, as Pfeiffer's adapter does.

    Not mergeable: `f` is nonlinear, so no weight `W'` gives the same output.
    """

    adapter_layer_names = ("xpeft_mask_A", "xpeft_mask_B")
    other_param_names = ("xpeft_mask_type", "xpeft_hard_k")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, bank: XPeftBank, layer_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.xpeft_mask_A = nn.ParameterDict({})
        self.xpeft_mask_B = nn.ParameterDict({})
        self.xpeft_mask_type: dict[str, str] = {}
        self.xpeft_hard_k: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features, _ = layer_features(base_layer, "X-PEFT")
        # A plain reference, not a submodule: the bank is registered once, on the tuner model.
        self.__dict__["xpeft_bank"] = bank
        self.layer_name = layer_name
        # name -> (copy of S_A, copy of S_B, bank data_ptr, composed adapter); see `_cache_hit`.
        self._composed_cache: dict[str, tuple[torch.Tensor, torch.Tensor, int, Composed]] = {}
        # ((adapter_names, per-profile composed tuples), stacked per-sample adapters); see `_batched`.
        self._batch_cache: tuple[tuple, Composed] | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, init_logits: torch.Tensor | None = None) -> None:
        """Add profile `adapter_name`; `init_logits` `[2, N]` (S_A, S_B) sets its masks, e.g. from a profile store."""
        weight = self.get_base_layer().weight
        self.xpeft_bank.ensure_layer(self.layer_name, self.out_features, weight.device)
        if init_logits is None:
            if config.init_weights:
                scale = 0.0 if config.mask_type == "soft" else 0.01  # hard: small noise breaks top-k ties
            else:
                scale = 1.0
            init_logits = torch.randn(2, config.bank_size) * scale
        # Mask logits live on the base layer's device and stay float32 whatever the model's dtype (they are tiny, and
        # top-k / softmax want the precision). Created in place rather than moved by peft's
        # `_move_adapter_to_device_of_base_layer`, which scans every existing profile's parameters on each call.
        for container, logits in zip((self.xpeft_mask_A, self.xpeft_mask_B), init_logits, strict=True):
            container[adapter_name] = nn.Parameter(logits.to(device=weight.device, dtype=torch.float32, copy=True))
        self.xpeft_mask_type[adapter_name] = config.mask_type
        self.xpeft_hard_k[adapter_name] = config.hard_k
        # What `self.set_adapter(self.active_adapters)` would do for the new profile only: a store attaches thousands
        # of profiles, and re-flagging every existing one on each attach would make that quadratic.
        for container in (self.xpeft_mask_A, self.xpeft_mask_B):
            container[adapter_name].requires_grad_(adapter_name in self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        self._composed_cache.pop(adapter_name, None)
        self._batch_cache = None
        super().delete_adapter(adapter_name)

    # -- composition with caching ----------------------------------------------------------------------------

    def _cache_hit(self, entry: tuple, mask_A: torch.Tensor, mask_B: torch.Tensor, bank_ptr: int) -> bool:
        # Keyed on a copy of the 2·N logits themselves, compared exactly: writes through `param.data` (or any other
        # path that does not bump `_version`) change the values and so miss. The bank's data_ptr changes on a move
        # or cast of the bank.
        saved_A, saved_B, saved_ptr, _ = entry
        if saved_ptr != bank_ptr or saved_A.device != mask_A.device or saved_A.dtype != mask_A.dtype:
            return False
        return torch.equal(saved_A, mask_A) and torch.equal(saved_B, mask_B)

    def composed(self, name: str) -> Composed:
        """The composed adapter `(A*, a*, B*, b*)` of profile `name`, cached while its masks are unchanged."""
        # Read through `_parameters` directly: this runs once per profile per layer on every mixed-batch call.
        mask_A, mask_B = self.xpeft_mask_A._parameters[name], self.xpeft_mask_B._parameters[name]
        needs_grad = torch.is_grad_enabled() and (mask_A.requires_grad or mask_B.requires_grad)
        bank = self.xpeft_bank.layer(self.layer_name)
        bank_ptr = bank[0].data_ptr()
        cached = self._composed_cache.get(name)
        if not needs_grad and cached is not None and self._cache_hit(cached, mask_A, mask_B, bank_ptr):
            return cached[3]
        mask_type, k = self.xpeft_mask_type[name], self.xpeft_hard_k[name]
        result = compose_adapter(bank, mask_weights(mask_A, mask_type, k), mask_weights(mask_B, mask_type, k))
        if not needs_grad:
            self._composed_cache[name] = (mask_A.detach().clone(), mask_B.detach().clone(), bank_ptr, result)
        return result

    def _batched(self, adapter_names: Sequence[str]) -> Composed:
        """Per-sample composed adapters `[S, ...]`; `"__base__"` samples get a zero adapter (an exact no-op)."""
        unique = [name for name in dict.fromkeys(adapter_names) if name != BASE_ADAPTER_NAME]
        table = [self.composed(name) for name in unique]
        # `composed` returns the very same cached tuple while a profile's masks and the bank are unchanged, so the
        # stacked batch is still valid when the names and every per-profile object are identical.
        names, bank_ptr = tuple(adapter_names), self.xpeft_bank.layer(self.layer_name)[0].data_ptr()
        if self._batch_cache is not None and not torch.is_grad_enabled():
            (cached_names, cached_ptr, cached_table), cached_result = self._batch_cache
            if (cached_names, cached_ptr) == (names, bank_ptr) and all(
                a is b for a, b in zip(cached_table, table, strict=True)
            ):
                return cached_result
        zero = tuple(torch.zeros_like(part) for part in table[0]) if unique else None
        if zero is None:  # only "__base__" samples: shapes come from the bank
            A, a, B, b = self.xpeft_bank.layer(self.layer_name)
            zero = (
                A.new_zeros(A.shape[1:]),
                a.new_zeros(a.shape[1:]),
                B.new_zeros(B.shape[1:]),
                b.new_zeros(b.shape[1:]),
            )
        slot = {name: i for i, name in enumerate(unique)}
        index = torch.tensor([slot.get(name, len(unique)) for name in adapter_names], device=zero[0].device)
        result = tuple(torch.stack(parts)[index] for parts in zip(*table, zero, strict=True))
        if not torch.is_grad_enabled():  # with grad on, the entry would keep the autograd graph alive and never hit
            self._batch_cache = ((names, bank_ptr, tuple(table)), result)
        return result

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # One name per leading row of x, as in the other tuners' layers (see `check_mixed_batch_args`).
        adapter_names = check_mixed_batch_args(self, x, kwargs.pop("adapter_names", None))
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        activation = ACTIVATIONS[self.xpeft_bank.non_linearity]
        if adapter_names is not None:
            return self._mixed_batch_forward(result, adapter_names, activation)
        # Never merged (see `merge`), so the active adapters always run here.
        for name in self.active_adapters:
            if name not in self.xpeft_mask_A:
                continue
            composed = self.composed(name)
            h = self._cast_input_dtype(result, composed[0].dtype)
            result = result + bottleneck_delta(h, composed, activation).to(result.dtype)
        return result

    def _mixed_batch_forward(self, result: torch.Tensor, adapter_names: Sequence[str], activation) -> torch.Tensor:
        composed = self._batched(adapter_names)
        # One sample per leading row group: [S, T, d] (OPT's flattened [S*T, d] rows are contiguous per sample).
        h = self._cast_input_dtype(result, composed[0].dtype).reshape(len(adapter_names), -1, result.shape[-1])
        delta = bottleneck_delta(h, composed, activation)
        return result + delta.reshape(result.shape).to(result.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"X-PEFT adapters cannot be merged into the base weights: {UNMERGEABLE_REASON} Keep the model unmerged "
            "(it runs as is), or use `model.unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        # Nothing is ever merged (see `merge`), so there is nothing to undo.
        return None
