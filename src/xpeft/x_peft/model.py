"""X-PEFT tuner model: one frozen bank per model, profiles of mask logits saved as a few hundred bytes."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from safetensors.torch import save_file
from torch import nn

from ..loading import forget_source, loaded_from, weights_source
from ..saving import FULL_STATE_DICT_RECIPE, check_full_tensor
from ..serialization import read_safetensors_metadata
from ..tuners_utils import XpeftTuner, layer_features
from .bank import (
    XPeftBank,
    check_bank_allocation,
    check_bank_file_exists,
    lora_bank_targets,
    random_bank_recipe,
    recipe_fingerprint,
)
from .config import XPeftConfig
from .layer import UNMERGEABLE_REASON, XPeftLayer, adapted_features, check_one_placement, default_pfeiffer_targets
from .store import ProfileStore, StoredProfile, head_schema, pack_masks, unpack_masks

MASKS_KEY = "xpeft_masks"
LOGITS_KEY = "xpeft_mask_logits"  # hard masks saved with `save_mask_logits=True`: their float32 logits as well
PEFT_PREFIX = "base_model.model."
# Each block's feed-forward output projection (DESIGN.md §2; placement='ffn_output', see XPeftConfig.placement).
# BERT-like encoders also have "attention.output.dense", which the regex excludes.
_ENCODER_FFN_OUT = r".*\.layer\.\d+\.output\.dense"
DEFAULT_TARGET_MODULES = {
    "bert": _ENCODER_FFN_OUT,
    "roberta": _ENCODER_FFN_OUT,
    "deberta-v2": _ENCODER_FFN_OUT,
    "gpt2": ["mlp.c_proj"],
    "opt": ["fc2"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
}


def bank_source_fingerprint(config: XPeftConfig) -> str:
    """What names the bank `config` describes, whatever layers it adapts: the random recipe's generator and settings,
    or the bank file's fingerprint. Two profiles can share a model's bank exactly when this matches."""
    if config.bank == "random":
        recipe = random_bank_recipe(
            config.bank_seed,
            config.bank_size,
            config.reduction_factor,
            config.non_linearity,
            init_scale=config.bank_init_scale,
        )
        return recipe_fingerprint(recipe)
    # The header is enough here: the bank's tensors are checked against it once, when the model's bank is built.
    check_bank_file_exists(config.bank)
    metadata = read_safetensors_metadata(config.bank)
    if "fingerprint" not in metadata:
        raise ValueError(f"{config.bank} is not an X-PEFT bank file; create one with `xpeft.x_peft.build_bank`.")
    return metadata["fingerprint"]


def _describe_bank(config: XPeftConfig) -> str:
    if config.bank == "random":
        return f"bank='random', bank_seed={config.bank_seed}, bank_init_scale={config.bank_init_scale:g}"
    return config.bank


def xpeft_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, XPeftLayer]]:
    """The X-PEFT layers holding `adapter_name`, in module order (the row order of a saved profile)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, XPeftLayer) and adapter_name in module.xpeft_mask_A
    ]


def _layers_holding(model: nn.Module, adapter_name: str) -> list[tuple[str, XPeftLayer]]:
    """[`xpeft_layers`], refusing a name no X-PEFT layer holds with the names that exist."""
    layers = xpeft_layers(model, adapter_name)
    if not layers:
        available = sorted({name for m in model.modules() if isinstance(m, XPeftLayer) for name in m.xpeft_mask_A})
        raise ValueError(
            f"No X-PEFT layer holds an adapter named {adapter_name!r}; the model's X-PEFT adapters are {available}. "
            "Pass one of these names, or add the profile first (`add_adapter`, `load_adapter` or `attach_profile`)."
        )
    return layers


def check_own_layers(model: nn.Module, bank: XPeftBank | None) -> None:
    """Refuse X-PEFT layers of another X-PEFT model in `model` (whose bank is `bank`).

    `get_peft_model(base, ...)` and `PeftModel.from_pretrained(base, ...)` change `base` in place. Passing that base
    model again builds a second tuner over the first one's layers, which keep composing from the first model's bank:
    a profile with another bank would silently run on the wrong one, and the second model's bank stays empty.
    """
    foreign = [name for name, m in model.named_modules() if isinstance(m, XPeftLayer) and m.xpeft_bank is not bank]
    if foreign:
        raise ValueError(
            f"This base model already carries the X-PEFT layers of another peft model ({foreign[0]!r} and "
            f"{len(foreign) - 1} more): `get_peft_model` and `PeftModel.from_pretrained` change the base model in "
            "place, so it was wrapped before, and new profiles would be composed from that model's bank, not this "
            "one's. Add profiles to the first peft model instead (`load_adapter`, `add_adapter`, `attach_profile`), "
            "or start from a freshly loaded base model."
        )


def _mask_logits(model: nn.Module, adapter_name: str, state_dict: dict | None = None) -> torch.Tensor:
    rows = []
    layers = _layers_holding(model, adapter_name)  # first: it names the available adapters for an unknown name
    bank_size = model.peft_config[adapter_name].bank_size
    for name, layer in layers:
        pair = []
        for attr in XPeftLayer.adapter_layer_names:
            key = f"{name}.{attr}.{adapter_name}"
            logits = (state_dict or {}).get(key, getattr(layer, attr)[adapter_name])
            # Refused before any op: on a sharded tensor, stack/topk would start a gather the other ranks never join.
            check_full_tensor(key, logits)
            if logits.shape != (bank_size,):
                raise ValueError(
                    f"Cannot save X-PEFT mask {key!r}: it has shape {list(logits.shape)}, not [{bank_size}] (bank_size), "
                    f"so it is a shard or a view of one. {FULL_STATE_DICT_RECIPE}"
                )
            pair.append(logits.detach())
        rows.append(torch.stack(pair))
    return torch.stack(rows)


class XPeftModel(XpeftTuner):
    """X-PEFT (arXiv 2401.16137) as a peft tuner: `get_peft_model(model, XPeftConfig(...))`.

    The bank (`self.xpeft_bank`, an [`XPeftBank`]) is created with the first profile and shared by all later ones;
    a profile with another bank is refused with both fingerprints named. `save_pretrained` writes one tensor per
    profile (its masks, bit-packed for hard masks) and the bank fingerprint in `adapter_config.json`, never the bank.
    """

    prefix = "xpeft_"
    tuner_layer_cls = XPeftLayer
    target_module_mapping = DEFAULT_TARGET_MODULES
    uses_shared_state = True
    unmergeable_reason = UNMERGEABLE_REASON

    @property
    def mergeable(self) -> bool:
        # Profiles over a LoRA bank are linear in the input (ΔW = B* A*); over a bottleneck bank they are not.
        bank = self._modules.get("xpeft_bank")
        return bank is not None and bank.kind == "lora"

    def _prepare_adapter_config(self, peft_config: XPeftConfig, model_config: dict) -> XPeftConfig:
        if peft_config.placement == "pfeiffer" and peft_config.target_modules is None:
            peft_config.target_modules = default_pfeiffer_targets(model_config.get("model_type"))
        if peft_config.target_modules is None and peft_config.bank != "random":
            peft_config.target_modules = lora_bank_targets(peft_config.bank)  # None for a bottleneck bank file
        if peft_config.target_modules is None and model_config.get("model_type") not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"X-PEFT has no default `target_modules` for model_type {model_config.get('model_type')!r} (defaults "
                f"exist for {', '.join(DEFAULT_TARGET_MODULES)}). Pass `target_modules` with the name of each block's "
                "feed-forward output projection, e.g. XPeftConfig(target_modules=['down_proj'])."
            )
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        self._attach_bank(peft_config)
        return peft_config

    def _attach_bank(self, config: XPeftConfig) -> None:
        """Check `config` against the model's bank (creating it for the first profile) and fill in or verify the
        profile's bank fingerprint, from the layers the profile will adapt, before any bank layer is drawn or read.

        A random bank's fingerprint covers those layers' names and sizes, which are known only once the target layers
        are found; they are found here as peft's injection will find them.
        """
        if config.bank != "random":  # e.g. set to a relative path after the config was created
            config.bank = os.path.abspath(os.path.expanduser(os.fspath(config.bank)))
        layers = [(name, adapted_features(base, config.placement)[1]) for name, base in self._planned_targets(config)]
        if not layers:
            check_one_placement(self.model, config.placement)
            return  # peft refuses target modules that match nothing, with its own message
        bank = self._modules.get("xpeft_bank")
        check_own_layers(self.model, bank)
        source = bank_source_fingerprint(config)
        if bank is not None and bank.source_fingerprint != source:
            raise ValueError(
                f"This X-PEFT profile needs bank {config.bank_fingerprint or source} ({_describe_bank(config)}) but "
                f"the model's bank is {bank.fingerprint}: all profiles of a model share its bank. Load the profile "
                "into a model built with its bank, or retrain it against this one."
            )
        check_bank_allocation(config.bank, config.bank_size, config.reduction_factor, layers, held=bank)
        if bank is None:
            bank = XPeftBank(
                config.bank,
                config.bank_seed,
                config.bank_size,
                config.reduction_factor,
                config.non_linearity,
                config.bank_init_scale,
            )
        fingerprint = bank.profile_fingerprint(layers)
        self._check_recorded_fingerprint(config, bank, fingerprint, layers)
        config.bank_fingerprint = fingerprint
        if "xpeft_bank" not in self._modules:
            self.xpeft_bank = bank

    @staticmethod
    def _check_recorded_fingerprint(config: XPeftConfig, bank: XPeftBank, fingerprint: str, layers: list) -> None:
        recorded, source = config.bank_fingerprint, loaded_from(config)
        if recorded is None:
            if source is not None and source.weights_file() is not None:
                # A saved profile always records its bank; without it the profile would load against any bank.
                raise ValueError(
                    f"{source.config_file} has no `bank_fingerprint`, so this X-PEFT profile cannot be checked "
                    "against the bank it was trained with and could silently load against another one. Restore the "
                    "field (`save_pretrained` writes it), or re-save the profile from the model it was trained with."
                )
            return
        if recorded == fingerprint:
            return
        if config.bank == "random" and recorded == bank.source_fingerprint:
            raise ValueError(
                f"This X-PEFT profile records bank {recorded}, a random-bank fingerprint of xpeft 0.1, which does not "
                "cover the adapted layers' names and sizes, so it cannot tell this model's bank from another "
                f"model's. If this is the base model the profile was trained on, set its `bank_fingerprint` to "
                f"{fingerprint} (in adapter_config.json) and load it again."
            )
        name, d = layers[0]
        raise ValueError(
            f"This X-PEFT profile was trained against bank {recorded}, but its config describes bank {fingerprint} "
            f"({_describe_bank(config)}, bank_size={config.bank_size}, reduction_factor={config.reduction_factor}, "
            f"non_linearity={config.non_linearity!r}, on this model's {len(layers)} adapted layers, e.g. {name!r} "
            f"with d={d}). The config was edited after saving, or this base model is not the one the profile was "
            "trained on (other layer names or sizes). Load it with the bank and base model it was trained against."
        )

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, XPeftLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = XPeftLayer(target, adapter_name, config, self.xpeft_bank, current_key)
        self._swap_in(parent, target_name, new_module, target, adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # peft creates adapter weights in the base layer's dtype and upcasts float16/bfloat16 ones to float32 unless
        # `autocast_adapter_dtype=False`. X-PEFT layers create their mask logits in float32, so with autocasting off
        # they are put in the base dtype here, as peft's other tuners keep them.
        if not autocast_adapter_dtype:
            for _, layer in xpeft_layers(self.model, adapter_name):
                dtype = layer.get_base_layer().weight.dtype
                if not dtype.is_floating_point:  # e.g. quantized base weights: keep float32
                    continue
                for container in (layer.xpeft_mask_A, layer.xpeft_mask_B):
                    mask = container[adapter_name]
                    container[adapter_name] = nn.Parameter(mask.detach().to(dtype), requires_grad=mask.requires_grad)
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add soft profile `adapter_name` whose mixing weights over the bank are `Σ_j weights[j] softmax(S_j)`.

        The mix is taken over the mixing weights, not the logits: the new profile's composed adapter is then exactly
        the weighted sum of the given profiles' composed adapters, `A*_new = Σ_j weights[j] A*_j` (and `a*`, `B*`,
        `b*` likewise), the X-PEFT counterpart of LoRA's linear combination. A softmax gives every distribution over
        the bank that has no zero, so `weights` must be non-negative and sum to 1: the new logits are
        `log Σ_j weights[j] softmax(S_j)`. Hard-mask profiles are refused (a mix of top-k selections is not a top-k
        selection), and so are profiles with heads (`modules_to_save` copies cannot be mixed). The new profile is
        added inactive, like peft's other new adapters.
        """
        if combination_type != "linear":
            raise ValueError(
                f"X-PEFT mixes profiles linearly only (combination_type='linear'), got {combination_type!r}: the "
                "other combination types are LoRA's, for low-rank weight updates."
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"The model already has an adapter named {adapter_name!r}; pass another `adapter_name`.")
        rows = _weighted_mix_rows(self, list(adapters), list(weights))
        config = copy.copy(self.peft_config[adapters[0]])
        forget_source(config)
        config.mask_type, config.inference_mode = "soft", True
        self.peft_config[adapter_name] = config
        for (_, layer), row in zip(xpeft_layers(self.model, adapters[0]), rows, strict=True):
            layer.update_layer(adapter_name, config, init_logits=row)

    # -- saving: one tensor of masks per profile, never the bank -------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        layers = xpeft_layers(model, adapter_name)
        prefix = PEFT_PREFIX if layers and layers[0][0].startswith(PEFT_PREFIX) else ""
        logits = _mask_logits(model, adapter_name, state_dict)
        saved = {f"{prefix}{MASKS_KEY}.{adapter_name}": pack_masks(logits, config.mask_type, config.hard_k)}
        if _saves_logits(config):
            saved[f"{prefix}{LOGITS_KEY}.{adapter_name}"] = pack_masks(logits, "soft", config.hard_k)
        return saved

    @classmethod
    def _decode_checkpoint(cls, model, config, adapter_name, state_dict):
        # The masks payload becomes one checkpoint key per layer and mask, which peft's remapping then maps to the
        # model's keys (and `check_loaded_tensors` checks, with any head).
        state_dict = dict(state_dict)
        payload = _pop_saved(state_dict, MASKS_KEY)
        if payload is None:
            raise ValueError(
                f"{weights_source(config)} has no '{PEFT_PREFIX}{MASKS_KEY}' tensor, so it is not an X-PEFT profile "
                "(or it is corrupted); re-save it with `save_pretrained` after `import xpeft`."
            )
        saved_logits = _pop_saved(state_dict, LOGITS_KEY)
        layers = xpeft_layers(model, adapter_name)
        try:
            logits = unpack_masks(payload, config.mask_type, config.hard_k, len(layers), config.bank_size)
            logits = _saved_logits(config, saved_logits, payload, len(layers)) if _saves_logits(config) else logits
        except ValueError as error:
            raise ValueError(f"{weights_source(config)}: {error}") from error
        if saved_logits is not None and not _saves_logits(config):
            raise ValueError(
                f"{weights_source(config)} holds mask logits ('{LOGITS_KEY}'), which only a hard-mask profile with "
                "`save_mask_logits=True` saves, but its config does not say so: adapter_config.json was edited or "
                "belongs to another profile. Restore the config the profile was saved with."
            )
        for (name, _), row in zip(layers, logits, strict=True):
            for attr, values in zip(XPeftLayer.adapter_layer_names, row, strict=True):
                state_dict[cls._remove_adapter_name_from_key(f"{name}.{attr}.{adapter_name}", adapter_name)] = values
        return state_dict


def _weighted_mix_rows(tuner: XPeftModel, adapters: list[str], weights: list[float]) -> torch.Tensor:
    """The logits `[L, 2, N]` of `add_weighted_adapter`'s mix, after checking that it is defined."""
    if not adapters or len(weights) != len(adapters):
        raise ValueError(
            f"`add_weighted_adapter` needs one weight per adapter, got {len(adapters)} adapters and {len(weights)} "
            "weights."
        )
    missing = [name for name in adapters if name not in tuner.peft_config]
    if missing:
        raise ValueError(f"Unknown adapter(s) {missing}; the model's adapters are {sorted(tuner.peft_config)}.")
    hard = [name for name in adapters if tuner.peft_config[name].mask_type != "soft"]
    if hard:
        raise NotImplementedError(
            f"X-PEFT cannot mix hard-mask profiles ({', '.join(hard)}): a weighted mix of top-k selections is not a "
            "top-k selection. Mix soft-mask profiles (`mask_type='soft'`)."
        )
    heads = [name for name in adapters if _head_tensors(tuner.model, name)]
    if heads:
        raise ValueError(
            f"Cannot mix profiles with heads ({', '.join(heads)} have `modules_to_save` copies): a weighted mix of "
            "heads is not defined. Mix profiles without `modules_to_save`."
        )
    c = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    if not torch.isfinite(c).all() or (c < 0).any() or abs(float(c.sum()) - 1.0) > 1e-6:
        raise ValueError(
            f"X-PEFT mixes profiles' mixing weights over the bank, which are distributions, so `weights` must be "
            f"non-negative and sum to 1, got {list(weights)}; pass e.g. [w / sum(weights) for w in weights]."
        )
    names = [[name for name, _ in xpeft_layers(tuner.model, adapter)] for adapter in adapters]
    if any(layer_names != names[0] for layer_names in names):
        raise ValueError(
            f"Adapters {adapters} adapt different layers; `add_weighted_adapter` mixes profiles of the same layers."
        )
    mix = sum(
        w * torch.softmax(_mask_logits(tuner.model, name).double(), -1) for w, name in zip(c, adapters, strict=True)
    )
    # Every softmax weight is positive; the floor only keeps an underflow to 0 from becoming -inf.
    return mix.clamp_min(torch.finfo(torch.float32).tiny).log().float()


def _saves_logits(config: XPeftConfig) -> bool:
    return config.mask_type == "hard" and config.save_mask_logits


def _pop_saved(state_dict: dict, key: str) -> torch.Tensor | None:
    found = next((k for k in (PEFT_PREFIX + key, key) if k in state_dict), None)
    return None if found is None else state_dict.pop(found)


def _saved_logits(
    config: XPeftConfig, logits: torch.Tensor | None, payload: torch.Tensor, layers: int
) -> torch.Tensor:
    """The saved logits of a hard profile saved with `save_mask_logits=True`, checked against its selection."""
    if logits is None:
        raise ValueError(
            f"the config says `save_mask_logits=True` but the file has no '{LOGITS_KEY}' tensor: it is corrupted, or "
            "the config was edited. Restore the config the profile was saved with (or set `save_mask_logits` false "
            "to load the selection alone)."
        )
    logits = unpack_masks(logits, "soft", config.hard_k, layers, config.bank_size)  # float32 [L, 2, N], finite
    if not torch.equal(pack_masks(logits, "hard", config.hard_k), payload):
        raise ValueError(
            f"the saved mask logits do not select the adapters its '{MASKS_KEY}' selects: the file is corrupted; "
            "re-save the profile."
        )
    return logits


# -- profiles as payloads: the store, attaching, extracting, cost ------------------------------------------------


def profile_payload(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """The saved form of profile `adapter_name`'s masks (what `save_pretrained` writes for them)."""
    logits = _mask_logits(model, adapter_name)  # first: it names the available adapters for an unknown name
    config = model.peft_config[adapter_name]
    return pack_masks(logits, config.mask_type, config.hard_k)


def _head_tensors(base_model: nn.Module, adapter_name: str) -> dict[str, tuple[str, str, torch.Tensor]]:
    """`{"module.key": (module, key, tensor)}` of the `modules_to_save` (and other auxiliary) copies of
    `adapter_name` in `base_model` (the transformers model, with peft's wrappers), as `save_pretrained` saves them."""
    head = {}
    for module_name, module in base_model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for key, tensor in module.adapter_state_dict(adapter_name, module.state_dict()).items():
                head[f"{module_name}.{key}"] = (module_name, key, tensor.detach())
    return head


def profile_record(model, adapter_name: str = "default") -> StoredProfile:
    """Profile `adapter_name` as a [`ProfileStore`] keeps it: its mask payload and its head tensors."""
    payload = profile_payload(model, adapter_name)
    head = {
        name: tensor.cpu().clone()
        for name, (_, _, tensor) in _head_tensors(model.get_base_model(), adapter_name).items()
    }
    return StoredProfile(payload, head)


def store_geometry(model, adapter_name: str | None = None) -> tuple[XPeftConfig, int, list[list]]:
    """`(config, number of adapted layers, head schema)` of the peft `model`'s X-PEFT adapter `adapter_name` (default:
    its first X-PEFT adapter), what [`ProfileStore.create`] records."""
    if adapter_name is None:
        adapter_name = next((n for n, c in model.peft_config.items() if isinstance(c, XPeftConfig)), None)
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, XPeftConfig):
        raise ValueError(
            f"The model has no X-PEFT adapter named {adapter_name!r} (its adapters: {sorted(model.peft_config)}); "
            "pass `adapter_name` of an X-PEFT adapter."
        )
    layers = _layers_holding(model, adapter_name)
    return config, len(layers), head_schema(_head_tensors(model.get_base_model(), adapter_name))


def _own_template_layers(model, template_name: str) -> list[tuple[str, XPeftLayer]]:
    """The X-PEFT layers of adapter `template_name`, from the bank's list (a few lookups, not a model walk)."""
    bank = model.base_model.xpeft_bank
    # The bank lists its layers in creation order, which is module order.
    base_model = model.get_base_model()
    layers = [(n, base_model.get_submodule(n)) for n in bank.layer_names()]
    return [(n, layer) for n, layer in layers if template_name in layer.xpeft_mask_A]


def _check_store_fits(model, store: ProfileStore, info: dict, template_name: str, layers: list) -> None:
    template = model.peft_config[template_name]
    if len(layers) != info["layers"]:
        check_own_layers(model.get_base_model(), model.base_model.xpeft_bank)  # the likelier cause, if it is one
        raise ValueError(
            f"Store {store.path} holds profiles of {info['layers']} layers but the model adapts {len(layers)}. "
            "Attach them to a model adapting the same layers as the profiles were trained on (same base model, "
            "`target_modules` and `layers_to_transform`), or store this model's profiles in a store created for "
            "it: `ProfileStore.create(path, peft_model, adapter_name=name)`."
        )
    # The new profile adapts the template's layers, so it uses the part of the bank the template's fingerprint covers.
    if info["bank_fingerprint"] != template.bank_fingerprint:
        raise ValueError(
            f"Store {store.path} holds profiles of bank {info['bank_fingerprint']} but the model's bank is "
            f"{template.bank_fingerprint}; attach them to a model built with that bank."
        )
    # Heads come from `modules_to_save`: without it there is nothing to find, and no model walk on this fast path.
    model_head = {}
    if template.modules_to_save:
        model_head = _head_shapes(head_schema(_head_tensors(model.get_base_model(), template_name)))
    if info.get("head") is None:
        if model_head:
            raise ValueError(
                f"Store {store.path} was written by xpeft 0.2 (format v1), which kept only the masks of each profile, "
                f"but this model's profiles have a head ({', '.join(model_head)}): attaching would give the profile "
                "the base model's untrained head and silently different outputs. Add the profiles again, with their "
                "heads, to a new store: `ProfileStore.create(path, peft_model)` then `store.add_from(peft_model, "
                "names)`."
            )
        return
    stored_head = _head_shapes(info["head"])
    if stored_head != model_head:
        raise ValueError(
            f"Store {store.path} keeps profiles with head {stored_head or 'none'}, but this model's adapter "
            f"{template_name!r} has head {model_head or 'none'} (`modules_to_save`): the profiles were trained on "
            "another model or task type. Attach them to a model with the same `modules_to_save`."
        )


def _head_shapes(schema: list[list]) -> dict[str, list[int]]:
    return {f"{module}.{key}": list(shape) for module, key, _, shape in schema}


def attach_profile(model, store: ProfileStore, name: str, adapter_name: str | None = None) -> str:
    """Add stored profile `name` to the peft `model` as adapter `adapter_name` (default: `name`); return its name.

    The new adapter copies the config of the model's first X-PEFT adapter, so the model must already hold the bank
    the store was built for, and must have the same head (`modules_to_save`) as the stored profiles: the stored head
    tensors are loaded into the new adapter's copies, so that it gives the outputs of the profile that was stored,
    bit for bit. Without a head the profile is attached directly to the existing X-PEFT layers (two small tensors
    per layer, well under a millisecond for BERT-base); with a head, through peft's `add_adapter`.
    """
    adapter_name = adapter_name or name
    if adapter_name in model.peft_config:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}; pass another `adapter_name`.")
    template_name, template = next(iter(model.peft_config.items()))
    layers = _own_template_layers(model, template_name)
    stored, info = store.read_record(name)  # read and validated before the model changes
    _check_store_fits(model, store, info, template_name, layers)
    logits = unpack_masks(stored.masks, info["mask_type"], info["hard_k"], info["layers"], info["bank_size"])
    config = copy.copy(template)
    forget_source(config)  # a new adapter, whatever folder the template was read from
    config.mask_type, config.hard_k, config.inference_mode = info["mask_type"], info["hard_k"], True
    # Its own list: peft's sequence-classification `add_adapter` extends it in place, which would grow the template's.
    config.modules_to_save = list(template.modules_to_save) if template.modules_to_save else template.modules_to_save
    if not stored.head:
        model.peft_config[adapter_name] = config
        for (_, layer), row in zip(layers, logits, strict=True):
            layer.update_layer(adapter_name, config, init_logits=row)
        return adapter_name
    model.add_adapter(adapter_name, config)
    base_model = model.get_base_model()
    with torch.no_grad():
        for (_, layer), row in zip(xpeft_layers(model, adapter_name), logits, strict=True):
            layer.xpeft_mask_A[adapter_name].copy_(row[0])
            layer.xpeft_mask_B[adapter_name].copy_(row[1])
        for module_name, key, _, _ in info["head"]:
            wrapper = base_model.get_submodule(module_name)
            target = wrapper.state_dict(keep_vars=True)[wrapper.adapter_state_dict_load_map(adapter_name)[key]]
            target.copy_(stored.head[f"{module_name}.{key}"])
    return adapter_name


def extract_adapter(model: nn.Module, adapter_name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """Profile `adapter_name` as a single bottleneck adapter `{layer name: {"A", "a", "B", "b"}}` (for `build_bank`).

    This is the simple way to obtain single adapters with this library: train a profile on any bank, extract its
    composed adapter, and collect N of them (one per earlier task) into a trained bank with `build_bank`.
    """
    with torch.no_grad():
        return {
            layer.layer_name: {
                part: t.detach().cpu().clone()
                for part, t in zip(layer.xpeft_bank.part_names, layer.composed(adapter_name), strict=True)
            }
            for _, layer in _layers_holding(model, adapter_name)
        }


def _saved_bytes(tensors: dict[str, torch.Tensor]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
        return path.stat().st_size


def profile_cost(model, adapter_name: str = "default", lora_r: int = 8) -> dict[str, int]:
    """Trainable parameters and bytes on disk of one profile, next to a full bottleneck adapter and LoRA r=`lora_r`.

    `payload_bytes` and `head_bytes` are the bytes of the masks and of the head (its `modules_to_save` tensors) that
    a [`ProfileStore`] record holds; `profile_file_bytes` is the size of the profile's `adapter_model.safetensors`
    without a head, `with_head_bytes` with it. Baselines: a full bottleneck adapter on the
    same layers (`2rd + r + d` fp32 parameters per layer) and LoRA on peft's default targets for this model type
    (`r(in + out)` per layer), as tensor bytes in safetensors files.
    """
    layers = _layers_holding(model, adapter_name)
    config = model.peft_config[adapter_name]
    payload = profile_payload(model, adapter_name)
    saved = {MASKS_KEY: payload}
    if _saves_logits(config):
        saved[LOGITS_KEY] = pack_masks(_mask_logits(model, adapter_name), "soft", config.hard_k)
    head = {name: tensor for name, (_, _, tensor) in _head_tensors(model.get_base_model(), adapter_name).items()}
    bottleneck = {}
    for name, layer in layers:
        bottleneck[name] = torch.zeros(sum(t[0].numel() for t in layer.xpeft_bank.layer(layer.layer_name)))
    model_type = model.get_base_model().config.model_type
    lora_targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type, [])
    lora = {}
    for name, module in model.get_base_model().named_modules():
        if name.split(".")[-1] not in lora_targets:
            continue
        base = module.get_base_layer() if isinstance(module, XPeftLayer) else module
        try:  # nn.Linear and transformers' Conv1D (GPT-2); LoRA skips other layer types too
            in_features, out_features, _ = layer_features(base, "LoRA")
        except TypeError:
            continue
        lora[name] = torch.zeros(lora_r * (in_features + out_features))
    return {
        "layers": len(layers),
        "bank_size": config.bank_size,
        "trainable_parameters": 2 * len(layers) * config.bank_size,
        "payload_bytes": payload.numel() * payload.element_size(),
        "profile_file_bytes": _saved_bytes(saved),
        "with_head_bytes": _saved_bytes({**saved, **head}),
        "head_parameters": sum(t.numel() for t in head.values()),
        "head_bytes": sum(t.numel() * t.element_size() for t in head.values()),
        "bottleneck_adapter_parameters": sum(t.numel() for t in bottleneck.values()),
        "bottleneck_adapter_file_bytes": _saved_bytes(bottleneck) if bottleneck else 0,
        "lora_parameters": sum(t.numel() for t in lora.values()),
        "lora_file_bytes": _saved_bytes(lora) if lora else 0,
    }
