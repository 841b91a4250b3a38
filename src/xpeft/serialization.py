"""Safetensors I/O shared by xpeft's own files (banks, profile stores): atomic writes, checked reads, fingerprints.

Every file xpeft writes goes through [`atomic_save_file`]: the tensors are written to a temporary file in the target
directory, flushed to disk, then renamed over the target in one step. A failure at any point leaves an existing file
untouched. (Adapter folders written by peft's own `save_pretrained` are written by peft, not by this module.)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """Yield a temporary file name next to `path`; on success it replaces `path` in one step, on failure it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield tmp_name
        with open(tmp_name, "rb") as tmp_file:
            os.fsync(tmp_file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `tensors` (and string `metadata`) to the safetensors file `path` atomically; return the path."""
    path = Path(path)
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    with _atomic_target(path) as tmp_name:
        save_file(contiguous, tmp_name, metadata=dict(metadata) if metadata else None)
    return path


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Read only the header metadata of a safetensors file, with a clear error for a missing or broken file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No safetensors file at {path}.")
    try:
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            if header_size <= 0 or header_size > path.stat().st_size - 8:
                raise ValueError("header size out of range")
            header = json.loads(file.read(header_size))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file ({error}); it may be truncated or corrupted. Re-create it from "
            "its source (re-save the profile or bank)."
        ) from error
    return dict(header.get("__metadata__") or {})


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
