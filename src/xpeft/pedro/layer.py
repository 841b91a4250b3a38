"""PEDRO layers: a wrapped q, v or FFN-up projection whose output is scaled by prompt-conditioned vectors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..tuners_utils import adapter_index_groups, check_mixed_batch_args, layer_features
from .config import PedroConfig
from .generator import VectorGenerator, pedro_vectors

UNMERGEABLE_REASON = "PEDRO's vectors are computed from each prompt at run time, so no fixed weight reproduces them."


@dataclass
class PedroCallState:
    """What the current model call tells the PEDRO layers, set by [`PedroModel`]'s hook on the transformers model.

    `step` changes at every model forward that computes vectors; `reuse` is True for a forward that continues the
    previous one (a decode step of `generate`, or any forward continuing a KV cache), which only broadcasts the vectors
    cached at the computing forward. `cache_ref` returns the KV cache that the latest computing forward produced (or
    None), so that a continuing forward can check that its cache belongs to the vectors PEDRO holds.
    """

    step: int = 0
    in_forward: bool = False
    reuse: bool = False
    prompt_mask: torch.Tensor | None = None
    in_peft_call: bool = False
    computed_in_call: bool = False
    cache_ref: Callable[[], Any] | None = None

    def prompt_mask_for(self, hidden: torch.Tensor) -> torch.Tensor | None:
        matches = self.prompt_mask is not None and hidden.dim() == 3 and self.prompt_mask.shape == hidden.shape[:2]
        if not self.in_forward:
            # A block run outside a model forward: activation checkpointing recomputing the last forward during
            # backward (same shape: same prompt), or a direct call (the whole input is the prompt).
            return self.prompt_mask if matches else None
        if self.prompt_mask is None:
            return None
        if not matches:
            raise ValueError(
                f"PEDRO's prompt mask has shape {tuple(self.prompt_mask.shape)} but the block input has shape "
                f"{tuple(hidden.shape)}; pass `prompt_mask` with one entry per input token ([batch, seq_len])."
            )
        return self.prompt_mask


@dataclass
class PedroBlock:
    """Per transformer block: the latest codes `z` of each adapter, as `(step, sample indices or None, z)`."""

    codes: dict[str, tuple[int, torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)


def expand_segments(scale: torch.Tensor, segments: Sequence[tuple[int, int]], out_features: int) -> torch.Tensor:
    """Place `scale` `[B, Σ segment sizes]` on the scaled output features; the others get a factor 1.

    Only GPT-2's fused projection has unscaled features (its keys); every other projection is one full segment.
    """
    if segments == ((0, out_features),):
        return scale
    pieces, start, offset = [], 0, 0
    for low, high in segments:
        pieces.append(scale.new_ones(scale.shape[0], low - start))
        pieces.append(scale[:, offset : offset + high - low])
        start, offset = high, offset + high - low
    pieces.append(scale.new_ones(scale.shape[0], out_features - start))
    return torch.cat(pieces, dim=1)


def scale_output(result: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`y ← l ⊙ y` (DESIGN.md §3) with one vector `l` per sample (`scale` `[B, out]`), broadcast over the tokens.

    Inputs flattened to `[B*T, out]` (OPT's FFN) are viewed as `[B, T, out]` for the broadcast.
    """
    batch, out_features = scale.shape
    if result.dim() == 2:
        return (result.view(batch, -1, out_features) * scale[:, None, :]).view(result.shape)
    return result * scale.view(batch, *([1] * (result.dim() - 2)), out_features)


class PedroLayer(nn.Module, BaseTunerLayer):
    """A projection `y = W x` of a transformer block, scaled as `y ← l ⊙ y` by prompt-conditioned vectors.

    PEDRO (arXiv 2409.17834; DESIGN.md §3): per block a vector generator pools the block input over the
    prompt tokens, `z = act(down(pool(h_prompt)))`, and `up` maps `z` to `[l_q, l_v, l_u] = 1 + up(z)`; then
    :math:`Q \\leftarrow l_q \\odot Q`, :math:`V \\leftarrow l_v \\odot V`, :math:`U \\leftarrow l_u \\odot U`. The
    generator reads the input of the block's query (or value) projection, i.e. the normalised block input; it lives in
    one layer of the block (`pedro_generator`), and each scaled projection holds its own rows of `up` (`pedro_up`).
    The vectors are computed once per prompt and broadcast at every decode step. They depend on the prompt, so PEDRO
    cannot be merged into the weights.
    """

    adapter_layer_names = ("pedro_generator", "pedro_up")
    other_param_names = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: PedroConfig,
        role: str,
        owns_generator: bool,
        block: PedroBlock,
        call: PedroCallState,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.pedro_generator = nn.ModuleDict({})
        self.pedro_up = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer, "PEDRO")
        self.role = role
        if role == "qv":
            # GPT-2's c_attn outputs [query | key | value]: scale the query and value thirds only.
            third = self.out_features // 3
            self.segments = ((0, third), (2 * third, 3 * third))
        else:
            self.segments = ((0, self.out_features),)
        self._block = block
        self._call = call
        self._cache: tuple[tuple, int, torch.Tensor | None] | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, owns_generator)

    def update_layer(self, adapter_name: str, config: PedroConfig, owns_generator: bool) -> None:
        if owns_generator:
            generator = VectorGenerator(self.in_features, config.vg_rank, config.pooler, config.activation)
            self.pedro_generator[adapter_name] = generator
        up = nn.Linear(config.vg_rank, sum(high - low for low, high in self.segments))
        if config.init_weights:
            # Identity init (DESIGN.md §3): up = 0, so l = 1 and the model equals the base model.
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.pedro_up[adapter_name] = up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._block.codes.pop(adapter_name, None)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"PEDRO adapters cannot be merged into the base weights: {UNMERGEABLE_REASON} Keep the model unmerged (it "
            "runs as is), or use `model.unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        # Nothing can be merged (see `merge`), so there is nothing to restore.
        return

    # -- forward -------------------------------------------------------------------------------------------------

    def _block_codes(self, hidden: torch.Tensor, adapter_names: Sequence[str] | None, adapters: Sequence[str]):
        """The codes `z` of this block for the current step: `{adapter: (sample indices or None, z)}`.

        The layer that holds an adapter's generator (the query projection if targeted, else the value one: both read
        the normalised block input, and run first in every supported block) computes its codes; the block's other
        projections read them. A checkpointed block recomputed outside the model forward does the same.
        """
        block, call = self._block, self._call
        owned = [name for name in adapters if name in self.pedro_generator]
        if owned:
            mask = call.prompt_mask_for(hidden)
            if adapter_names is None:
                for name in owned:
                    block.codes[name] = (call.step, None, self.pedro_generator[name](hidden, mask))
            else:
                groups = adapter_index_groups(adapter_names, hidden.device)
                for name in owned:
                    index = groups[name]
                    sub_mask = None if mask is None else mask[index]
                    block.codes[name] = (call.step, index, self.pedro_generator[name](hidden[index], sub_mask))
        codes = {}
        for name in adapters:
            entry = block.codes.get(name)
            if entry is None or (call.in_forward and entry[0] != call.step):
                raise RuntimeError(
                    f"PEDRO's projection {self.role!r} ran before the block's vector generator for adapter {name!r}; "
                    "the generator sits in the block's query projection (or value projection when the query one is "
                    "not targeted), which must run first: keep it in `target_modules`."
                )
            codes[name] = entry[1:]
        return codes

    def _scales(self, codes, adapters: Sequence[str], batch: int) -> torch.Tensor:
        """`[B, Σ segments]` product of `1 + up(z)` over the adapters each sample uses (1 where none applies)."""
        scale = None
        for name in adapters:
            index, code = codes[name]
            vectors = pedro_vectors(code, self.pedro_up[name])
            if index is not None:
                full = vectors.new_ones(batch, vectors.shape[1])
                vectors = full.index_copy(0, index, vectors)
            scale = vectors if scale is None else scale * vectors
        return scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        check_mixed_batch_args(self, x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if adapter_names is not None:
            key = tuple(adapter_names)
        else:
            key = ("__active__", *self.active_adapters)
        if self._call.reuse and self._call.in_forward:
            # Decode step: broadcast the vectors of the prefill, no generator work.
            scale = self._cached_scale(key)
        else:
            scale = self._compute_scale(x, adapter_names)
            if scale is not None:
                scale = expand_segments(scale, self.segments, self.out_features)
            # Decode steps only broadcast these vectors; they are constants there, hence detached.
            self._cache = (key, self._call.step, None if scale is None else scale.detach())
        if scale is None:
            return result  # no adapter of this call scales this projection
        return scale_output(result, scale.to(result.dtype))

    def _compute_scale(self, x: torch.Tensor, adapter_names: Sequence[str] | None) -> torch.Tensor | None:
        if adapter_names is not None:
            adapters = [name for name in dict.fromkeys(adapter_names) if name in self.pedro_up]
        else:
            adapters = [name for name in self.active_adapters if name in self.pedro_up]
        if not adapters:
            return None
        codes = self._block_codes(x, adapter_names, adapters)
        if adapter_names is not None:
            batch = len(adapter_names)
        else:  # x may be flattened to [B*T, d] (OPT's FFN); the codes have one row per sample
            batch = next(iter(codes.values()))[1].shape[0]
        return self._scales(codes, adapters, batch)

    def _cached_scale(self, key: tuple) -> torch.Tensor | None:
        if self._cache is None or self._cache[:2] != (key, self._call.step):
            raise ValueError(
                "This forward continues a KV cache, but PEDRO has no vectors for it: the vectors are computed at the "
                "forward that starts the cache (the prefill), with the same adapters. Run the prompt through this "
                "PEDRO model first, or call `generate`, which does it."
            )
        return self._cache[2]

    def __repr__(self) -> str:
        return "pedro." + super().__repr__()
