"""Crash-safe `save_pretrained` for peft models that hold xpeft adapters.

peft writes an adapter folder in place: it truncates `adapter_config.json` and `adapter_model.safetensors` and writes
them anew, so a process killed during `save_pretrained(folder)` can leave an old adapter unloadable. `import xpeft`
wraps `peft.PeftModel.save_pretrained` once; when any adapter being saved is an xpeft method (X-PEFT, ETHER, PEDRO) the
call goes through [`save_folder`], otherwise peft's own method runs untouched. Users keep calling
`peft_model.save_pretrained(folder)`.

For a folder `parent/name`, with the names of `xpeft.serialization`, under the write lock `parent/.{name}.xpeft-lock`:

1. An interrupted earlier save of the folder is rolled back ([`recover_folder`]), and leftovers of killed saves
   (`parent/.{name}.xpeft-tmp-<hex>`) are removed.
2. peft's own `save_pretrained` writes the complete new adapter into a fresh `parent/.{name}.xpeft-tmp-<hex>` (with a
   copy of an existing `README.md`, the model card peft updates), and its files are fsynced.
3. Commit: every file of the folder that the save replaces (or makes stale: the other weights format) is hard-linked
   into a backup folder, with a manifest of the files the commit touches; the backup is renamed to
   `parent/.{name}.xpeft-old` in one step. Then each new file is renamed over its old one (configs last), stale ones
   are removed, and renaming the backup away is the commit point.

Sharded models (FSDP2 `fully_shard`, FSDP1, DTensor tensor parallelism) are refused before anything is computed, and
so is a `state_dict=` that still holds sharded, empty or missing adapter tensors: gathering a full state dict is a
collective every rank must join, which a save on rank 0 alone cannot start (it would wait forever). The recipe, in the
error and in examples/fsdp2_train.py: `get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
cpu_offload=True))` on every rank, then `model.save_pretrained(folder, state_dict=state)` on rank 0.

Only the files the save writes are touched: whatever else is in the folder (a Trainer checkpoint's optimizer state,
files other ranks write into it at the same time, other adapters' sub-folders, mount points) stays as it is. A crash
before the commit point leaves `.{name}.xpeft-old`, and the next `save_pretrained`, `PeftModel.from_pretrained` or
`load_adapter` of the folder puts the old files back first: the old adapter loads. What may remain: the lock file and,
until the next save to the same folder, temporaries.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

from .serialization import backup_path, canonical_path, fsync_dir, fsync_file, remove_path, temp_path, write_lock

XPEFT_PEFT_TYPES = frozenset({"XPEFT", "ETHER", "PEDRO"})
_ORIGINAL = "__xpeft_original__"  # marks a wrapper and holds peft's original function

MANIFEST = ".xpeft-manifest"  # in the backup folder: the files a commit touches, as paths relative to the folder
# Weights files peft writes; saving one makes the other format stale (peft would load the stale safetensors first).
WEIGHTS_FORMATS = ("adapter_model.safetensors", "adapter_model.bin")


def recover_folder(folder: Path) -> None:
    """Roll back a commit that a crash interrupted (its backup is still there): put back every file it replaced and
    remove every file it added. Idempotent, so a crash during the rollback is rolled back again. Call under the
    folder's write lock."""
    backup = backup_path(folder)
    if not os.path.lexists(backup):
        return
    touched = json.loads((backup / MANIFEST).read_text())
    for relative in touched:
        saved, current = backup / relative, folder / relative
        if os.path.lexists(saved):
            # A new link of the saved file moves into place; the backup keeps its own until it is dropped.
            restoring = saved.with_name(saved.name + ".restoring")
            if os.path.lexists(restoring):
                os.unlink(restoring)
            os.link(saved, restoring)
            current.parent.mkdir(parents=True, exist_ok=True)
            os.replace(restoring, current)
        elif os.path.lexists(current):
            os.unlink(current)
    _fsync_folders(folder, touched)
    _drop(backup, folder)


def _drop(path: Path, folder: Path) -> None:
    """Remove `path` by first renaming it to a temporary of `folder` (one step), so that a crash never leaves half of
    it under its own name."""
    doomed = temp_path(folder)
    os.rename(path, doomed)
    fsync_dir(folder.parent)
    remove_path(doomed)


def _files(root: Path) -> list[str]:
    """The files under `root`, relative, each folder's `adapter_config.json` last (it names what the weights are)."""
    found = [str(Path(top, name).relative_to(root)) for top, _, names in os.walk(root) for name in names]
    return sorted(found, key=lambda relative: (Path(relative).name == "adapter_config.json", relative))


def _stale_formats(folder: Path, written: list[str]) -> list[str]:
    """Files of `folder` in the other weights format than one the save wrote next to them."""
    stale = []
    for relative in written:
        path = Path(relative)
        if path.name in WEIGHTS_FORMATS:
            for other in WEIGHTS_FORMATS:
                candidate = str(path.with_name(other))
                if other != path.name and candidate not in written and os.path.isfile(folder / candidate):
                    stale.append(candidate)
    return stale


def _fsync_folders(folder: Path, relatives: list[str]) -> None:
    for parent in {(folder / relative).parent for relative in relatives}:
        if parent.is_dir():
            fsync_dir(parent)


def _commit(staged: Path, folder: Path) -> None:
    """Move the files of `staged` into `folder` as one change (module docstring, step 3)."""
    written = _files(staged)
    stale = _stale_formats(folder, written)
    touched = [*stale, *written]
    backup = temp_path(folder)
    backup.mkdir()
    for relative in touched:
        source = folder / relative
        if os.path.isfile(source) and not os.path.islink(source):
            (backup / relative).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, backup / relative)
            except OSError:  # e.g. a file system without hard links
                shutil.copy2(source, backup / relative)
    (backup / MANIFEST).write_text(json.dumps(touched))
    for path in (*(backup / relative for relative in touched if os.path.lexists(backup / relative)), backup / MANIFEST):
        fsync_file(path)
    _fsync_folders(backup, [*touched, MANIFEST])
    os.rename(backup, backup_path(folder))  # from here on, a crash rolls the folder back
    fsync_dir(folder.parent)
    for relative in stale:
        os.unlink(folder / relative)
    for relative in written:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged / relative, folder / relative)
    _fsync_folders(folder, touched)
    _drop(backup_path(folder), folder)  # the commit point


def save_folder(save, save_directory: str | os.PathLike) -> None:
    """Run `save(directory)` (which writes an adapter folder) so that `save_directory` changes as one step (module
    docstring)."""
    folder = canonical_path(save_directory)
    with write_lock(folder):
        recover_folder(folder)
        staged = temp_path(folder)
        try:
            staged.mkdir()
            if (folder / "README.md").is_file():  # peft updates an existing model card: give it a copy
                shutil.copy2(folder / "README.md", staged / "README.md")
            save(str(staged))
            for relative in _files(staged):
                fsync_file(staged / relative)
            folder.mkdir(parents=True, exist_ok=True)
            _commit(staged, folder)
        except BaseException:
            recover_folder(folder)  # a commit that failed half-way (e.g. disk full) is undone at once
            raise
        finally:
            if os.path.lexists(staged):
                remove_path(staged)


FULL_STATE_DICT_RECIPE = (
    "Gather a full state dict on every rank first, then save on rank 0 only: `state = torch.distributed.checkpoint."
    "state_dict.get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))` on all "
    "ranks, then `model.save_pretrained(folder, state_dict=state)` on rank 0 (examples/fsdp2_train.py). xpeft never "
    "gathers inside save_pretrained: a gather is a collective, and one started by rank 0 alone waits forever."
)
# Module names the wrappers of FSDP1 and activation checkpointing insert between a model's own module names.
_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _sharding_wrapper(model: torch.nn.Module) -> str | None:
    """How `model` is sharded across ranks (a description), or None for a model every rank holds whole."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for module in model.modules():
        if isinstance(module, FSDPModule):
            return "sharded with FSDP2 (`fully_shard`)"
        if isinstance(module, FullyShardedDataParallel):
            return "wrapped in FSDP1 (`FullyShardedDataParallel`)"
    return None


def _is_sharded(tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor_problem(tensor) -> str | None:
    """Why `tensor` cannot be written as a saved adapter tensor (sharded, not a plain tensor, or empty), or None."""
    if _is_sharded(tensor):
        return "is a sharded DTensor"
    if not isinstance(tensor, torch.Tensor) or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return f"is a {type(tensor).__module__}.{type(tensor).__qualname__}, not a plain tensor (a sharded state dict?)"
    if tensor.numel() == 0:
        return f"is empty (shape {list(tensor.shape)}), as FSDP1 leaves the parameters a rank does not hold"
    return None


def check_full_tensor(key: str, tensor) -> None:
    """Refuse to save `tensor` under `key` if it is sharded or empty (see [`full_tensor_problem`])."""
    problem = full_tensor_problem(tensor)
    if problem is not None:
        raise ValueError(f"Cannot save adapter tensor {key!r}: it {problem}. {FULL_STATE_DICT_RECIPE}")


def _adapter_keys(keys, adapter_names: list[str], prefixes: tuple[str, ...]) -> dict[str, str]:
    """The keys among `keys` that hold a tensor of one of `adapter_names` (peft's naming: `...{prefix}X.{adapter}...`),
    as `{key without FSDP1/checkpoint wrapper names: key}`."""
    found = {}
    for key in keys:
        parts = [part for part in key.split(".") if part not in _WRAPPER_NAMES]
        if any(part in adapter_names and parts[i - 1].startswith(prefixes) for i, part in enumerate(parts) if i):
            found[".".join(parts)] = key
    return found


def check_saveable(model: PeftModel, adapter_names: list[str], state_dict: dict | None) -> None:
    """Refuse, before anything is computed or written, a save that would need a collective or write a shard.

    Without `state_dict`, the model must not be sharded and its adapter tensors must be whole; with one, every adapter
    tensor of the model must be in it, whole."""
    types = (model.peft_config[name].peft_type for name in adapter_names)
    prefixes = tuple(filter(None, (PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) for peft_type in types)))
    if state_dict is None:
        wrapper = _sharding_wrapper(model)
        if wrapper is not None:
            raise ValueError(f"Cannot save the adapters of a model {wrapper} directly. {FULL_STATE_DICT_RECIPE}")
        tensors = dict(model.named_parameters())
        for key in _adapter_keys(tensors, adapter_names, prefixes).values():
            check_full_tensor(key, tensors[key])
        return
    given = _adapter_keys(state_dict, adapter_names, prefixes)
    held = _adapter_keys((name for name, _ in model.named_parameters()), adapter_names, prefixes)
    missing = sorted(set(held) - set(given))
    if missing:
        raise ValueError(
            f"The state_dict passed to save_pretrained lacks {len(missing)} adapter tensor(s), e.g. {missing[0]!r}: "
            f"pass the whole model's state dict, with the keys of `model.state_dict()`. {FULL_STATE_DICT_RECIPE}"
        )
    for key in given.values():
        check_full_tensor(key, state_dict[key])


def _saves_xpeft(model: PeftModel, selected_adapters) -> bool:
    names = list(model.peft_config) if selected_adapters is None else selected_adapters
    types = [getattr(model.peft_config.get(name), "peft_type", None) for name in names]
    return any(getattr(peft_type, "value", peft_type) in XPEFT_PEFT_TYPES for peft_type in types)


def _wrap_save_pretrained(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        try:
            bound = signature.bind(self, save_directory, *args, **kwargs)
        except TypeError:
            return original(self, save_directory, *args, **kwargs)  # peft's own error
        bound.apply_defaults()
        selected = bound.arguments["selected_adapters"]
        if not _saves_xpeft(self, selected):
            return original(*bound.args, **bound.kwargs)
        if selected is not None and any(name not in self.peft_config for name in selected):
            return original(*bound.args, **bound.kwargs)  # peft's own error names the valid adapters

        def save(directory: str):
            bound.arguments["save_directory"] = directory
            return original(*bound.args, **bound.kwargs)

        if os.path.isfile(save_directory):
            return original(*bound.args, **bound.kwargs)  # peft's own error: a file is not a folder
        state_dict = bound.arguments["kwargs"].get("state_dict")
        names = list(self.peft_config) if selected is None else list(selected)
        if not bound.arguments["is_main_process"]:
            if state_dict is not None or _sharding_wrapper(self) is not None:
                return None  # nothing to write here, and computing the payload could start a collective
        else:
            check_saveable(self, names, state_dict)
        if not bound.arguments["is_main_process"]:
            # peft still creates the folders; do the rest of its work (e.g. collect the state dict) somewhere private.
            with tempfile.TemporaryDirectory() as scratch:
                return save(os.path.join(scratch, "adapter"))
        folder = canonical_path(save_directory)
        return save_folder(save, folder)

    setattr(save_pretrained, _ORIGINAL, original)
    return save_pretrained


def _recover_before_load(model_id) -> None:
    if not isinstance(model_id, (str, os.PathLike)):
        return
    folder = canonical_path(model_id)
    if os.path.lexists(backup_path(folder)):  # a save was interrupted (or is committing: the lock waits for it)
        with write_lock(folder):
            recover_folder(folder)


def _wrap_from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        _recover_before_load(model_id)
        return original(cls, model, model_id, *args, **kwargs)

    setattr(from_pretrained, _ORIGINAL, original)
    return from_pretrained


def _wrap_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, *args, **kwargs):
        _recover_before_load(model_id)
        return original(self, model_id, *args, **kwargs)

    setattr(load_adapter, _ORIGINAL, original)
    return load_adapter


def _original(function):
    return getattr(function, _ORIGINAL, function)


def install() -> None:
    """Wrap `PeftModel.save_pretrained`, `from_pretrained` and `load_adapter` (idempotent: wraps peft's originals)."""
    PeftModel.save_pretrained = _wrap_save_pretrained(_original(PeftModel.__dict__["save_pretrained"]))
    PeftModel.load_adapter = _wrap_load_adapter(_original(PeftModel.__dict__["load_adapter"]))
    from_pretrained = _original(PeftModel.__dict__["from_pretrained"].__func__)
    PeftModel.from_pretrained = classmethod(_wrap_from_pretrained(from_pretrained))


install()
