"""Crash-safe, multi-writer file I/O shared by everything xpeft writes (banks, profile stores, adapter folders).

**Writes.** Every file xpeft writes goes through [`atomic_save_file`] (or [`replace_file`]); every folder written by
`save_pretrained` of a peft model holding an xpeft adapter goes through `xpeft.saving`. Both follow one protocol for a
target `parent/name`:

1. Take an OS file lock ([`write_lock`]: `filelock.FileLock`, released by the OS when the process dies) on the
   sibling lock file `parent/.{name}.xpeft-lock`, so that writes to one path run one at a time across threads and
   processes. The lock is re-entrant within a thread.
2. Under the lock, delete what earlier killed writes to the same path left behind: temporary files or folders named
   `parent/.{name}.xpeft-tmp-<32 hex digits>`. Only the lock holder creates them, so any found there are stale.
3. Write the new version to a fresh temporary `parent/.{name}.xpeft-tmp-<hex>` and fsync it.
4. Put it in place in one step (a rename; adapter folders are committed file by file with a rollback, see `xpeft.saving`), then fsync `parent`.

Readers never lock: they see the old version or the new one, never a mix, and a process killed at any moment leaves
the old version (or the new one) in place. After a crash two kinds of files may remain: the lock file (empty; kept on
purpose, since deleting it would let two writers lock two different files) and, until the next write to the same
path, a temporary file or folder. A new file gets mode `0o666 & ~umask`, like any file created with `open()`; a
replaced file keeps the mode of the file it replaces. A symbolic link as target is followed: its target is replaced.

**Reads.** [`read_safetensors_header`], [`read_safetensors_metadata`] and [`load_checked`] turn a missing, truncated or
corrupted file into an error that names the file and says to re-create it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from filelock import FileLock
from safetensors import SafetensorError
from safetensors.torch import load_file, save

LOCK_SUFFIX = ".xpeft-lock"
TEMP_INFIX = ".xpeft-tmp-"
_RECREATE = "Re-create it from its source (re-save the profile or bank)."

# Paths whose write lock the current thread holds (canonical paths), for re-entrance.
_held = threading.local()


def _held_paths() -> set[Path]:
    if not hasattr(_held, "paths"):
        _held.paths = set()
    return _held.paths


# A forked child does not hold its parent's locks in the sense of this module: forget them.
os.register_at_fork(after_in_child=lambda: _held_paths().clear())


def canonical_path(path: str | os.PathLike) -> Path:
    """The absolute path with symbolic links resolved: one lock per file, whichever link it is written through."""
    return Path(os.path.realpath(path))


def lock_path(path: Path) -> Path:
    """The lock file of writes to `path`: `.{name}.xpeft-lock` next to it."""
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def backup_path(path: Path) -> Path:
    """Where an unfinished adapter-folder commit keeps the files it replaces: `.{name}.xpeft-old` next to `path`
    (see `xpeft.saving`)."""
    return path.with_name(f".{path.name}.xpeft-old")


def temp_path(path: Path) -> Path:
    """A fresh temporary name for a new version of `path`: `.{name}.xpeft-tmp-<32 hex digits>` next to it."""
    return path.with_name(f".{path.name}{TEMP_INFIX}{secrets.token_hex(16)}")


def _is_temp_of(path: Path, entry_name: str) -> bool:
    return re.fullmatch(re.escape(f".{path.name}{TEMP_INFIX}") + "[0-9a-f]{32}", entry_name) is not None


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree at `path`, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files and folders of earlier (killed) writes to `path`; call with its lock held."""
    removed = []
    for entry in os.scandir(path.parent):
        if _is_temp_of(path, entry.name):
            remove_path(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


@contextmanager
def write_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of `path` and yield its canonical path; stale temporaries of `path` are removed first.

    Re-entrant within a thread: a nested `write_lock` of the same path is a no-op, so a read-modify-write (e.g.
    `ProfileStore.add`) can hold the lock around its read and its [`atomic_save_file`].
    """
    path = canonical_path(path)
    held = _held_paths()
    if path in held:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path(path)):
        held.add(path)
        try:
            remove_stale_temporaries(path)
            yield path
        finally:
            held.discard(path)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (e.g. a rename into it) to disk."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals its renames itself
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_temp_file(path: Path) -> tuple[Path, BinaryIO]:
    """Create and open a temporary file for `path`: mode `0o666 & ~umask`, or the mode of the existing `path`."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            pass  # a new file: the kernel applied the umask to 0o666, as for any new file
        else:
            os.chmod(fd, mode)  # as an in-place overwrite would, keep the mode of the file being replaced
        return tmp, os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise


def replace_file(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write a new version of the file `path` with `write(file)` and put it in place atomically; return `path`.

    The protocol of the module docstring: under the write lock of `path`, `write` fills a fresh temporary file (open
    for binary writing), which is fsynced and renamed over `path`. If `write` raises, the temporary is removed and
    `path` is untouched. `write` must write through the file it is given: a library that writes a path itself may
    put its own temporary file next to it, which a killed write would leave behind under a name no one cleans up
    (safetensors' `save_file` does: `.tmpXXXXXX`).
    """
    with write_lock(path) as target:
        tmp, file = _open_temp_file(target)
        try:
            with file:
                write(file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
    return Path(path)


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `tensors` (and string `metadata`) to the safetensors file `path` atomically; return the path.

    The file is serialized in memory first (it needs as much memory again as the tensors), then written through the
    temporary file of [`replace_file`].
    """
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    # `save` is looked up at call time, so that tests can make it fail.
    return replace_file(path, lambda file: file.write(save(contiguous, metadata=dict(metadata) if metadata else None)))


class CorruptFileError(ValueError, SafetensorError):
    """A file that cannot be a valid safetensors file. Also a `SafetensorError`, the error safetensors itself raises
    for such files, so that code catching that keeps working."""


# Bytes per element of the safetensors dtypes; an unknown (newer) dtype only skips its own size check.
SAFETENSORS_ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def _parse_header(path: Path, file_size: int, read_at: Callable[[int, int], bytes], fix: str) -> dict:
    """The JSON header of a safetensors file, after checking that it is well-formed and that its tensors tile the data
    that follows it exactly (what a truncated file fails)."""

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(
            f"Error while deserializing header of {path}: {reason}. The file is truncated or corrupted. {fix}"
        )

    prefix = read_at(0, 8)
    if len(prefix) < 8:
        raise corrupt(f"the file has {file_size} bytes, fewer than the 8 that give the header's length")
    header_size = int.from_bytes(prefix, "little")
    if header_size > file_size - 8:
        raise corrupt(f"the header length {header_size} exceeds the {file_size - 8} bytes after it")
    try:
        header = json.loads(read_at(8, header_size))
    except ValueError as error:  # includes UnicodeDecodeError
        raise corrupt(f"the header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(n, int) and n >= 0 for n in (*shape, start, end)) or start > end:
                raise ValueError
        except (TypeError, KeyError, ValueError) as error:
            raise corrupt(f"the entry of tensor {name!r} is malformed ({entry!r})") from error
        item_bytes = SAFETENSORS_ITEM_BYTES.get(dtype)
        if item_bytes is not None and end - start != math.prod(shape) * item_bytes:
            raise corrupt(f"tensor {name!r} ({dtype} {list(shape)}) spans {end - start} bytes")
        spans.append((start, end, name))
    position, data_bytes = 0, file_size - 8 - header_size
    for start, end, name in sorted(spans):
        if start != position:
            raise corrupt(f"the data of tensor {name!r} starts at byte {start}, expected {position}")
        position = end
    if position != data_bytes:
        raise corrupt(f"the header lists {position} bytes of tensor data, but the file holds {data_bytes}")
    return header


def read_safetensors_header(path: str | os.PathLike, fd: int | None = None, fix: str = _RECREATE) -> dict:
    """The whole JSON header of a safetensors file (tensor entries and `__metadata__`), checked against its size.

    With `fd` (an open descriptor of the file; POSIX only) the header is read from that descriptor with positioned
    reads, so that it describes exactly the version of the file the descriptor holds.
    """
    path = Path(path)
    if fd is not None:
        return _parse_header(path, os.fstat(fd).st_size, lambda offset, size: os.pread(fd, size, offset), fix)
    if not path.is_file():
        raise FileNotFoundError(f"No safetensors file at {path}.")
    with open(path, "rb") as file:

        def read_at(offset: int, size: int) -> bytes:
            file.seek(offset)
            return file.read(size)

        return _parse_header(path, os.fstat(file.fileno()).st_size, read_at, fix)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Read only the header metadata of a safetensors file, with a clear error for a missing or broken file."""
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def load_checked(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning truncation or corruption into a `ValueError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No safetensors file at {path}.")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"Could not read {path}: {error}. The file is truncated or corrupted; re-create it from its source "
            "(re-save the profile or bank)."
        ) from error


def tensor_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of `tensors`, in sorted name order (hex, 64 characters)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recipe_fingerprint(recipe: Mapping[str, object]) -> str:
    """SHA-256 of a JSON-serializable recipe (e.g. a seeded bank's seed, shapes and dtype), key order independent."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
