"""peft plumbing shared by every xpeft tuner: per-sample `adapter_names`, layer geometry, merge refusal.

Each method's model class derives from [`XpeftTuner`] and each layer class uses the helpers below, so that mixed
batches, unknown adapter names and unmergeable methods behave the same way across ETHER, X-PEFT and PEDRO.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from threading import Lock
from types import SimpleNamespace
from typing import Any

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from transformers.pytorch_utils import Conv1D

from .loading import check_loaded_config, check_loaded_tensors, discard_failed_load, finish_load
from .quantization import check_not_torch_ao_quantized

BASE_ADAPTER_NAME = "__base__"
"""Sentinel in `adapter_names` for samples that should see the base model only (as in peft's LoRA)."""

SUPPORTED_LAYER_TYPES = (nn.Linear, Conv1D)
CONV_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Serializes the one-time registration of the routing hooks when several threads make their first routed call at once.
_HOOK_LOCK = Lock()


def layer_features(
    base_layer: nn.Module, method: str, supported: tuple[type[nn.Module], ...] = SUPPORTED_LAYER_TYPES
) -> tuple[int, int, bool]:
    """Return `(in_features, out_features, fan_in_fan_out)` of a base layer whose type is in `supported`.

    `fan_in_fan_out` is True for transformers' `Conv1D` (GPT-2), which stores its weight as `[in, out]`, the transpose
    of `nn.Linear`'s `[out, in]`. A convolution (when `supported` has [`CONV_LAYER_TYPES`]) counts as the matrix
    `weight.flatten(1)`: `in_features` is the fan-in of one filter, `in_channels / groups · kernel elements`.

    Raises:
        TypeError: for any other layer type, listing the supported ones, and for the output projection of an
            `nn.MultiheadAttention`, which never calls it.
    """
    check_not_torch_ao_quantized(base_layer, method)
    if not isinstance(base_layer, supported):
        names = ", ".join(f"`{cls.__module__}.{cls.__qualname__}`" for cls in supported)
        raise TypeError(
            f"{method} cannot adapt a layer of type `{type(base_layer).__name__}`; supported layer types are {names}. "
            "Change `target_modules` so that it matches only such layers (e.g. a list of layer names, or "
            "'all-linear')."
        )
    if isinstance(base_layer, NonDynamicallyQuantizableLinear):
        raise TypeError(
            f"{method} cannot adapt the `out_proj` of an `nn.MultiheadAttention`: the attention reads its weight "
            "directly and never calls the layer, so an adapter there would have no effect. Leave it out of "
            "`target_modules` (e.g. `exclude_modules=['out_proj']`)."
        )
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features, False
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features, True
    channels, kernel = conv_fan_in(base_layer)  # one of CONV_LAYER_TYPES
    return channels * kernel, base_layer.out_channels, False


def conv_fan_in(conv: nn.Module) -> tuple[int, int]:
    """`(in_channels / groups, kernel elements)` of a convolution: their product is the fan-in of one filter. Read from
    the layer's attributes, not its weight (which may be partitioned, e.g. by DeepSpeed ZeRO-3)."""
    return conv.in_channels // conv.groups, math.prod(conv.kernel_size)


def weight_as_out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """View a base weight as `[out, in]` whatever its storage convention (see [`layer_features`])."""
    return weight.T if fan_in_fan_out else weight


def in_requested_layers(config, key: str) -> bool:
    """Whether module `key` lies in a layer that `config.layers_to_transform` (and `layers_pattern`) selects, by
    peft's own rule (the first numbered name segment, or the one after `layers_pattern`). peft applies that rule only
    to list targets, so `key` is checked as the list target made of its own last name segment."""
    if "." not in key:
        return False  # a top-level module lies in no numbered layer (and would match the probe by name)
    probe = SimpleNamespace(
        target_modules={key.rsplit(".", 1)[-1]},
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
    )
    return bool(check_target_module_exists(probe, key))


def adapter_index_groups(adapter_names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Group sample indices by adapter name: `{"a": tensor([0, 2]), "__base__": tensor([1])}`, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for index, name in enumerate(adapter_names):
        groups.setdefault(name, []).append(index)
    return {name: torch.tensor(indices, device=device, dtype=torch.long) for name, indices in groups.items()}


def check_mixed_batch_args(
    layer: BaseTunerLayer, x: torch.Tensor, adapter_names: Sequence[str] | None
) -> list[str] | None:
    """Layer-level checks for a mixed batch; returns one adapter name per leading row of `x`.

    Some models flatten `[batch, seq, features]` to `[batch * seq, features]` before a linear layer (OPT's
    feed-forward does); each sample's tokens are then contiguous rows, so each name is repeated `seq` times.
    """
    if adapter_names is None:
        return None
    if layer.merged:
        # A merged adapter is baked into the base weight for every sample, so per-sample routing would be wrong.
        raise ValueError(
            "Cannot pass `adapter_names` while adapters are merged into the base weights; call "
            "`model.unmerge_adapter()` first."
        )
    rows, samples = len(x), len(adapter_names)
    if rows == samples:
        return list(adapter_names)
    if x.dim() == 2 and samples and rows % samples == 0:
        return [name for name in adapter_names for _ in range(rows // samples)]
    raise ValueError(
        f"`adapter_names` has {samples} entries but the batch has {rows} samples; pass exactly one adapter name "
        f"(or '{BASE_ADAPTER_NAME}') per sample."
    )


def refuse_data_parallel(module: nn.Module, what: str) -> None:
    """Refuse to run `what` in a `torch.nn.DataParallel` replica.

    DataParallel copies each module's attribute dict shallowly per forward, so the replicas share the original's hook
    dicts and hooks bound to the original tuner: per-call routing registered there would be lost or leak across
    replicas. DistributedDataParallel and FSDP run one process per device and need none of this.
    """
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            f"{what} cannot run inside `torch.nn.DataParallel`: its replicas share the original model's hooks, so "
            "per-call state would be lost or mixed between replicas. Use `DistributedDataParallel` (one process per "
            "device, e.g. `accelerate launch` or `torchrun`) or FSDP instead."
        )


def _generation_expansion(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows `generate` makes of each sample: `num_beams` for beam search, else `num_return_sequences`."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    num_beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    num_return = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return num_beams if num_beams > 1 else num_return


@dataclass
class _Routing:
    """The per-sample routing of one peft call (`forward` or `generate` with `adapter_names`).

    Lives in the context variable [`_ROUTING`] for the duration of the call, never on the model, so that calls in
    parallel threads each route their own samples. `rows` is filled by the model-level pre-hook at every forward of
    the call (generate repeats each sample for beams and returned sequences).
    """

    tuner: XpeftTuner
    adapter_names: list[str]
    expansion: int
    rows: list[str] = field(default_factory=list)


_ROUTING: ContextVar[_Routing | None] = ContextVar("xpeft_routing", default=None)


def _active_routing(tuner: XpeftTuner) -> _Routing | None:
    routing = _ROUTING.get()
    return routing if routing is not None and routing.tuner is tuner else None


def _route_samples(tuner: XpeftTuner, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Model-level pre-hook: one adapter name per row of this forward's batch, for the call routed by `tuner`.

    `generate` repeats each sample `expansion` times in adjacent rows (beams, returned sequences), so each name is
    repeated with it. Layers that see flattened `[batch * seq, features]` rows (OPT's feed-forward) cannot tell a short
    `adapter_names` from a long sequence, so the number of samples is checked here, on the model's own inputs.
    """
    routing = _active_routing(tuner)
    if routing is None:
        return
    names, expansion = routing.adapter_names, routing.expansion
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    rows = len(inputs) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else len(names)
    if rows == len(names):
        routing.rows = list(names)
    elif expansion > 1 and rows == len(names) * expansion:
        routing.rows = [name for name in names for _ in range(expansion)]
    else:
        raise ValueError(
            f"`adapter_names` has {len(names)} entries but the batch has {rows} rows; pass exactly one "
            f"adapter name (or '{BASE_ADAPTER_NAME}') per input sample (generate repeats them for beams and "
            "returned sequences itself)."
        )


def _inject_adapter_names(tuner: XpeftTuner, module: nn.Module, args: tuple, kwargs: dict):
    """Pre-hook of every routed module: pass it this call's per-row adapter names, if the call routes samples."""
    routing = _active_routing(tuner)
    if routing is not None:
        kwargs["adapter_names"] = routing.rows
    return args, kwargs


class XpeftTuner(BaseTuner):
    """Base class of xpeft's tuner models.

    Adds to peft's `BaseTuner`:

    - per-sample `adapter_names` in `forward` and `generate` (peft calls [`_enable_peft_forward_hooks`] around both),
      validated once at model level (not in training mode, no unknown names, one name per sample), repeated by
      `generate` for beams and returned sequences, and routed to tuner layers and `modules_to_save` heads;
    - a clear refusal to merge for methods whose math does not allow it (`mergeable = False`);
    - a clear refusal of LoRA's `add_weighted_adapter`, which peft would otherwise report as a missing attribute of
      the transformers model;
    - `layers_to_transform` applied on top of a default `target_modules` regex (peft applies it to lists only).

    Subclasses set `prefix`, `tuner_layer_cls`, `target_module_mapping`, `mergeable`, `unmergeable_reason` and, if
    they have a more specific one, `weighted_adapter_reason`.
    """

    mergeable: bool = True
    unmergeable_reason: str = ""
    weighted_adapter_reason: str = (
        "its adapters are not linear in their trained tensors (normalized reflection vectors, softmax or top-k masks, a "
        "generator network), so a weighted sum of two adapters' tensors is not a weighted mix of what they do."
    )

    def available_adapter_names(self) -> set[str]:
        """Names of the adapters that exist in at least one tuner layer of the model."""
        names: set[str] = set()
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls):
                names |= module._get_available_adapters()
        return names

    def check_adapter_names(self, adapter_names: Sequence[str]) -> None:
        """Model-level checks for a mixed batch (see `check_mixed_batch_args` for the layer-level ones)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(
                f"`adapter_names` must be a list with one adapter name per sample, got {type(adapter_names).__name__}."
            )
        if self.training:
            raise ValueError(
                "Cannot pass `adapter_names` when the model is in training mode; call `model.eval()` first, or "
                "train each adapter on its own with `set_adapter`."
            )
        unknown = {name for name in adapter_names if name != BASE_ADAPTER_NAME} - self.available_adapter_names()
        if unknown:
            raise ValueError(
                f"Unknown adapter name(s) in `adapter_names`: {', '.join(sorted(unknown))}. Available adapters: "
                f"{', '.join(sorted(self.peft_config))} (or '{BASE_ADAPTER_NAME}' for the base model)."
            )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        self.check_adapter_names(adapter_names)
        refuse_data_parallel(self, "Per-sample `adapter_names`")
        self._ensure_routing_hooks()
        routing = _Routing(self, list(adapter_names), _generation_expansion(self.model, kwargs))
        token = _ROUTING.set(routing)
        try:
            yield
        finally:
            _ROUTING.reset(token)

    def _ensure_routing_hooks(self) -> None:
        """Give the model and every routed module (tuner layers, and `modules_to_save` heads, which peft's
        ModulesToSaveWrapper routes itself) one permanent pre-hook that reads the current call's routing.

        The hooks hold no state: each call's routing lives in a context variable, so concurrent calls in several
        threads (a multi-tenant server) never see each other's `adapter_names`. Modules added since the last call
        (a new adapter's head) get their hook here.
        """
        routed_types = (self.tuner_layer_cls, AuxiliaryTrainingWrapper)
        with _HOOK_LOCK:
            hooked = self.__dict__.setdefault("_routing_hooks", {})
            for module in (self.model, *self.model.modules()):
                if id(module) in hooked or not (module is self.model or isinstance(module, routed_types)):
                    continue
                hook = _route_samples if module is self.model else _inject_adapter_names
                handle = module.register_forward_pre_hook(partial(hook, self), with_kwargs=True, prepend=False)
                hooked[id(module)] = (module, handle)

    def _remove_routing_hooks(self) -> None:
        with _HOOK_LOCK:
            for _, handle in self.__dict__.pop("_routing_hooks", {}).values():
                handle.remove()

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any):
        self._remove_routing_hooks()
        return super()._unload_and_optionally_merge(*args, **kwargs)

    def _swap_in(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module, adapter_name: str
    ) -> None:
        """Put a freshly built tuner layer in place of `child`. An adapter added while another is active is frozen
        until `set_adapter` selects it, as in peft's tuners."""
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, child_name, new_module, child)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        if isinstance(child, AuxiliaryTrainingWrapper):
            # Unloading a `modules_to_save` wrapper hands back the wrapped module as is. peft's BaseTuner would copy a
            # `weight` attribute onto it, which heads such as `RobertaClassificationHead` do not have.
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        default = self.target_module_mapping.get(model_config.get("model_type"))
        from_default_regex = peft_config.target_modules is None and isinstance(default, str)
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        if from_default_regex and peft_config.layers_to_transform is not None:
            peft_config.target_modules = self._default_targets_in_layers(peft_config, default)
        return peft_config

    def _default_targets_in_layers(self, config, regex: str) -> set[str]:
        """The modules a default `target_modules` regex matches, kept only in the layers `layers_to_transform` selects.

        peft ignores `layers_to_transform` for a regex (its configs refuse the pair), so on models whose default
        targets are a regex (BERT, RoBERTa, DeBERTa-v2 for X-PEFT) the filter would silently adapt every layer.
        Resolving the regex to module names makes peft apply the filter, and the saved config reloads as a list.
        """
        matched = [name for name, _ in self.model.named_modules() if name and re.fullmatch(regex, name)]
        kept = {name for name in matched if in_requested_layers(config, name)}
        if not kept:
            pattern = f" with `layers_pattern`={config.layers_pattern!r}" if config.layers_pattern else ""
            raise ValueError(
                f"`layers_to_transform`={config.layers_to_transform!r}{pattern} selects none of the {len(matched)} "
                f"modules that the default `target_modules` ({regex!r}) matches in this model (e.g. "
                f"{', '.join(matched[:3]) or 'none'}). Pass indices of layers the model has, counted from 0, or set "
                "`target_modules` yourself."
            )
        return kept

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refuse peft LoRA's `add_weighted_adapter`, saying why and what to do instead."""
        raise NotImplementedError(
            f"{type(self).__name__} does not support `add_weighted_adapter`: {self.weighted_adapter_reason} Keep the "
            "adapters separate and route each sample to one with `adapter_names=[...]` in forward or generate (mixed "
            "batches), or train a new adapter on the combined data."
        )

    def _check_merge_allowed(self) -> None:
        if not self.mergeable:
            raise ValueError(
                f"{type(self).__name__} adapters cannot be merged into the base weights: {self.unmergeable_reason} "
                "Keep the model unmerged (it runs as is), or use `model.unload()` to get the base model back."
            )
        super()._check_merge_allowed()

    # -- loading (see xpeft.loading) ------------------------------------------------------------------------------

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        check_loaded_config(config)

    def _planned_targets(self, config) -> list[tuple[str, nn.Module]]:
        """`(name, base layer)` of every module `config` will adapt, found as peft's `inject_adapter` finds them, so
        that sizes can be checked before any adapter weight is allocated (call from `_prepare_adapter_config` on)."""
        _maybe_include_all_linear_layers(config, self.model)  # what inject_adapter does next; idempotent
        modules = list(self.model.named_modules())
        inside_tuner_layers = tuple(name + "." for name, module in modules if isinstance(module, BaseTunerLayer))
        return [
            (name, module.get_base_layer() if isinstance(module, BaseTunerLayer) else module)
            for name, module in modules
            if name and not name.startswith(inside_tuner_layers) and self._check_target_module_exists(config, name)
        ]

    @classmethod
    def _decode_checkpoint(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        """Turn a method's saved form into checkpoint keys that peft's remapping knows (the default keeps it)."""
        return state_dict

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        try:
            decoded = cls._decode_checkpoint(model, config, adapter_name, state_dict)
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, decoded)
            check_loaded_tensors(model, config, adapter_name, remapped, cls._remove_adapter_name_from_key)
        except ValueError:
            discard_failed_load(model, config, adapter_name)
            raise
        finish_load(config)
        return remapped
