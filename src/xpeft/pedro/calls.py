"""PEDRO's per-call state: the prompt boundary of each model call, the vectors it computes, and where they live.

Nothing of a call is stored on the model. A model forward opens a [`PedroForward`] in the calling thread's context
(`CURRENT_FORWARD`, a context variable) for its duration; a peft `generate` call keeps the vectors of its first forward
for its decode steps (`_PEFT_CALL`); and a forward that returns a KV cache attaches its vectors to that cache object
([`PromptVectors`]), so that any later forward continuing the cache (a decode step, a second chat turn, another
conversation interleaved, a copy of the cache, its rows reordered or repeated) reuses them. Concurrent calls in several
threads each see their own state, and transformers' activation checkpointing recomputes each block with the state of
its own forward.

torch.compile: the functions here run per call on per-call Python objects (context variables, dicts keyed by layer,
cache objects), which dynamo can neither trace (a `ContextVar` access is unsupported) nor guard on without
recompiling for every new object. They are therefore excluded from compilation (`torch.compiler.disable`): each is
one graph break, run eagerly, and the model's own tensor work between them compiles once per shape.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..tuners_utils import refuse_data_parallel
from .generator import prompt_mask_from_labels, prompt_mask_from_lengths
from .layer import CURRENT_FORWARD, RECOMPUTED_BLOCK, PedroBlock, PedroForward, standalone_forward

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


class PromptVectors(weakref.WeakKeyDictionary):
    """The vectors of one prompt forward, `{PEDRO layer: (adapter key, [B, out] scale or None)}`, and `rows`, a
    fingerprint `[B, 4]` of the KV cache rows they belong to (None when the cache's layout is not readable).

    Layers are held weakly, so a cache kept by a server does not keep a deleted model's weights alive. A copy of the
    cache (transformers' prompt-reuse pattern deep-copies a prefix cache) shares this object: the vectors never change
    once computed, and copying would copy the model's layers.
    """

    rows: torch.Tensor | None = None
    length: int = 0  # cache positions of the prompt forward

    def __copy__(self) -> PromptVectors:
        return self

    def __deepcopy__(self, memo: dict) -> PromptVectors:
        return self

    def select_rows(self, index: torch.Tensor) -> dict:
        """These vectors for the cache rows `index` (rows of the prompt forward, one per current row)."""
        selected = {}
        for layer, (key, scale) in self.items():
            per_row = key[0] != "__active__"
            selected[layer] = (
                tuple(key[i] for i in index.tolist()) if per_row else key,
                None if scale is None else scale[index.to(scale.device)],
            )
        return selected


@dataclass
class _PeftCall:
    """One peft `forward` or `generate` call of a PEDRO model: the vectors its first model forward computed (or
    reused), which every later forward of the call (generate's decode steps, with or without KV cache) broadcasts."""

    tuner: nn.Module
    vectors: dict | None = None


_PEFT_CALL: ContextVar[_PeftCall | None] = ContextVar("pedro_peft_call", default=None)
# The states opened by model-level hooks and by standalone blocks, innermost last: `(tuner, module, token)`.
_OPEN_STATES: ContextVar[tuple] = ContextVar("pedro_open_states", default=())
# The attribute of a KV cache object that holds the [`PromptVectors`] of the prompt forward that started it.
CACHE_VECTORS_ATTRIBUTE = "_xpeft_pedro_vectors"
# generate modes whose model forwards are not "the prompt, then one token at a time of the same rows": their first
# forward pools candidate tokens (assisted and prompt-lookup decoding), prefills in chunks, or runs another prompt
# (classifier-free guidance) inside the call. PEDRO would compute or reuse the wrong vectors there, so it refuses them.
UNSUPPORTED_GENERATE_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "prefill_chunk_size", "guidance_scale")


def refuse_unsupported_generate(model: nn.Module, kwargs: dict) -> None:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    for option in UNSUPPORTED_GENERATE_OPTIONS:
        value = kwargs.get(option, getattr(config, option, None))
        if value is not None and not (option == "guidance_scale" and value == 1):
            raise ValueError(
                f"PEDRO does not support `generate(..., {option}=...)`: that mode runs model forwards that are not the "
                "prompt followed by one token at a time (candidate tokens, prompt chunks or a second prompt), so the "
                "vectors would come from the wrong tokens. Generate without it (greedy, sampling and beam search "
                "work)."
            )


def _row_fingerprints(kv_cache: Any, length: int) -> torch.Tensor | None:
    """A fingerprint `[B, 4]` of each cache row's first `length` positions, from the values of its first full-attention
    layer (V is scaled per adapter, so rows of one prompt under two adapters differ); None if not readable.

    Per-position sums, projected on fixed seeded weights: a reduction over one layer's prompt values, no copy."""
    layer = next(
        (
            layer
            for layer in getattr(kv_cache, "layers", ())
            if getattr(layer, "is_sliding", True) is False and isinstance(getattr(layer, "values", None), torch.Tensor)
        ),
        None,
    )
    if layer is None or layer.values.dim() != 4 or layer.values.shape[-2] < length or length < 1:
        return None
    sums = torch.sum(layer.values[:, :, :length], dim=(1, 3), dtype=torch.float64)  # [B, length]
    weights = torch.randn(length, 4, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
    return (sums @ weights.to(sums.device)).cpu()


def _rows_of_prompt(kv_cache: Any, vectors: PromptVectors) -> torch.Tensor | None:
    """For each row of `kv_cache`, the row of the prompt forward it continues (None: the rows are those rows, in
    order). Follows the cache's own row operations (`reorder_cache`, `batch_select_indices`,
    `batch_repeat_interleave`, as beam search and `num_return_sequences` use them)."""
    if vectors.rows is None:
        return None
    current = _row_fingerprints(kv_cache, vectors.length)
    if current is None:
        return None
    scale = torch.maximum(current.abs(), torch.ones(())).unsqueeze(1)
    same = ((current.unsqueeze(1) - vectors.rows.unsqueeze(0)).abs() <= 1e-9 * scale).all(-1)  # [B, B_prompt]
    if current.shape == vectors.rows.shape and same.diagonal().all():
        return None
    if not same.any(1).all():
        raise ValueError(
            "This KV cache's rows no longer match the prompts PEDRO computed their vectors from (the cache was edited "
            "or belongs to another prompt); run the prompt again and continue the cache it returns."
        )
    return same.float().argmax(1)


def _attach_vectors(kv_cache: Any, vectors: PromptVectors) -> None:
    """Keep a prompt's vectors with the KV cache its forward returned; a cache type without attributes cannot be
    continued later (continuing it raises a clear error)."""
    vectors.length = int(_cache_length(kv_cache))
    vectors.rows = _row_fingerprints(kv_cache, vectors.length)
    try:
        setattr(kv_cache, CACHE_VECTORS_ATTRIBUTE, vectors)
    except (AttributeError, TypeError):
        pass


def _reused_vectors(tuner: nn.Module, kv_cache: Any) -> dict | None:
    """The vectors this forward reuses: the call's (a later forward of one generate call), else the input cache's."""
    call = _PEFT_CALL.get()
    if call is not None and call.tuner is tuner and call.vectors is not None:
        return call.vectors
    if _cache_length(kv_cache) == 0:
        return None
    vectors = getattr(kv_cache, CACHE_VECTORS_ATTRIBUTE, None)
    if vectors is None:
        raise ValueError(
            "This forward continues a KV cache, but PEDRO has no vectors for it: the cache was not started by a "
            "prompt forward of this PEDRO model (the vectors are computed at the prefill and travel with the "
            "cache it returns). Run the prompt through this PEDRO model and continue the cache it returns, or "
            "call `generate`, which does it."
        )
    rows = _rows_of_prompt(kv_cache, vectors)
    return vectors if rows is None else vectors.select_rows(rows)


def _close_stale_states(module: nn.Module) -> None:
    """Drop states of `module` left open by a forward that a BaseException (KeyboardInterrupt, a signal-based timeout)
    ended: torch runs the closing hooks on `Exception` only. A module's forward never runs inside itself."""
    states = _OPEN_STATES.get()
    while states and states[-1][1] is module:
        CURRENT_FORWARD.reset(states[-1][2])
        states = states[:-1]
        _OPEN_STATES.set(states)


def _open_state(tuner: nn.Module, module: nn.Module, forward: PedroForward) -> None:
    _OPEN_STATES.set((*_OPEN_STATES.get(), (tuner, module, CURRENT_FORWARD.set(forward))))


def _close_state(module: nn.Module) -> bool:
    states = _OPEN_STATES.get()
    if not states or states[-1][1] is not module:
        return False  # this module's pre-hook opened nothing (nested call, or it raised before opening)
    _OPEN_STATES.set(states[:-1])
    CURRENT_FORWARD.reset(states[-1][2])
    return True


def _inside_own_forward(tuner: nn.Module) -> bool:
    states = _OPEN_STATES.get()
    return bool(states) and states[-1][0] is tuner


@torch.compiler.disable
def begin_model_call(tuner: nn.Module, arguments_of: list[str], module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on the transformers model and on its inner base model (the decoder stack, which users also
    call directly): read the prompt boundary, decide compute or reuse, and open the forward's [`PedroForward`] in the
    caller's context. Inside a forward of the same PEDRO model (the outer model calling its inner one) it does
    nothing: the outer forward's state applies."""
    refuse_data_parallel(module, "PEDRO")
    _close_stale_states(module)
    prompt_mask = kwargs.pop("prompt_mask", None)  # PEDRO's own per-call arguments never reach the base model
    prompt_lengths = kwargs.pop("prompt_lengths", None)
    if _inside_own_forward(tuner):
        return args, kwargs
    arguments = dict(zip(arguments_of, args, strict=False)) | kwargs
    reused = _reused_vectors(tuner, _input_cache(arguments))
    if reused is not None and (prompt_mask is not None or prompt_lengths is not None):
        raise ValueError(
            "`prompt_mask`/`prompt_lengths` set the prompt of the forward that computes PEDRO's vectors, but this "
            "forward continues a KV cache (or an earlier forward of the same call) and reuses that prompt's "
            "vectors; drop them here, or run the full text without a cache."
        )
    if reused is None:
        mask = prompt_mask_for_call(arguments, prompt_mask, prompt_lengths, tuner._labels_mark_prompt)
        forward = PedroForward(prompt_mask=mask, vectors=PromptVectors())
    else:
        forward = PedroForward(reused=reused, vectors=reused)
    _bind_checkpointing(tuner._checkpointable_layers, module)
    _open_state(tuner, module, forward)
    return args, kwargs


@torch.compiler.disable
def end_model_call(tuner: nn.Module, module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (also run when the forward raises an Exception): close the forward's state and keep its vectors
    with the call and with the KV cache it returned."""
    forward = CURRENT_FORWARD.get()
    if not _close_state(module) or output is None:
        return
    call = _PEFT_CALL.get()
    if call is not None and call.tuner is tuner and call.vectors is None:
        call.vectors = forward.vectors
    cache = _output_cache(output)
    if cache is not None and forward.reused is None:
        _attach_vectors(cache, forward.vectors)


@torch.compiler.disable
def begin_block(tuner: nn.Module, block: PedroBlock, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on each adapted block. A block run outside any forward of the PEDRO model (a block called
    directly) gets a state of its own for its duration, in which the whole input is the prompt. A block whose
    generators pool the block input (`generator_input="block"`) keeps that input in the state while it runs."""
    _close_stale_states(module)
    if CURRENT_FORWARD.get() is None:
        _bind_checkpointing((module,), module)
        _open_state(tuner, module, standalone_forward())
    if block.reads_input:
        CURRENT_FORWARD.get().block_inputs[block] = args[0] if args else kwargs.get("hidden_states")


@torch.compiler.disable
def end_block(block: PedroBlock, module: nn.Module, args: tuple, output: Any) -> None:
    forward = CURRENT_FORWARD.get()
    if forward is not None:
        forward.block_inputs.pop(block, None)
    _close_state(module)


def _bind_checkpointing(layers, module: nn.Module) -> None:
    """Make transformers' activation checkpointing recompute each block with the state of its own forward.

    transformers checkpoints a block's `forward` with the function in its `_gradient_checkpointing_func` (set by
    `gradient_checkpointing_enable`, possibly after PEDRO was added) and recomputes it during backward, after the
    forward's context is gone. Wrapping that function binds each checkpointed call to the state current at the
    forward, so that the recompute pools the same prompt whatever ran in between (other forwards, other prompts).
    """
    if not (module.training and torch.is_grad_enabled()):
        return  # transformers checkpoints only in training mode with gradients
    for layer in layers:
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
            # The recompute during backward: the same prompt, fresh codes, and nothing recorded for reuse. The block's
            # hooks do not run here, so its input (for `generator_input="block"`) is taken from the arguments.
            hidden = run_args[0] if run_args else run_kwargs.get("hidden_states")
            inputs = {RECOMPUTED_BLOCK: hidden}
            token = CURRENT_FORWARD.set(replace(forward, codes={}, block_inputs=inputs, recomputing=True))
            try:
                return function(*run_args, **run_kwargs)
            finally:
                CURRENT_FORWARD.reset(token)

        return checkpoint_func(run, *args, **kwargs)

    checkpoint_with_forward_state.binds_pedro_state = True
    return checkpoint_with_forward_state


@torch.compiler.disable
def open_peft_call(tuner: nn.Module) -> tuple:
    """Start one peft `forward`/`generate` call of `tuner` in the caller's context; returns what [`close_peft_call`]
    needs to put the context back."""
    return saved_context(), _PEFT_CALL.set(_PeftCall(tuner))


@torch.compiler.disable
def close_peft_call(opened: tuple) -> None:
    saved, token = opened
    _PEFT_CALL.reset(token)
    restore_after_call(saved)


def restore_after_call(saved: tuple) -> None:
    """Put the thread's PEDRO context back as it was before a peft call, whatever ended it (BaseException included)."""
    current, states = saved
    if _OPEN_STATES.get() is not states:
        _OPEN_STATES.set(states)
    if CURRENT_FORWARD.get() is not current:
        CURRENT_FORWARD.set(current)


def saved_context() -> tuple:
    return CURRENT_FORWARD.get(), _OPEN_STATES.get()
