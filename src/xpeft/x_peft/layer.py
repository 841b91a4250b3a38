"""X-PEFT layer: a projection with an adapter composed from a frozen bank (bottleneck adapters or LoRA factors)."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..tuners_utils import BASE_ADAPTER_NAME, check_mixed_batch_args, layer_features, weight_as_out_in
from .bank import XPeftBank

# Why X-PEFT never merges; shown by the tuner model's and the layer's merge refusals alike.
UNMERGEABLE_REASON = "the bottleneck B f(A h + a) + b is nonlinear in h, so no weight matrix reproduces it."
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
Composed = tuple[torch.Tensor, ...]  # (A*, a*, B*, b*) of a bottleneck bank, (A*, B*) of a LoRA bank

COMPOSED_CACHE_SIZE = 32
"""Composed adapters each X-PEFT layer keeps, least recently used evicted first; 0 disables caching.

Read at every use, so `xpeft.x_peft.layer.COMPOSED_CACHE_SIZE = n` takes effect on the next call. One entry is one
profile's `(A*, a*, B*, b*)` for one layer, `2rd + r + d` floats: 298 KB on BERT-base (d=768, r=48), so the default
holds at most 32 x 3.6 MB = 115 MB over BERT-base's 12 layers (32/N of the bank's own memory, whatever the model).
A mixed batch of B distinct profiles needs B entries to be served from the cache on its next call; with fewer, each
call recomposes the missing ones, which reads the layer's whole bank per profile (0.8 ms per profile and layer on
BERT-base on the 2-core development machine, about 5% of the layer's share of an 8 x 32 forward). The last mixed
batch's stacked adapters, one per sample, are kept in addition (`_batch_cache`).
"""


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


def compose_lora(bank: Composed, weights_A: torch.Tensor, weights_B: torch.Tensor) -> Composed:
    """`A* = Σ_i wA_i A_i` and `B* = Σ_j wB_j B_j` over a LoRA bank (the paper's M_A over down projections and M_B
    over up projections; scalings are already folded into the `B_j`), so that `ΔW = B* A*`.

    Weights of shape `[N]` give one pair of factors; `[P, N]` give P pairs at once.
    """
    A, B = bank
    weights_A, weights_B = weights_A.to(A.dtype), weights_B.to(B.dtype)
    lead = weights_A.shape[:-1]
    return (weights_A @ A.flatten(1)).view(*lead, *A.shape[1:]), (weights_B @ B.flatten(1)).view(*lead, *B.shape[1:])


def lora_delta(x: torch.Tensor, composed: Composed) -> torch.Tensor:
    """`B* A* x` computed on the activations, `(x A*ᵀ) B*ᵀ`: never a `[out, in]` matrix on the forward path.

    `x: [..., T, in]`. One profile: `A*: [r, in]`, `B*: [out, r]`. Per-sample factors: a leading sample axis on both
    and `x: [S, T, in]`.
    """
    A, B = composed
    if A.dim() == 2:
        return F.linear(F.linear(x, A), B)
    return torch.bmm(torch.bmm(x, A.mT), B.mT)


def bottleneck_delta(h: torch.Tensor, composed: Composed, activation) -> torch.Tensor:
    """The bottleneck `B f(A h + a) + b` (DESIGN.md §2, "Adapter"), added to `h` by the caller (what `h` is depends
    on the placement; see [`pfeiffer_output`]).

    `h: [..., T, d]`. One adapter: `A: [r, d]`, `a: [r]`, `B: [d, r]`, `b: [d]`. Per-sample adapters: a leading
    sample axis on all four and `h: [S, T, d]`, computed as batched matmuls.
    """
    A, a, B, b = composed
    if A.dim() == 2:
        return F.linear(activation(F.linear(h, A, a)), B, b)
    # Per-sample adapters: batched matmuls with the biases fused in.
    z = torch.baddbmm(a.unsqueeze(1), h, A.mT)
    return torch.baddbmm(b.unsqueeze(1), activation(z), B.mT)


PFEIFFER_TARGET_MODULES = r".*\.layer\.\d+\.output"
"""The block output modules (`dense`, `dropout`, `LayerNorm`) of BERT, RoBERTa and DeBERTa-v2, not `attention.output`:
the default targets of `placement='pfeiffer'`."""


def pfeiffer_parts(module: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """`(dense, dropout, LayerNorm)` of a BERT-style block output module, whose forward is
    `LayerNorm(dropout(dense(x)) + r)` (transformers' BertOutput, RobertaOutput, DebertaV2Output); refuses others."""
    parts = tuple(getattr(module, name, None) for name in ("dense", "dropout", "LayerNorm"))
    if isinstance(parts[0], BaseTunerLayer):
        raise ValueError(
            "This X-PEFT profile has placement='pfeiffer', but the `dense` of the block output module is already "
            "adapted (by X-PEFT with placement='ffn_output', or another tuner). All X-PEFT profiles of a model share "
            "one placement: use the model's, or add the profile to a fresh model."
        )
    if not isinstance(parts[0], nn.Linear) or not all(isinstance(part, nn.Module) for part in parts):
        raise TypeError(
            f"X-PEFT's placement='pfeiffer' adapts a BERT-style block output module (with `dense`, `dropout` and "
            f"`LayerNorm`, called as `module(hidden_states, input_tensor)`, e.g. BertOutput), got a "
            f"{type(module).__name__}. Target those modules (`target_modules=r'{PFEIFFER_TARGET_MODULES}'` for BERT, "
            "RoBERTa and DeBERTa-v2, the default there), or use placement='ffn_output'."
        )
    return parts


def default_pfeiffer_targets(model_type: str | None) -> str:
    """[`PFEIFFER_TARGET_MODULES`] for the model types that have such output modules; refuses others."""
    if model_type not in ("bert", "roberta", "deberta-v2"):
        raise ValueError(
            f"X-PEFT's placement='pfeiffer' has no default `target_modules` for model_type {model_type!r} (defaults "
            "exist for bert, roberta and deberta-v2). Pass the BERT-style block output modules as `target_modules`, "
            "or use placement='ffn_output'."
        )
    return PFEIFFER_TARGET_MODULES


def check_one_placement(model: nn.Module, placement: str) -> None:
    """Refuse a profile whose placement differs from that of the model's X-PEFT layers (called when its targets
    match nothing: they lie inside, or around, the layers of the other placement)."""
    others = {m.placement for m in model.modules() if isinstance(m, XPeftLayer)} - {placement}
    if others:
        raise ValueError(
            f"This X-PEFT profile has placement={placement!r}, but the model's X-PEFT layers have "
            f"placement={others.pop()!r}; all profiles of a model share one placement. Use the model's, or add the "
            "profile to a fresh model."
        )


def adapted_features(base_layer: nn.Module, placement: str) -> tuple[int, int, bool]:
    """`(in_features, out_features, fan_in_fan_out)` of what an X-PEFT layer with `placement` adapts: the layer itself,
    or the `dense` projection of a Pfeiffer-placed output module."""
    if placement == "pfeiffer":
        return layer_features(pfeiffer_parts(base_layer)[0], "X-PEFT")
    return layer_features(base_layer, "X-PEFT")


def pfeiffer_output(module: nn.Module, x: torch.Tensor, residual: torch.Tensor, adapter) -> torch.Tensor:
    """AdapterHub's Pfeiffer adapter (`SeqBnConfig`: original_ln_before, original_ln_after, residual_before_ln=True,
    adapter_residual_before_ln=False, no adapter LayerNorms) on a BERT-style output module:

    `h = dropout(dense(x))`, `z = LN(h + r)` (the module's own output), `y = LN(h + Δ(z) + r)` with `Δ = adapter`.
    The module's LayerNorm is applied twice, as AdapterHub's `pre_forward` and `post_forward` do.
    """
    dense, dropout, norm = pfeiffer_parts(module)
    h = dropout(dense(x))
    z = norm(h + residual)
    return norm(h + adapter(z).to(h.dtype) + residual)


def composed_cache_size() -> int:
    """The current [`COMPOSED_CACHE_SIZE`], refused with the fix if it is not a non-negative int."""
    size = COMPOSED_CACHE_SIZE
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(
            f"xpeft.x_peft.layer.COMPOSED_CACHE_SIZE must be a non-negative int (composed adapters kept per X-PEFT "
            f"layer), got {size!r}; set it to e.g. 32, or to 0 to disable caching."
        )
    return size


class _BankState(NamedTuple):
    """What a cached adapter was composed from: the bank tensors' identities, storages and in-place versions.

    A data_ptr alone is not enough: after `model.half(); model.float()` a new bank can be allocated at the old address
    (CUDA's caching allocator readily does so) with rounded values. A weak reference to each tensor tells a new tensor
    at an old address apart without keeping an old bank alive.
    """

    refs: tuple[weakref.ref, ...]
    storage: tuple[tuple[int, int], ...]  # (data_ptr, _version) per part

    @staticmethod
    def of(bank: Composed) -> _BankState:
        return _BankState(tuple(weakref.ref(t) for t in bank), _BankState._storage(bank))

    @staticmethod
    def _storage(bank: Composed) -> tuple[tuple[int, int], ...]:
        # Inference tensors (e.g. a bank moved inside `torch.inference_mode()`) have no version counter.
        return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in bank)

    def matches(self, bank: Composed) -> bool:
        same_tensors = all(ref() is t for ref, t in zip(self.refs, bank, strict=True))
        return same_tensors and self.storage == _BankState._storage(bank)


class _CacheEntry(NamedTuple):
    mask_A: torch.Tensor  # exact copies of the logits the adapter was composed from
    mask_B: torch.Tensor
    bank: _BankState
    generation: int  # unique per layer and never reused: identifies this entry in `_batch_cache`'s key
    composed: Composed


class XPeftLayer(nn.Module, BaseTunerLayer):
    """X-PEFT (arXiv 2401.16137, https://arxiv.org/abs/2401.16137) on a linear layer, over the bank's kind.

    With `h = W x + c` the output of the wrapped layer and mixing weights `w^A = softmax(S_A)`, `w^B = softmax(S_B)`
    (soft masks) or the top-k of `S_A`, `S_B` divided by k (hard masks, straight-through):

    - **bottleneck bank** of N adapters `(A_i, a_i, B_i, b_i)`, on a feed-forward output projection:
      :math:`y = h + B^* f(A^* h + a^*) + b^*`, `A^* = Σ_i w^A_i A_i` (and `a^*`), `B^* = Σ_j w^B_j B_j` (and `b^*`).
      With `placement='ffn_output'` (default) h is the raw output of the targeted projection (for BERT `output.dense`,
      before the dropout, residual and LayerNorm). With `placement='pfeiffer'` the layer wraps a BERT-style block
      output module and follows AdapterHub's Pfeiffer data flow, `y = LN(h + Δ(LN(h + r)) + r)` (see
      [`pfeiffer_output`]). Not mergeable: `f` is nonlinear, so no weight `W'` gives the same output.
    - **LoRA bank** of N factor pairs `(A_i, B_i)` (scalings folded into `B_i`), on any linear layer the adapters
      targeted: :math:`y = h + B^* A^* x`, `A^* = Σ_i w^A_i A_i`, `B^* = Σ_j w^B_j B_j`, computed as `(x A*ᵀ) B*ᵀ`.
      Linear in x, so profiles merge: `W' = W + B^* A^*` (transposed for GPT-2's Conv1D).

    Only the mask logits `S_A, S_B ∈ R^N` of each profile are trainable; the bank lives once on the tuner model
    (`XPeftModel.xpeft_bank`) and this layer reads its own slice by layer name.
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
        # Logits each merged profile was merged with, so that unmerge subtracts exactly what merge added.
        self._merged_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.placement = config.placement
        if self.placement == "pfeiffer" and bank.kind != "bottleneck":
            raise ValueError(
                f"placement='pfeiffer' places a bottleneck adapter; this model's bank is a {bank.kind} bank, whose "
                "factors act on the layers their adapters were trained on. Use placement='ffn_output' (the default) "
                "with a LoRA bank."
            )
        self.in_features, self.out_features, self.fan_in_fan_out = adapted_features(base_layer, self.placement)
        # A plain reference, not a submodule: the bank is registered once, on the tuner model.
        self.__dict__["xpeft_bank"] = bank
        self.layer_name = layer_name
        self._reset_caches()
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config, init_logits: torch.Tensor | None = None) -> None:
        """Add profile `adapter_name`; `init_logits` `[2, N]` (S_A, S_B) sets its masks, e.g. from a profile store."""
        if config.placement != self.placement:
            # The placement decides which module this layer wraps, so all profiles of a layer share it.
            raise ValueError(
                f"Layer {self.layer_name!r} holds X-PEFT profiles with placement={self.placement!r}; a profile with "
                f"placement={config.placement!r} cannot share it. Use placement={self.placement!r}, or a fresh model."
            )
        base = self.get_base_layer()
        weight = (pfeiffer_parts(base)[0] if self.placement == "pfeiffer" else base).weight
        self.xpeft_bank.ensure_layer(self.layer_name, self.out_features, weight.device, self.in_features)
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
        with self._cache_lock:
            self._composed_cache.pop(adapter_name, None)
            self._batch_cache = None
        super().delete_adapter(adapter_name)

    # -- composition with caching ----------------------------------------------------------------------------
    #
    # Many threads may serve one model at once, so every read-modify-write of the caches holds `_cache_lock`; the
    # composing and stacking themselves run outside it. An entry is only ever returned for the profile name it was
    # stored under, after its mask copies and bank state are checked against the profile's current ones.

    def _reset_caches(self) -> None:
        self._cache_lock = threading.Lock()
        # name -> _CacheEntry, least recently used first; bounded by COMPOSED_CACHE_SIZE.
        self._composed_cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._generations = 0
        # (key, stacked per-sample adapters) of the last mixed batch; see `_batched`.
        self._batch_cache: tuple[tuple, Composed] | None = None

    def __getstate__(self) -> dict:
        # A lock cannot be copied or pickled, and cached tensors are not worth saving: a copy starts with empty caches.
        state = super().__getstate__()
        for key in ("_cache_lock", "_composed_cache", "_generations", "_batch_cache"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._reset_caches()

    def _cache_hit(self, entry: _CacheEntry, mask_A: torch.Tensor, mask_B: torch.Tensor, bank: Composed) -> bool:
        # Keyed on a copy of the 2·N logits themselves, compared exactly: writes through `param.data` (or any other
        # path that does not bump `_version`) change the values and so miss. The bank state changes on a move or
        # cast of the bank (see `_BankState`).
        if entry.mask_A.device != mask_A.device or entry.mask_A.dtype != mask_A.dtype or not entry.bank.matches(bank):
            return False
        return torch.equal(entry.mask_A, mask_A) and torch.equal(entry.mask_B, mask_B)

    def _trim(self, size: int) -> None:
        """Evict least recently used entries down to `size` (the caller holds `_cache_lock`)."""
        while len(self._composed_cache) > size:
            self._composed_cache.popitem(last=False)
        if size == 0:
            self._batch_cache = None

    def _composed_entry(self, name: str) -> tuple[int | None, Composed]:
        """`(generation, composed adapter)` of profile `name`; generation None when the result is not cached."""
        # Read through `_parameters` directly: this runs once per profile per layer on every mixed-batch call.
        mask_A, mask_B = self.xpeft_mask_A._parameters[name], self.xpeft_mask_B._parameters[name]
        mask_type, k = self.xpeft_mask_type[name], self.xpeft_hard_k[name]
        bank = self.xpeft_bank.layer(self.layer_name)
        if torch.compiler.is_compiling():
            # Under torch.compile the composition is part of the compiled graph (cheap, fused); the cache's lock and
            # identity checks would each be a graph break.
            return None, compose_adapter(bank, mask_weights(mask_A, mask_type, k), mask_weights(mask_B, mask_type, k))
        size = composed_cache_size()
        if size == 0 or (torch.is_grad_enabled() and (mask_A.requires_grad or mask_B.requires_grad)):
            with self._cache_lock:
                self._trim(size)
            return None, self._compose(bank, mask_weights(mask_A, mask_type, k), mask_weights(mask_B, mask_type, k))
        with self._cache_lock:
            entry = self._composed_cache.get(name)
            if entry is not None and self._cache_hit(entry, mask_A, mask_B, bank):
                self._composed_cache.move_to_end(name)
                self._trim(size)
                return entry.generation, entry.composed
        if torch.is_inference_mode_enabled():
            # An inference tensor cannot be saved for a later backward, so a result composed here is not kept.
            return None, self._compose(bank, mask_weights(mask_A, mask_type, k), mask_weights(mask_B, mask_type, k))
        # Composed from the copies, not the live parameters, so that the entry's key is exactly what it was composed
        # from even if another thread writes the masks meanwhile. The values (and so the bits) are the same.
        saved_A, saved_B = mask_A.detach().clone(), mask_B.detach().clone()
        state = _BankState.of(bank)
        result = self._compose(bank, mask_weights(saved_A, mask_type, k), mask_weights(saved_B, mask_type, k))
        with self._cache_lock:
            # A profile deleted (or replaced) while it was being composed gets no entry: it would never be used again.
            current = self.xpeft_mask_A._parameters.get(name), self.xpeft_mask_B._parameters.get(name)
            if current[0] is not mask_A or current[1] is not mask_B:
                return None, result
            self._generations += 1
            self._composed_cache[name] = _CacheEntry(saved_A, saved_B, state, self._generations, result)
            self._composed_cache.move_to_end(name)
            self._trim(size)
            return self._generations, result

    def _compose(self, bank: Composed, weights_A: torch.Tensor, weights_B: torch.Tensor) -> Composed:
        compose = compose_lora if self.xpeft_bank.kind == "lora" else compose_adapter
        return compose(bank, weights_A, weights_B)

    def composed(self, name: str) -> Composed:
        """The composed adapter (`(A*, a*, B*, b*)`, or `(A*, B*)` over a LoRA bank) of profile `name`, cached while
        its masks and the bank are unchanged.

        The cache keeps the [`COMPOSED_CACHE_SIZE`] most recently used profiles; it is bypassed while the masks are
        trained (their gradient needs the graph).
        """
        return self._composed_entry(name)[1]

    def _batched(self, adapter_names: Sequence[str]) -> Composed:
        """Per-sample composed adapters `[S, ...]`; `"__base__"` samples get a zero adapter (an exact no-op)."""
        unique = [name for name in dict.fromkeys(adapter_names) if name != BASE_ADAPTER_NAME]
        # Each profile is composed (or found) once; a batch with more profiles than the cache holds still gets every
        # one, the earlier ones just are not kept for the next call.
        entries = [self._composed_entry(name) for name in unique]
        generations, table = tuple(g for g, _ in entries), [c for _, c in entries]
        bank = self.xpeft_bank.layer(self.layer_name)
        # A generation names one cache entry for good, so equal generations mean the very adapters stacked last time.
        # The zero adapter of "__base__" samples depends only on the bank's dtype and device.
        key = (tuple(adapter_names), generations, tuple((t.dtype, t.device) for t in bank))
        # With grad on, the entry would keep the autograd graph alive and never hit.
        cacheable = not torch.is_grad_enabled() and None not in generations and composed_cache_size() > 0
        if cacheable:
            with self._cache_lock:
                cached = self._batch_cache
            if cached is not None and cached[0] == key:
                return cached[1]
        if table:
            zero = tuple(torch.zeros_like(part) for part in table[0])
        else:  # only "__base__" samples: shapes come from the bank
            zero = tuple(part.new_zeros(part.shape[1:]) for part in bank)
        slot = {name: i for i, name in enumerate(unique)}
        index = torch.tensor([slot.get(name, len(unique)) for name in adapter_names], device=zero[0].device)
        result = tuple(torch.stack(parts)[index] for parts in zip(*table, zero, strict=True))
        if cacheable:
            with self._cache_lock:
                self._batch_cache = (key, result)
        return result

    # -- forward -----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # One name per leading row of x, as in the other tuners' layers (see `check_mixed_batch_args`).
        adapter_names = check_mixed_batch_args(self, x, kwargs.pop("adapter_names", None))
        if self.placement == "pfeiffer":
            return self._pfeiffer_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, result, adapter_names)
        if self.merged:  # only a LoRA bank's profiles merge; they are in the base weight
            return result
        for name in self.active_adapters:
            if name not in self.xpeft_mask_A:
                continue
            result = result + self._delta(x, result, self.composed(name)).to(result.dtype)
        return result

    def _delta(self, x: torch.Tensor, result: torch.Tensor, composed: Composed) -> torch.Tensor:
        """What the composed adapter adds to the output: `B* A* x` (LoRA bank) or `B* f(A* h + a*) + b*`."""
        if self.xpeft_bank.kind == "lora":
            return lora_delta(self._cast_input_dtype(x, composed[0].dtype), composed)
        activation = ACTIVATIONS[self.xpeft_bank.non_linearity]
        return bottleneck_delta(self._cast_input_dtype(result, composed[0].dtype), composed, activation)

    def _mixed_batch_delta(self, x: torch.Tensor, result: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        composed = self._batched(adapter_names)
        # One sample per leading row group: [S, T, features] (OPT's flattened [S*T, features] rows are contiguous per
        # sample).
        samples = len(adapter_names)
        x = None if x is None else x.reshape(samples, -1, x.shape[-1])  # None: a bottleneck reads only `result`
        delta = self._delta(x, result.reshape(samples, -1, result.shape[-1]), composed)
        return delta.reshape(result.shape).to(result.dtype)

    def _mixed_batch_forward(
        self, x: torch.Tensor, result: torch.Tensor, adapter_names: Sequence[str]
    ) -> torch.Tensor:
        return result + self._mixed_batch_delta(x, result, adapter_names)

    def _pfeiffer_forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str] | None, **kwargs) -> torch.Tensor:
        """[`pfeiffer_output`] of the wrapped output module. Each active profile's adapter reads the same `z`; their
        outputs are summed."""
        residual = args[0] if args else kwargs.pop("input_tensor")
        if self.disable_adapters:
            return self.base_layer(x, residual)
        if adapter_names is not None:
            adapter = partial(self._mixed_batch_delta, None, adapter_names=adapter_names)
        else:
            active = [name for name in self.active_adapters if name in self.xpeft_mask_A]
            if not active:
                return self.base_layer(x, residual)
            adapter = partial(self._active_delta, active)
        return pfeiffer_output(self.base_layer, x, residual, adapter)

    def _active_delta(self, names: Sequence[str], z: torch.Tensor) -> torch.Tensor:
        return sum(self._delta(None, z, self.composed(name)) for name in names)

    # -- merging (LoRA banks only) -----------------------------------------------------------------------------

    def delta_weight(
        self, logits_A: torch.Tensor, logits_B: torch.Tensor, mask_type: str, hard_k: int
    ) -> torch.Tensor:
        """`ΔW = B* A*` (float32) of the masks `logits_A`, `logits_B` over this layer's LoRA bank, shaped as the base
        weight stores it: `[out, in]`, or `[in, out]` for GPT-2's Conv1D."""
        bank = tuple(t.float() for t in self.xpeft_bank.layer(self.layer_name))
        A_star, B_star = compose_lora(
            bank, mask_weights(logits_A, mask_type, hard_k), mask_weights(logits_B, mask_type, hard_k)
        )
        return weight_as_out_in(B_star @ A_star, self.fan_in_fan_out)

    def _add_to_weight(self, delta: torch.Tensor, safe_merge: bool, name: str) -> None:
        weight = self.get_base_layer().weight
        # In float32 whatever the weight's dtype (half-precision matmuls and sums are slow or lossy on CPU).
        updated = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
        if safe_merge and not torch.isfinite(updated).all():
            raise ValueError(
                f"Merging X-PEFT profile {name!r} into layer {self.layer_name!r} gives non-finite weights; the base "
                "weights are left unchanged. Check the profile's mask logits and the bank for inf/NaN."
            )
        weight.data = updated

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add `ΔW = B* A*` of each profile to the base weight (LoRA banks); refused for bottleneck banks."""
        if self.xpeft_bank.kind != "lora":
            raise ValueError(
                f"X-PEFT adapters cannot be merged into the base weights: {UNMERGEABLE_REASON} Keep the model unmerged "
                "(it runs as is), or use `model.unload()` to get the base model back."
            )
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.xpeft_mask_A:
                continue
            logits = self.xpeft_mask_A[name].detach().clone(), self.xpeft_mask_B[name].detach().clone()
            delta = self.delta_weight(*logits, self.xpeft_mask_type[name], self.xpeft_hard_k[name])
            self._add_to_weight(delta, safe_merge, name)
            self._merged_logits[name] = logits
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract, last merged first, the `ΔW` each merged profile added, recomputed from the logits it was merged
        with (so edits to the masks while merged do not change what is subtracted)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            logits = self._merged_logits.pop(name)
            delta = self.delta_weight(*logits, self.xpeft_mask_type[name], self.xpeft_hard_k[name])
            self._add_to_weight(-delta, False, name)
