"""PEDRO layers: a wrapped q, v or FFN-up projection whose output is scaled by prompt-conditioned vectors."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..tuners_utils import adapter_index_groups, check_mixed_batch_args, layer_features
from .config import PedroConfig
from .generator import VectorGenerator, pedro_vectors

UNMERGEABLE_REASON = "PEDRO's vectors are computed from each prompt at run time, so no fixed weight reproduces them."


@dataclass
class PedroForward:
    """What one model forward tells its PEDRO layers; it lives in the context variable [`CURRENT_FORWARD`] while the
    forward (or its activation-checkpointing recompute) runs, never on the model.

    - `prompt_mask` `[B, T]`: the prompt positions the generators pool (None: every position is prompt);
    - `reused`: the vectors of an earlier forward when this one continues it (a decode step of `generate`, or a
      forward continuing a KV cache), else None;
    - `vectors`: what this forward computes, per layer `(adapter key, [B, out] scale or None)`, kept with the call
      (`generate`) and with the KV cache it returns, so that continuing either reuses them;
    - `codes`: per block, the codes `z` of each adapter, written by the block's generator layer and read by its other
      scaled projections during the same block run;
    - `block_inputs`: per block, its input hidden states `[B, T, d]` while it runs, for generators that pool the
      block input (`generator_input="block"`); dropped when the block returns;
    - `recomputing`: True while activation checkpointing recomputes a block during backward.
    """

    prompt_mask: torch.Tensor | None = None
    reused: dict | None = None
    vectors: dict = field(default_factory=dict)
    codes: dict = field(default_factory=dict)
    block_inputs: dict = field(default_factory=dict)
    recomputing: bool = False


# Key of [`PedroForward.block_inputs`] during the recompute of a checkpointed block, which runs one block only.
RECOMPUTED_BLOCK = "recomputed block"

CURRENT_FORWARD: ContextVar[PedroForward | None] = ContextVar("pedro_forward", default=None)


@dataclass(eq=False)
class PedroBlock:
    """Identity of one transformer block; the key of its codes in [`PedroForward.codes`]. `reads_input`: an adapter
    of the block pools the block input, which its forward pre-hook then keeps in [`PedroForward.block_inputs`]."""

    key: str
    reads_input: bool = False


def standalone_forward() -> PedroForward:
    """The state of a block (or projection) run outside any model forward: it pools its whole input. During backward
    that would be a recompute of a forward whose prompt is lost (activation checkpointing other than transformers'
    own), which must not silently pool the wrong tokens."""
    if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
        raise RuntimeError(
            "A PEDRO layer is being recomputed during backward without the state of its forward, so it cannot know "
            "that forward's prompt: this happens with activation checkpointing other than transformers' own. Use "
            "`model.gradient_checkpointing_enable()` (transformers' checkpointing, which PEDRO supports), or "
            "checkpoint without PEDRO layers inside."
        )
    return PedroForward()


def _block_prompt_mask(prompt_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
    """The forward's prompt mask, checked against the block input `[B, T, d]` it is applied to."""
    if prompt_mask is None:
        return None
    if hidden.dim() != 3 or prompt_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"PEDRO's prompt mask has shape {tuple(prompt_mask.shape)} but the block input has shape "
            f"{tuple(hidden.shape)}; pass `prompt_mask` with one entry per input token ([batch, seq_len])."
        )
    return prompt_mask


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
    other_param_names = ("pedro_generator_input",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: PedroConfig,
        role: str,
        owns_generator: bool,
        block: PedroBlock,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.pedro_generator = nn.ModuleDict({})
        self.pedro_up = nn.ModuleDict({})
        self.pedro_generator_input: dict[str, str] = {}
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
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, owns_generator)

    def update_layer(self, adapter_name: str, config: PedroConfig, owns_generator: bool) -> None:
        if owns_generator:
            generator = VectorGenerator(
                self.in_features, config.vg_rank, config.pooler, config.activation, config.rational_degrees
            )
            self.pedro_generator[adapter_name] = generator
            self.pedro_generator_input[adapter_name] = config.generator_input
            if config.generator_input == "block":
                self._block.reads_input = True
        up = nn.Linear(config.vg_rank, sum(high - low for low, high in self.segments))
        if config.init_weights:
            # Identity init (DESIGN.md §3): up = 0, so l = 1 and the model equals the base model.
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.pedro_up[adapter_name] = up
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            f"PEDRO adapters cannot be merged into the base weights: {UNMERGEABLE_REASON} Keep the model unmerged (it "
            "runs as is), or use `model.unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        # Nothing can be merged (see `merge`), so there is nothing to restore.
        return

    # -- forward -------------------------------------------------------------------------------------------------

    def _block_codes(
        self, forward: PedroForward, hidden: torch.Tensor, adapter_names: Sequence[str] | None, adapters: Sequence[str]
    ):
        """The codes `z` of this block in this forward: `{adapter: (sample indices or None, z)}`.

        The layer that holds an adapter's generator (the query projection if targeted, else the value one: both read
        the normalised block input, and run first in every supported block) computes its codes; the block's other
        projections read them from the same forward's state.
        """
        codes = forward.codes.setdefault(self._block, {})
        owned = [name for name in adapters if name in self.pedro_generator]
        if owned:
            mask = _block_prompt_mask(forward.prompt_mask, hidden)
            groups = None if adapter_names is None else adapter_index_groups(adapter_names, hidden.device)
            for name in owned:
                source = hidden if self.pedro_generator_input[name] == "normalized" else self._block_input(forward)
                if groups is None:
                    codes[name] = (None, self.pedro_generator[name](source, mask))
                else:
                    index = groups[name]
                    sub_mask = None if mask is None else mask[index]
                    codes[name] = (index, self.pedro_generator[name](source[index], sub_mask))
        missing = [name for name in adapters if name not in codes]
        if missing:
            raise RuntimeError(
                f"PEDRO's projection {self.role!r} ran before the block's vector generator for adapter {missing[0]!r}; "
                "the generator sits in the block's query projection (or value projection when the query one is "
                "not targeted), which must run first in the same model forward: keep it in `target_modules`, and "
                "call the model rather than a single projection."
            )
        return codes

    def _block_input(self, forward: PedroForward) -> torch.Tensor:
        hidden = forward.block_inputs.get(RECOMPUTED_BLOCK if forward.recomputing else self._block)
        if hidden is None:
            raise RuntimeError(
                f"PEDRO's generator in {self._block.key!r} pools the block input (`generator_input='block'`), but this "
                "projection ran outside a call of its block, so that input is unknown; call the block or the model."
            )
        return hidden

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
        scale = self._call_scale(x, adapter_names)
        if scale is None:
            return result  # no adapter of this call scales this projection
        return scale_output(result, scale.to(result.dtype))

    # The per-call state lives in a context variable and in dicts keyed by layer: under torch.compile this is one
    # graph break per layer, run eagerly, instead of guards on per-call objects that would recompile every call.
    @torch.compiler.disable
    def _call_scale(self, x: torch.Tensor, adapter_names: Sequence[str] | None) -> torch.Tensor | None:
        """This call's `[B, out]` scale of this projection: computed from the prompt, or reused from the forward that
        started the KV cache (or the `generate` call); None if no adapter of the call scales it."""
        key = tuple(adapter_names) if adapter_names is not None else ("__active__", *self.active_adapters)
        forward = CURRENT_FORWARD.get()
        if forward is None:
            forward = standalone_forward()
        if forward.reused is not None:
            # Decode step or cache continuation: broadcast the vectors of the prompt's forward, no generator work.
            return self._reused_scale(forward.reused, key, x)
        scale = self._compute_scale(forward, x, adapter_names)
        if scale is not None:
            scale = expand_segments(scale, self.segments, self.out_features)
        if not forward.recomputing:
            # Later forwards only broadcast these vectors; they are constants there, hence detached.
            forward.vectors[self] = (key, None if scale is None else scale.detach())
        return scale

    def _compute_scale(
        self, forward: PedroForward, x: torch.Tensor, adapter_names: Sequence[str] | None
    ) -> torch.Tensor | None:
        if adapter_names is not None:
            adapters = [name for name in dict.fromkeys(adapter_names) if name in self.pedro_up]
        else:
            adapters = [name for name in self.active_adapters if name in self.pedro_up]
        if not adapters:
            return None
        codes = self._block_codes(forward, x, adapter_names, adapters)
        if adapter_names is not None:
            batch = len(adapter_names)
        else:  # x may be flattened to [B*T, d] (OPT's FFN); the codes have one row per sample
            batch = next(iter(codes.values()))[1].shape[0]
        return self._scales(codes, adapters, batch)

    def _reused_scale(self, reused: dict, key: tuple, x: torch.Tensor) -> torch.Tensor | None:
        entry = reused.get(self)
        if entry is None or entry[0] != key:
            raise ValueError(
                "This forward continues a KV cache (or an earlier forward of the same `generate` call), but PEDRO has "
                "no vectors for it with these adapters: the vectors are computed at the forward that starts the cache "
                "(the prefill) and travel with the cache it returns. Continue a cache that this PEDRO model started, "
                "with the same adapters (and `adapter_names`) as its prefill, or run the prompt again."
            )
        scale = entry[1]
        # One vector per sample: a 3-d input has one row per sample, a flattened [B*T, d] one (OPT) B*T rows.
        if scale is not None and not (len(x) == len(scale) or (x.dim() == 2 and len(x) % len(scale) == 0)):
            raise ValueError(
                f"This forward continues a KV cache whose prompt had {len(scale)} samples, but it has {len(x)} rows; "
                "continue each cache with the batch that started it."
            )
        return scale

    def __repr__(self) -> str:
        return "pedro." + super().__repr__()
