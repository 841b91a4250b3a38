"""PEDRO tuner model: target resolution per architecture, and the per-call prompt boundary (DESIGN.md §3)."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from ..tuners_utils import XpeftTuner, layer_features, refuse_data_parallel
from .config import PEDRO_ROLES, PedroConfig
from .generator import prompt_mask_from_labels, prompt_mask_from_lengths
from .layer import CURRENT_FORWARD, UNMERGEABLE_REASON, PedroBlock, PedroForward, PedroLayer, standalone_forward

_BLOCK_KEY = re.compile(r"^(.*?\.\d+)\.")
# The KV cache's argument and output field: transformers 5.24 renamed `past_key_values` to `cache` (the old name still
# works until 5.40, with a deprecation warning); a forward may use either.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_length(kv_cache: Any) -> int:
    if kv_cache is None:
        return 0
    if hasattr(kv_cache, "get_seq_length"):
        return int(kv_cache.get_seq_length())
    return int(kv_cache[0][0].shape[-2])  # legacy tuple of (key, value) per layer


def _input_cache(arguments: dict[str, Any]) -> Any:
    """The KV cache a model forward continues, under whichever name the caller passed it, or None."""
    return next((arguments[name] for name in _CACHE_NAMES if arguments.get(name) is not None), None)


def labels_mark_prompt(model: nn.Module) -> bool:
    """Whether `model`'s token-level `labels` mark the prompt (`-100` before the first supervised token).

    True only for decoder-only causal LMs (`model.can_generate()` and not encoder-decoder). Decided from the transformers
    model itself rather than peft's `task_type`, which users may leave unset or set loosely. Token classification also
    takes `[B, T]` labels, but there `-100` marks unlabelled tokens ([CLS], sub-words), not a prompt.
    """
    can_generate = getattr(model, "can_generate", None)
    is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return bool(callable(can_generate) and can_generate() and not is_encoder_decoder)


def prompt_mask_for_call(
    arguments: dict[str, Any], prompt_mask=None, prompt_lengths=None, use_labels: bool = True
) -> torch.Tensor | None:
    """The prompt positions `[B, T]` of one model call, or None when every position is prompt.

    Priority: an explicit `prompt_mask`, then `prompt_lengths`, then token-level `labels` (prompt = `-100` before the
    first supervised token; only when `use_labels`, i.e. for causal LMs, see `labels_mark_prompt`), then the
    `attention_mask` alone (the whole non-padding input is the prompt). Padding (`attention_mask == 0`) is never prompt.
    """
    attention_mask = arguments.get("attention_mask")
    reference = arguments.get("input_ids")
    if reference is None and arguments.get("inputs_embeds") is not None:
        reference = arguments["inputs_embeds"][..., 0]
    if attention_mask is None and reference is not None:
        attention_mask = torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
    if attention_mask is not None and attention_mask.dim() != 2:
        attention_mask = None  # a 4-d custom mask carries no padding information we can use
    if prompt_mask is not None:
        return _checked_prompt_mask(prompt_mask, attention_mask)
    if prompt_lengths is not None:
        return _prompt_mask_of_lengths(prompt_lengths, attention_mask)
    labels = arguments.get("labels") if use_labels else None
    if labels is not None and reference is not None and labels.shape == reference.shape[:2]:
        mask = prompt_mask_from_labels(labels, attention_mask)
        if not mask.any(dim=1).all():
            warnings.warn(
                "PEDRO found samples whose labels supervise from the first token, so they have no prompt tokens and "
                "their vectors come from an empty (zero) prompt. Set the prompt's labels to -100, or pass "
                "`prompt_lengths=`/`prompt_mask=` to the forward.",
                stacklevel=2,
            )
        return mask
    return None if attention_mask is None else attention_mask.bool()


def _checked_prompt_mask(prompt_mask: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """An explicit `prompt_mask=` `[B, T]` (bool or 0/1), restricted to non-padding, with at least one prompt token
    per sample."""
    mask = torch.as_tensor(prompt_mask)
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
            raise ValueError(
                f"`prompt_mask` must be a bool (or 0/1 integer) tensor marking the prompt tokens, got {mask.dtype} "
                "values other than 0 and 1; pass e.g. `input_ids != pad_id` restricted to the prompt."
            )
        mask = mask.bool()
    if attention_mask is not None:
        if mask.shape != attention_mask.shape:
            raise ValueError(
                f"PEDRO's prompt mask has shape {tuple(mask.shape)} but the input has shape "
                f"{tuple(attention_mask.shape)}; pass `prompt_mask` with one entry per input token ([batch, seq_len])."
            )
        mask = mask.to(attention_mask.device) & attention_mask.bool()
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist() if mask.dim() == 2 else []
    if empty:
        raise ValueError(
            f"`prompt_mask` marks no (non-padding) prompt token in sample(s) {empty}, so PEDRO would pool an empty "
            "prompt; mark at least one prompt token per sample."
        )
    return mask


def _prompt_mask_of_lengths(prompt_lengths: Any, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`prompt_lengths=` `[B]`: the first `lengths[i]` non-padding tokens of sample i, each between 1 and its number of
    non-padding tokens."""
    if attention_mask is None:
        raise ValueError("`prompt_lengths` needs `input_ids` or an `attention_mask` to know the sequence length.")
    lengths = torch.as_tensor(prompt_lengths)
    batch = attention_mask.shape[0]
    if lengths.dtype == torch.bool or lengths.dtype.is_floating_point or lengths.dtype.is_complex:
        raise ValueError(f"`prompt_lengths` must hold integers (one per sample), got {lengths.dtype}.")
    if lengths.dim() != 1 or len(lengths) != batch:
        raise ValueError(
            f"`prompt_lengths` must have one entry per sample ({batch}), got shape {list(lengths.shape)}; pass "
            "`prompt_lengths=[n_0, ..., n_B-1]`, the number of prompt tokens of each sample."
        )
    real = attention_mask.bool().sum(dim=1).to(lengths.device)
    bad = ((lengths < 1) | (lengths > real)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"`prompt_lengths[{i}]` is {int(lengths[i])}, but sample {i} has {int(real[i])} non-padding tokens; each "
            "prompt length must be between 1 and the sample's number of non-padding tokens (PEDRO never pools an "
            "empty prompt or padding)."
        )
    return prompt_mask_from_lengths(lengths, attention_mask)


def _output_cache(output: Any) -> Any:
    """The KV cache a model forward returned (`ModelOutput.cache` or `.past_key_values`, or a `Cache` in a plain tuple),
    or None. The field is read by its own name: the renamed `past_key_values` is a property that warns."""
    if output is None:
        return None
    if isinstance(output, dict):  # transformers' ModelOutput; dict.get skips its renaming `get`, which warns
        fields = (dict.get(output, name) for name in _CACHE_NAMES)
        return next((field for field in fields if field is not None), None)
    if isinstance(output, tuple):
        return next((item for item in output if isinstance(item, Cache)), None)
    return None


@dataclass
class _PeftCall:
    """One peft `forward` or `generate` call of a PEDRO model: the vectors its first model forward computed (or
    reused), which every later forward of the call (generate's decode steps, with or without KV cache) broadcasts."""

    tuner: PedroModel
    vectors: dict | None = None


# Both live in the calling thread's context for the duration of one call, never on the model: concurrent calls from
# several threads each see their own.
_PEFT_CALL: ContextVar[_PeftCall | None] = ContextVar("pedro_peft_call", default=None)
_FORWARD_TOKENS: ContextVar[tuple] = ContextVar("pedro_forward_tokens", default=())
_STANDALONE_TOKENS: ContextVar[tuple] = ContextVar("pedro_standalone_tokens", default=())
# The attribute of a KV cache object that holds the vectors of the prompt forward that started it.
CACHE_VECTORS_ATTRIBUTE = "_xpeft_pedro_vectors"


def _cache_vectors(kv_cache: Any) -> dict | None:
    return getattr(kv_cache, CACHE_VECTORS_ATTRIBUTE, None)


def _attach_vectors(kv_cache: Any, vectors: dict) -> None:
    """Keep a prompt's vectors with the KV cache its forward returned, so that any later forward continuing that cache
    (a decode step, a second chat turn, another conversation interleaved) reuses them."""
    try:
        setattr(kv_cache, CACHE_VECTORS_ATTRIBUTE, vectors)
    except (AttributeError, TypeError):  # a cache type without attributes; continuing it raises a clear error
        pass


def _begin_model_call(tuner: PedroModel, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the transformers model: read the prompt boundary, decide compute or reuse, and open the
    forward's [`PedroForward`] state in the caller's context."""
    refuse_data_parallel(module, "PEDRO")
    prompt_mask = kwargs.pop("prompt_mask", None)  # PEDRO's own per-call arguments never reach the base model
    prompt_lengths = kwargs.pop("prompt_lengths", None)
    arguments = dict(zip(tuner._forward_arguments, args, strict=False)) | kwargs
    call = _PEFT_CALL.get()
    call = call if call is not None and call.tuner is tuner else None
    kv_cache = _input_cache(arguments)
    if call is not None and call.vectors is not None:
        reused = call.vectors  # a later forward of the same generate call
    elif _cache_length(kv_cache) > 0:
        reused = _cache_vectors(kv_cache)
        if reused is None:
            raise ValueError(
                "This forward continues a KV cache, but PEDRO has no vectors for it: the cache was not started by a "
                "prompt forward of this PEDRO model (the vectors are computed at the prefill and travel with the "
                "cache it returns). Run the prompt through this PEDRO model and continue the cache it returns, or "
                "call `generate`, which does it."
            )
    else:
        reused = None
    if reused is not None and (prompt_mask is not None or prompt_lengths is not None):
        raise ValueError(
            "`prompt_mask`/`prompt_lengths` set the prompt of the forward that computes PEDRO's vectors, but this "
            "forward continues a KV cache (or an earlier forward of the same call) and reuses that prompt's "
            "vectors; drop them here, or run the full text without a cache."
        )
    if reused is None:
        mask = prompt_mask_for_call(arguments, prompt_mask, prompt_lengths, tuner._labels_mark_prompt)
        forward = PedroForward(prompt_mask=mask)
    else:
        forward = PedroForward(reused=reused, vectors=reused)
    _wrap_checkpointing(tuner)
    token = CURRENT_FORWARD.set(forward)
    _FORWARD_TOKENS.set((*_FORWARD_TOKENS.get(), (module, token)))
    return args, kwargs


def _end_model_call(tuner: PedroModel, module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (also run when the forward raises): close the forward's state and keep its vectors with the call
    and with the KV cache it returned."""
    tokens = _FORWARD_TOKENS.get()
    if not tokens or tokens[-1][0] is not module:
        return  # the pre-hook raised before opening a state
    _FORWARD_TOKENS.set(tokens[:-1])
    forward = CURRENT_FORWARD.get()
    CURRENT_FORWARD.reset(tokens[-1][1])
    if output is None:
        return
    call = _PEFT_CALL.get()
    if call is not None and call.tuner is tuner and call.vectors is None:
        call.vectors = forward.vectors
    cache = _output_cache(output)
    if cache is not None and forward.reused is None:
        _attach_vectors(cache, forward.vectors)


def _begin_standalone_block(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook on each adapted block: a block run outside any model forward of the PEDRO model (the inner
    decoder stack or a block called directly) gets a state of its own for its duration, in which the whole input is
    the prompt. Inside a model forward the forward's state is current and nothing happens."""
    if CURRENT_FORWARD.get() is None:
        _STANDALONE_TOKENS.set((*_STANDALONE_TOKENS.get(), (module, CURRENT_FORWARD.set(standalone_forward()))))


def _end_standalone_block(module: nn.Module, args: tuple, output: Any) -> None:
    tokens = _STANDALONE_TOKENS.get()
    if tokens and tokens[-1][0] is module:
        _STANDALONE_TOKENS.set(tokens[:-1])
        CURRENT_FORWARD.reset(tokens[-1][1])


def _wrap_checkpointing(tuner: PedroModel) -> None:
    """Make transformers' activation checkpointing recompute each block with the state of its own forward.

    transformers checkpoints a block's `forward` with the function in its `_gradient_checkpointing_func` (set by
    `gradient_checkpointing_enable`, possibly after PEDRO was added) and recomputes it during backward, after the
    forward's context is gone. Wrapping that function binds each checkpointed call to the state current at the
    forward, so that the recompute pools the same prompt whatever ran in between (other forwards, other prompts).
    """
    if not (tuner.model.training and torch.is_grad_enabled()):
        return  # transformers checkpoints only in training mode with gradients
    for layer in tuner._checkpointable_layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if func is not None and not getattr(func, "binds_pedro_state", False):
            layer._gradient_checkpointing_func = _checkpoint_with_forward_state(func)


def _checkpoint_with_forward_state(checkpoint_func: Callable) -> Callable:
    def checkpoint_with_forward_state(function: Callable, *args: Any, **kwargs: Any):
        forward = CURRENT_FORWARD.get()
        if forward is None:
            return checkpoint_func(function, *args, **kwargs)

        def run(*run_args: Any, **run_kwargs: Any):
            if CURRENT_FORWARD.get() is forward:  # the forward itself
                return function(*run_args, **run_kwargs)
            # The recompute during backward: the same prompt, fresh codes, and nothing recorded for reuse.
            token = CURRENT_FORWARD.set(replace(forward, codes={}, recomputing=True))
            try:
                return function(*run_args, **run_kwargs)
            finally:
                CURRENT_FORWARD.reset(token)

        return checkpoint_func(run, *args, **kwargs)

    checkpoint_with_forward_state.binds_pedro_state = True
    return checkpoint_with_forward_state


class PedroModel(XpeftTuner):
    """PEDRO tuner (arXiv 2409.17834): prompt-conditioned vectors scaling Q, V and the FFN up projection.

    When the vectors are computed (DESIGN.md §3):

    - `forward` computes them from the call's prompt: an explicit `prompt_mask=` (`[B, T]`) or `prompt_lengths=` (`[B]`,
      counted from each sample's first non-padding token) keyword, else, for causal LMs only, token-level `labels`
      (the prompt is `-100` before the first supervised token), else the whole non-padding input. Other models'
      labels (e.g. token classification, where `-100` marks unlabelled tokens) never set the prompt.
      Padding is never prompt; left and right padding both work. The two keywords are consumed by PEDRO before the
      transformers model runs, so they work with any architecture; with `Trainer`, emit them from the data collator
      and set `remove_unused_columns=False`.
    - `generate` computes them at its first forward (the prefill, the whole non-padding prompt) and every later forward
      of the call reuses them, with or without KV cache; beam search repeats each prompt's vectors with its beams.
    - Outside `generate`, a forward that continues a KV cache reuses the vectors of the forward that started it: they
      travel with the cache object, so several conversations can be interleaved and a second chat turn continues
      its own prompt's vectors. A cache PEDRO did not start raises.

    Nothing per call is stored on the model: each call's prompt mask and vectors live in the calling thread's context
    (and with its KV cache), so concurrent calls from several threads are each exact, and transformers' activation
    checkpointing recomputes every block with its own forward's prompt.
    """

    prefix: str = "pedro_"
    tuner_layer_cls = PedroLayer
    target_module_mapping = {model_type: sorted(roles) for model_type, roles in PEDRO_ROLES.items()}
    mergeable = False
    unmergeable_reason = UNMERGEABLE_REASON

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The generator is a nested module (`pedro_generator.<name>.down.weight`), so peft's default, which expects
        # the adapter name second to last, would leave it in; drop it right after the container name instead.
        containers = "|".join(re.escape(name) for name in PedroLayer.adapter_layer_names)
        return re.sub(rf"\.({containers})\.{re.escape(adapter_name)}(?=\.|$)", r".\1", key)

    def _pre_injection_hook(self, model: nn.Module, config: PedroConfig, adapter_name: str) -> None:
        if hasattr(self, "_hook_handles"):
            return
        self._blocks: dict[str, PedroBlock] = {}
        self._owners: dict[tuple[int, str], str] = {}  # (id of the config, block) -> module holding the generator
        self._forward_arguments = list(inspect.signature(model.forward).parameters)
        self._labels_mark_prompt = labels_mark_prompt(model)
        self._checkpointable_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self._hook_handles = [
            model.register_forward_pre_hook(partial(_begin_model_call, self), with_kwargs=True),
            model.register_forward_hook(partial(_end_model_call, self), always_call=True),
        ]

    def _prepare_adapter_config(self, peft_config: PedroConfig, model_config: dict) -> PedroConfig:
        model_type = model_config.get("model_type")
        roles = PEDRO_ROLES.get(model_type)
        if roles is None:
            raise ValueError(
                f"PEDRO does not know the query, value and FFN-up projections of model type {model_type!r}; "
                f"supported model types: {', '.join(PEDRO_ROLES)}. Open an issue to add yours."
            )
        if peft_config.target_modules is None:
            peft_config.target_modules = set(roles)
        unknown = set(peft_config.target_modules) - set(roles)
        if unknown:
            raise ValueError(
                f"`target_modules` contains {sorted(unknown)}, which PEDRO cannot scale in a {model_type} model; "
                f"choose among {sorted(roles)} (the query, value and FFN-up projections)."
            )
        if not {roles[name] for name in peft_config.target_modules} & {"q", "v", "qv"}:
            raise ValueError(
                f"`target_modules` {sorted(peft_config.target_modules)} has no query or value projection, where "
                f"PEDRO's vector generator reads the block input; add one of {sorted(roles)}."
            )
        return peft_config

    def _prepare_model(self, peft_config: PedroConfig, model: nn.Module) -> None:
        # Before any generator is allocated: `down` maps the block input (size d) to `vg_rank` features, so a rank
        # above d adds nothing, and a huge one would allocate d x vg_rank weights per block (or be OOM-killed).
        planned = [(name, base) for name, base in self._planned_targets(peft_config) if _BLOCK_KEY.match(name)]
        sizes = [(name, layer_features(base, "PEDRO")[0]) for name, base in planned]
        if not sizes:
            return  # nothing to adapt in numbered blocks: refused later with its own message
        name, d = min(sizes, key=lambda size: size[1])
        if peft_config.vg_rank > d:
            raise ValueError(
                f"PEDRO `vg_rank`={peft_config.vg_rank} exceeds the hidden size d={d} that the vector generators read "
                f"(input of {name!r}): a bottleneck wider than its input adds nothing. Set `vg_rank` to at most {d} "
                "(the default is 12)."
            )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        roles = PEDRO_ROLES[self.model.config.model_type]
        name = next(n for n in roles if current_key == n or current_key.endswith("." + n))
        role = roles[name]
        match = _BLOCK_KEY.match(current_key)
        if match is None:
            raise ValueError(
                f"PEDRO found no block index in the module name {current_key!r}: PEDRO scales projections inside "
                "numbered transformer blocks (`<...>.layers.<i>.<...>`), one vector generator per block. Point "
                "`target_modules` at the blocks' query, value and FFN-up projections, and set `layers_pattern` to "
                "the name of the block list if you use `layers_to_transform`."
            )
        owner_role = current_key == self._generator_owner(config, match.group(1), current_key, role)
        block = self._blocks.get(match.group(1))
        if block is None:
            block = self._blocks[match.group(1)] = PedroBlock(match.group(1))
            block_module = self.model.get_submodule(match.group(1))
            self._hook_handles += [
                block_module.register_forward_pre_hook(_begin_standalone_block),
                block_module.register_forward_hook(_end_standalone_block, always_call=True),
            ]
        if isinstance(target, PedroLayer):
            target.update_layer(adapter_name, config, owner_role)
            return
        new_module = PedroLayer(target, adapter_name, config, role, owner_role, block)
        self._swap_in(parent, target_name, new_module, target, adapter_name)

    def _generator_owner(self, config: PedroConfig, block_key: str, current_key: str, role: str) -> str:
        """The module of block `block_key` that holds the vector generator: its query projection if adapted, else
        its value projection (both read the normalised block input). Decided per block, so that `exclude_modules` or
        `layers_to_transform` removing one block's query projection moves its generator to the value projection."""
        roles = PEDRO_ROLES[self.model.config.model_type]
        cached = self._owners.get((id(config), block_key))
        if cached is not None:
            return cached
        adapted = {}
        for key, _ in self.model.named_modules():
            if key.startswith(block_key + ".") and self._check_target_module_exists(config, key):
                name = next((n for n in roles if key == n or key.endswith("." + n)), None)
                if name is not None:
                    adapted.setdefault(roles[name], key)
        for owner in ("qv", "q", "v"):
            if owner in adapted:
                self._owners[(id(config), block_key)] = adapted[owner]
                return adapted[owner]
        raise ValueError(
            f"PEDRO would scale {current_key!r} (role {role!r}) but none of block {block_key!r}'s query or value "
            "projections is adapted (removed by `exclude_modules` or `layers_to_transform`), and the block's vector "
            "generator reads its input there. Keep that block's query or value projection, or exclude the whole block "
            f"(add {current_key!r} to `exclude_modules` too)."
        )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        # peft enters this context around every PeftModel forward and generate call: one call computes the vectors
        # once (its first model forward) and every later forward of the call (generate's decode steps) reuses them.
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            token = _PEFT_CALL.set(_PeftCall(self))
            try:
                yield
            finally:
                _PEFT_CALL.reset(token)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for handle in self._hook_handles:
            handle.remove()
        return model
