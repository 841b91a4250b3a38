"""Load-time checks shared by xpeft's tuners: the files of an adapter folder and the tensors loaded from them.

peft loads a saved adapter in three steps, and xpeft checks at each one, so that a damaged, edited or mismatched
adapter fails with an error that names the file, the problem and the fix instead of loading silently wrong:

1. `<Config>.from_pretrained(folder)` reads `adapter_config.json` ([`read_adapter_config`]): the JSON, the field values
   (each config's `__post_init__`) and the safetensors header of `adapter_model.safetensors`
   ([`read_safetensors_header`]), before peft reads any tensor. The folder is noted on the config instance (not as a
   field, so it is never saved), so that later errors name the file and a loaded config is told from a new one.
2. The tuner injects the adapter layers ([`check_loaded_config`], from the tuner's `_check_new_adapter_config`).
3. `set_peft_model_state_dict` hands the file's tensors to the tuner's `_remap_adapter_state_dict_for_load`
   ([`check_loaded_tensors`]): every tensor must have a place in the model and every adapter tensor of the model must
   be in the file, with the model's shape, a dtype of its kind and finite values. When a load that added a new
   adapter fails there, the adapter is removed again ([`discard_failed_load`]), so that no half-loaded adapter stays
   selectable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from . import serialization
from .serialization import CorruptFileError  # noqa: F401  (raised through read_safetensors_header)

PEFT_PREFIX = "base_model.model."
# Non-field attributes on a config instance (dataclass fields are what peft saves; these never are).
_LOADED_FROM = "_xpeft_loaded_from"
_PENDING_LOAD = "_xpeft_pending_load"
_LIKELY_CAUSE = (
    "Likely cause: adapter_config.json was edited after saving, or the adapter was saved from another base model "
    "(other layer sizes or number of layers). Load it with the config and base model it was saved with, or re-save it "
    "from that model with `save_pretrained`."
)


@dataclass(frozen=True)
class LoadedFrom:
    """Where a config was read from: `config_file` is the folder's `adapter_config.json`, and `state` the identity of
    the folder's files when it was read ([`folder_state`])."""

    config_file: Path
    state: tuple = ()

    @property
    def folder(self) -> Path:
        return self.config_file.parent

    def weights_file(self) -> Path | None:
        """The folder's weights file as peft picks it (safetensors first), or None if there is none."""
        for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
            if (self.folder / name).is_file():
                return self.folder / name
        return None


def folder_state(folder: Path) -> tuple:
    """The identity of an adapter folder's files (inode and modification time of the config and of each weights
    format) and whether a save is committing into it (its backup `.{name}.xpeft-old` exists, see `xpeft.saving`).
    A save replaces files by renames, so any save between two calls changes it."""
    files = []
    for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME):
        try:
            info = os.stat(folder / name)
        except FileNotFoundError:
            files.append(None)
        else:
            files.append((info.st_ino, info.st_mtime_ns))
    return (*files, os.path.lexists(serialization.backup_path(folder)))


def check_folder_unchanged(source: LoadedFrom) -> None:
    """Refuse a load during which the folder was saved again: its config and weights may be of two versions."""
    if source.state and folder_state(source.folder) != source.state or source.state and source.state[-1]:
        raise ValueError(
            f"{source.folder} changed while it was being loaded: a `save_pretrained` to it ran at the same time, so "
            "its config and its weights may belong to different versions. Load it again."
        )


def read_safetensors_header(
    path: str | os.PathLike, fix: str = "Re-save the adapter with `save_pretrained` (or copy the file again)."
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{tensor name: (dtype, shape)}` from the checked header of a safetensors file (see
    [`serialization.read_safetensors_header`]).

    Raises:
        CorruptFileError: naming the file, what is wrong with it and `fix`.
    """
    header = serialization.read_safetensors_header(path, fix=fix)
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items() if name != "__metadata__"}


def _read_config_json(config_file: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(config_file.read_text())
    except ValueError as error:  # includes UnicodeDecodeError
        raise ValueError(
            f"{config_file} is not valid JSON ({error}): the file is corrupted or was edited by hand. Fix the JSON, "
            "or re-save the adapter with `save_pretrained`."
        ) from error
    if not isinstance(loaded, dict):
        raise ValueError(
            f"{config_file} holds a JSON {type(loaded).__name__}, not an object of config fields; re-save the "
            "adapter with `save_pretrained`."
        )
    if loaded.get("peft_type") not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(
            f"{config_file} names peft_type {loaded.get('peft_type')!r}, which no installed peft method has "
            "(`import xpeft` adds 'ETHER', 'PEDRO' and 'XPEFT'). Restore the `peft_type` the adapter was saved with."
        )
    return loaded


def read_adapter_config(
    load: Callable[..., PeftConfig], path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
) -> PeftConfig:
    """Run peft's `PeftConfig.from_pretrained` (`load`) on a local adapter folder with checks that name its files.

    Checks the JSON of `adapter_config.json` and the header of `adapter_model.safetensors` before peft reads any
    tensor, prefixes the config's own errors (`__post_init__`) with the file, and notes the folder on the config. A
    path that is not a local folder (a Hub repository id) goes to peft unchanged.
    """
    folder = Path(path, subfolder) if subfolder else Path(path)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        return load(path, subfolder, **kwargs)
    state = folder_state(folder)
    _read_config_json(config_file)
    source = LoadedFrom(config_file, state)
    weights_file = source.weights_file()
    if weights_file is not None and weights_file.name == SAFETENSORS_WEIGHTS_NAME:
        read_safetensors_header(weights_file)
    try:
        config = load(path, subfolder, **kwargs)
    except ValueError as error:
        raise ValueError(
            f"{config_file}: {error} Correct the field in the file, or re-save the adapter with `save_pretrained`."
        ) from error
    setattr(config, _LOADED_FROM, source)
    return config


def loaded_from(config: PeftConfig) -> LoadedFrom | None:
    """Where `config` was read from by its `from_pretrained`, or None for a config created in code."""
    return getattr(config, _LOADED_FROM, None)


def forget_source(config: PeftConfig) -> None:
    """Make a copy of a loaded config a new one (e.g. the template of an adapter that is not loaded from a file)."""
    vars(config).pop(_LOADED_FROM, None)
    vars(config).pop(_PENDING_LOAD, None)


def weights_source(config: PeftConfig) -> str:
    """How errors name the weights file being loaded for `config`."""
    source = loaded_from(config)
    weights_file = source.weights_file() if source else None
    if weights_file is None:
        return "The adapter weights being loaded (from a folder whose config was not read: the config was passed in)"
    return str(weights_file)


def check_loaded_config(config: PeftConfig) -> None:
    """At injection: refuse to load a folder that has a config but no weights, and note that the weights of a loaded
    config are still to come (see [`discard_failed_load`]).

    A config read from a folder without weights may also be a template for a new adapter; that one is trained, so
    only a config that is to be used for inference (`inference_mode=True`, as `PeftModel.from_pretrained` sets by
    default) is refused.
    """
    source = loaded_from(config)
    setattr(config, _PENDING_LOAD, source is not None)
    if source is None or source.weights_file() is not None or not config.inference_mode:
        return
    raise FileNotFoundError(
        f"{source.folder} holds {CONFIG_NAME} but no {SAFETENSORS_WEIGHTS_NAME}: the adapter was not saved completely, "
        "or its weights file was moved or renamed. Put the weights file back, or re-save the adapter with "
        "`save_pretrained`. (To train a new adapter from this config, set `config.inference_mode = False`.)"
    )


def discard_failed_load(model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
    """Remove an adapter that was added by the load that just failed (`load_adapter` adds it inactive), so that it
    cannot be selected with its initial weights. The model's only adapter (`PeftModel.from_pretrained`, which fails
    as a whole) and an active one (not added by this load) stay."""
    added_by_this_load = getattr(config, _PENDING_LOAD, False)
    if added_by_this_load and isinstance(model, PeftModel) and adapter_name not in model.active_adapters:
        model.delete_adapter(adapter_name)


def finish_load(config: PeftConfig) -> None:
    setattr(config, _PENDING_LOAD, False)


def _auxiliary_keys(model: nn.Module, adapter_name: str) -> set[str]:
    """Model keys of the `modules_to_save` (and other auxiliary) copies that belong to `adapter_name`."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            keys |= {f"{name}.{key}" for key in module.adapter_state_dict_load_map(adapter_name).values()}
    return keys


def _listed(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(key) for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_loaded_tensors(
    model: nn.Module,
    config: PeftConfig,
    adapter_name: str,
    state_dict: dict[str, torch.Tensor],
    checkpoint_key: Callable[[str, str], str],
) -> None:
    """Check a loaded adapter's tensors (`state_dict`, already remapped to the model's keys) against the model.

    `checkpoint_key(model_key, adapter_name)` gives a key as the file names it (the tuner's
    `_remove_adapter_name_from_key`), for the messages.

    Raises:
        ValueError: naming the file and the tensor, for a tensor the model has no place for, an adapter tensor of the
            model that the file lacks, a shape other than the model's, an integer tensor where the model has a
            floating-point one (or the reverse), or NaN/inf values.
    """
    if loaded_from(config) is not None:
        check_folder_unchanged(loaded_from(config))
    source = weights_source(config)
    method = getattr(config.peft_type, "value", config.peft_type)
    model_state = model.state_dict()
    if not any(key.startswith(PEFT_PREFIX) for key in model_state):  # layers injected into a plain model
        state_dict = {key.removeprefix(PEFT_PREFIX): value for key, value in state_dict.items()}
    expected = _filter_state_dict_by_key_prefixes(model_state, _get_tuner_state_dict_key_prefixes(model, adapter_name))
    unexpected = sorted(set(state_dict) - set(expected) - _auxiliary_keys(model, adapter_name))
    if unexpected:
        raise ValueError(
            f"{source} holds {len(unexpected)} tensor(s) that this model's {method} adapter {adapter_name!r} has no "
            f"place for: {_listed(unexpected)}; loading would silently drop them. {_LIKELY_CAUSE}"
        )
    missing = sorted(checkpoint_key(key, adapter_name) for key in set(expected) - set(state_dict))
    if missing:
        raise ValueError(
            f"{source} lacks {len(missing)} tensor(s) that this model's {method} adapter {adapter_name!r} needs: "
            f"{_listed(missing)}; they would keep their initial values. {_LIKELY_CAUSE}"
        )
    for key, tensor in state_dict.items():
        name, target = checkpoint_key(key, adapter_name), model_state[key]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {list(tensor.shape)} but this model's adapter {adapter_name!r} "
                f"expects {list(target.shape)}. {_LIKELY_CAUSE}"
            )
        if tensor.is_floating_point() != target.is_floating_point():
            raise ValueError(
                f"{source}: tensor {name!r} has dtype {tensor.dtype}, but the model's is {target.dtype}: the file was "
                "not written by `save_pretrained`, or it is corrupted. Re-save the adapter."
            )
        bad = tensor.numel() - int(torch.isfinite(tensor).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise ValueError(
                f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}: the file is "
                "corrupted, or the adapter diverged in training. Re-save it from a healthy model, or retrain it "
                "(e.g. with a lower learning rate)."
            )
