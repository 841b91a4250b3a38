"""PEDRO tuner model: target resolution per architecture, and the per-call prompt boundary (DESIGN.md §3)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..loading import weights_source
from ..tuners_utils import XpeftTuner, layer_features
from .calls import (
    _output_cache,  # noqa: F401  (re-exported: the tests read caches through it)
    begin_block,
    begin_model_call,
    close_peft_call,
    end_block,
    end_model_call,
    labels_mark_prompt,
    open_peft_call,
    refuse_unsupported_generate,
)
from .config import PEDRO_ROLES, PedroConfig
from .layer import UNMERGEABLE_REASON, PedroBlock, PedroLayer

_BLOCK_KEY = re.compile(r"^(.*?\.\d+)\.")


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
      travel with the cache object (through its copies and row operations), so several conversations can be
      interleaved and a second chat turn continues its own prompt's vectors. The tokens added by a continuation never
      enter the vectors, so continuing a cached prefix (a system prompt) differs from running the whole text without
      a cache. A cache PEDRO did not start raises. The same holds for the inner model (e.g. `model.model`), which users also call
      on its own: it handles prompts and caches like the full model.
    - `generate` modes whose forwards are not "the prompt, then one token at a time" (assisted and prompt-lookup
      decoding, chunked prefill, classifier-free guidance) are refused: the vectors would come from other tokens.

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

    @classmethod
    def _decode_checkpoint(cls, model, config: PedroConfig, adapter_name: str, state_dict: dict) -> dict:
        # The generic shape check would blame an edited config or another base model; for the activation's
        # coefficients the cause is `rational_degrees`, which adapters saved before it existed do not record.
        if config.activation == "rational":
            expected = {"numerator": config.rational_degrees[0] + 1, "denominator": config.rational_degrees[1]}
            for key, tensor in state_dict.items():
                coefficients = key.rsplit(".", 1)[-1]
                if key.endswith(f".act.{coefficients}") and coefficients in expected:
                    if tensor.shape != (expected[coefficients],):
                        raise ValueError(
                            f"{weights_source(config)}: the rational activation's {coefficients} {key!r} has "
                            f"{tensor.numel()} coefficient(s), but `rational_degrees`={list(config.rational_degrees)}"
                            f" expects {expected[coefficients]}: the adapter was saved with other degrees. Set "
                            "`rational_degrees` in adapter_config.json to the degrees it was saved with ([m, n] for "
                            "m + 1 numerator and n denominator coefficients; [5, 4] for adapters saved before the "
                            "field existed)."
                        )
        return state_dict

    def _pre_injection_hook(self, model: nn.Module, config: PedroConfig, adapter_name: str) -> None:
        if hasattr(self, "_hook_handles"):
            return
        self._blocks: dict[str, PedroBlock] = {}
        self._owners: dict[tuple[int, str], str] = {}  # (id of the config, block) -> module holding the generator
        self._labels_mark_prompt = labels_mark_prompt(model)
        self._checkpointable_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        self._hook_handles = []
        # The model, and its inner base model (the decoder stack), which users also call on its own.
        inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
        for module in (model, inner) if isinstance(inner, nn.Module) and inner is not model else (model,):
            arguments = list(inspect.signature(module.forward).parameters)
            self._hook_handles += [
                module.register_forward_pre_hook(partial(begin_model_call, self, arguments), with_kwargs=True),
                module.register_forward_hook(partial(end_model_call, self), always_call=True),
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
                block_module.register_forward_pre_hook(partial(begin_block, self, block), with_kwargs=True),
                block_module.register_forward_hook(partial(end_block, block), always_call=True),
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
        refuse_unsupported_generate(self.model, kwargs)
        with super()._enable_peft_forward_hooks(*args, **kwargs):
            opened = open_peft_call(self)
            try:
                yield
            finally:
                close_peft_call(opened)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for handle in self._hook_handles:
            handle.remove()
        return model
