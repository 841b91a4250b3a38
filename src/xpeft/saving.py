"""Crash-safe `save_pretrained` for peft models that hold xpeft adapters.

peft writes an adapter folder in place: it truncates `adapter_config.json` and `adapter_model.safetensors` and writes
them anew, so a process killed during `save_pretrained(folder)` can leave an old adapter unloadable. `import xpeft`
wraps `peft.PeftModel.save_pretrained` once; when any adapter being saved is an xpeft method (X-PEFT, ETHER, PEDRO) the
call goes through [`save_folder`], otherwise peft's own method runs untouched. Users keep calling
`peft_model.save_pretrained(folder)`.

For a folder `parent/name`, with the names of `xpeft.serialization`:

1. Under the write lock `parent/.{name}.xpeft-lock`, leftovers of killed saves to the same folder are removed
   (`parent/.{name}.xpeft-tmp-<hex>`), and a folder left aside by the fallback below is put back.
2. peft's own `save_pretrained` writes into a fresh `parent/.{name}.xpeft-tmp-<hex>` (with a copy of an existing
   `README.md`, the model card peft updates). Every entry of the existing folder that the new save does not write
   (say the optimizer state of a Trainer checkpoint, or another adapter's sub-folder) is added to it as a hard link
   (a copy where links are impossible). Nothing ever writes into a linked file.
3. Everything is fsynced, then the two folders are exchanged in one step (Linux `renameat2(RENAME_EXCHANGE)`), the
   parent is fsynced and the old tree, now at the temporary name, is deleted.

Where the exchange is unavailable (another OS, or a file system without `RENAME_EXCHANGE`) the swap is two renames:
folder -> `parent/.{name}.xpeft-old`, temporary -> folder. A crash between the two leaves no folder at `parent/name`;
the next `save_pretrained`, `PeftModel.from_pretrained` or `load_adapter` of that folder renames
`.{name}.xpeft-old` back first (under the lock).

After a kill at any moment the folder holds the complete old adapter or the complete new one. What may remain: the
lock file, and until the next save to the same folder a temporary folder or `.{name}.xpeft-old`. A folder that is a
mount point, or whose parent is not writable, cannot be swapped: peft saves it in place and a warning says so.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import inspect
import os
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

from peft import PeftModel

from .serialization import canonical_path, fsync_dir, fsync_file, remove_path, temp_path, write_lock

XPEFT_PEFT_TYPES = frozenset({"XPEFT", "ETHER", "PEDRO"})
OLD_SUFFIX = ".xpeft-old"
_ORIGINAL = "__xpeft_original__"  # marks a wrapper and holds peft's original function

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = None


def old_path(folder: Path) -> Path:
    """Where the fallback swap puts the old folder between its two renames: `.{name}.xpeft-old` next to it."""
    return folder.with_name(f".{folder.name}{OLD_SUFFIX}")


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); `False` where the system cannot."""
    global _renameat2
    if _renameat2 is None:
        function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
        if function is not None:
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
        _renameat2 = function or False
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the kernel or the file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def recover_folder(folder: Path) -> None:
    """Put back a folder that a crash between the two renames of the fallback swap left aside; call under the lock."""
    old = old_path(folder)
    if not os.path.lexists(old):
        return
    if os.path.lexists(folder):
        remove_path(old)  # the swap completed: the old tree is garbage
    else:
        os.rename(old, folder)
        fsync_dir(folder.parent)


def _link_missing(old: Path, new: Path) -> None:
    """Add to folder `new` every entry of folder `old` it does not have, recursing into folders both have."""
    for entry in os.scandir(old):
        source, target = Path(entry.path), new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if not os.path.lexists(target):
                target.mkdir()
                os.chmod(target, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode))
            if target.is_dir() and not target.is_symlink():
                _link_missing(source, target)
        elif os.path.lexists(target):
            continue  # the new save wrote it
        elif entry.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            try:
                os.link(source, target)
            except OSError:  # e.g. a file system without hard links
                shutil.copy2(source, target)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fsync_file(path)
        fsync_dir(folder)


def _swap_in(new: Path, folder: Path) -> None:
    """Put folder `new` at `folder` in one step and delete the folder it replaces."""
    if not os.path.lexists(folder):
        os.rename(new, folder)
        fsync_dir(folder.parent)
        return
    if exchange_paths(new, folder):
        fsync_dir(folder.parent)
        remove_path(new)  # the old tree, now at the temporary name
        return
    old = old_path(folder)
    os.rename(folder, old)
    try:
        os.rename(new, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    fsync_dir(folder.parent)
    remove_path(old)


def _can_swap(folder: Path) -> bool:
    if not folder.parent.exists():
        return True  # the lock creates it
    return not os.path.ismount(folder) and os.access(folder.parent, os.W_OK | os.X_OK)


def save_folder(save, save_directory: str | os.PathLike) -> None:
    """Run `save(directory)` (which writes a folder) so that `save_directory` changes in one step (module docstring)."""
    folder = canonical_path(save_directory)
    with write_lock(folder):
        recover_folder(folder)
        new = temp_path(folder)
        try:
            new.mkdir()
            if folder.is_dir():
                os.chmod(new, stat.S_IMODE(folder.stat().st_mode))
                if (folder / "README.md").is_file():  # peft updates an existing model card in place: give it a copy
                    shutil.copy2(folder / "README.md", new / "README.md")
            save(str(new))
            if folder.is_dir():
                _link_missing(folder, new)
            _fsync_tree(new)
            cwd = _working_folder()
            _swap_in(new, folder)
        except BaseException:
            if os.path.lexists(new):
                remove_path(new)
            raise
        if cwd is not None and (cwd == str(folder) or cwd.startswith(str(folder) + os.sep)):
            os.chdir(cwd)  # the process's working folder was in the old tree: move it to the same place in the new one


def _working_folder() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:  # the working folder was deleted: nothing to move
        return None


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
        if not bound.arguments["is_main_process"]:
            # peft still creates the folders; do the rest of its work (e.g. collect the state dict) somewhere private.
            with tempfile.TemporaryDirectory() as scratch:
                return save(os.path.join(scratch, "adapter"))
        folder = canonical_path(save_directory)
        if not _can_swap(folder):
            warnings.warn(
                f"{folder} is a mount point or its parent folder is not writable, so xpeft cannot replace it in one "
                "step: peft saves it in place, and a crash during the save can leave it unloadable. Save into a "
                "sub-folder (e.g. `save_pretrained(folder / 'adapter')`) to make the save crash-safe.",
                stacklevel=2,
            )
            return save(str(save_directory))
        return save_folder(save, folder)

    setattr(save_pretrained, _ORIGINAL, original)
    return save_pretrained


def _recover_before_load(model_id) -> None:
    if not isinstance(model_id, (str, os.PathLike)):
        return
    folder = canonical_path(model_id)
    if os.path.lexists(old_path(folder)) and not os.path.lexists(folder):
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
