"""Profile payloads (the masks of one profile as one tensor) and a profile store holding thousands of them.

A profile's payload is what `save_pretrained` writes and what the store keeps per profile:

- soft masks: the logits as float32 `[L, 2, N]` (`[:, 0]` is `S_A`, `[:, 1]` is `S_B`);
- hard masks: only which adapters are selected, bit-packed: `ceil(2·L·N / 8)` bytes of uint8 (300 bytes for L=12,
  N=100). Unpacked, the selected logits are 1 and the others 0, which selects the same top-k.

The store is one safetensors file: a `[P, payload bytes]` uint8 tensor (float32 `[P, L, 2, N]` for soft masks), one
fixed-size record per profile, with the names, bank fingerprint and geometry in the header metadata.
[`ProfileStore.get`] reads one record with one positioned read, without reading the others.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import torch

from ..serialization import atomic_save_file, read_safetensors_header, write_lock

STORE_FORMAT = "xpeft-profile-store/v1"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_masks(logits: torch.Tensor, mask_type: str, hard_k: int) -> torch.Tensor:
    """Encode a profile's mask logits `[L, 2, N]` as its payload (see the module docstring)."""
    if mask_type == "soft":
        return logits.detach().float().cpu().contiguous()
    index = logits.detach().cpu().topk(hard_k, dim=-1).indices
    bits = torch.zeros(logits.shape, dtype=torch.uint8).scatter_(-1, index, 1).flatten()
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)]).view(-1, 8)
    return (bits * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_masks(payload: torch.Tensor, mask_type: str, hard_k: int, layers: int, bank_size: int) -> torch.Tensor:
    """Decode a payload into mask logits `[layers, 2, bank_size]`, with a clear error if it cannot be a profile.

    Leading dimensions are kept, so `[P, ...]` payloads of P profiles decode (and are checked) in one call.
    """
    shape = (layers, 2, bank_size)
    lead = payload.shape[: payload.dim() - (3 if mask_type == "soft" else 1)]
    if mask_type == "soft":
        if payload.dtype != torch.float32 or tuple(payload.shape[len(lead) :]) != shape:
            raise ValueError(
                f"Soft X-PEFT masks must be float32 of shape {list(shape)} (layers, A/B, bank_size) for this model, "
                f"got {payload.dtype} {list(payload.shape)}: the profile was saved for another model or config."
            )
        if not torch.isfinite(payload).all():
            raise ValueError("The profile's mask logits contain NaN or inf: the file is corrupted; re-save it.")
        return payload.clone()
    nbytes = math.ceil(math.prod(shape) / 8)
    if payload.dtype != torch.uint8 or payload.dim() < 1 or payload.shape[-1] != nbytes:
        raise ValueError(
            f"Hard X-PEFT masks for this model are {nbytes} bytes of uint8 (2 x {layers} layers x {bank_size} bits), "
            f"got {payload.dtype} {list(payload.shape)}: the profile was saved for another model or config."
        )
    bits = (payload.cpu()[..., None] >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1
    bits = bits.reshape(*lead, nbytes * 8)[..., : math.prod(shape)].reshape(*lead, *shape)
    counts = bits.sum(-1)
    if not (counts == hard_k).all():
        raise ValueError(
            f"Hard masks must select exactly hard_k={hard_k} adapters per layer, found counts "
            f"{sorted(set(counts.flatten().tolist()))}: the profile is corrupted or was saved with another hard_k."
        )
    return bits.float()


_CREATE = (
    "create one with `ProfileStore.create(path, peft_model.peft_config[adapter_name], layers=...)`, `layers` being the "
    "number of adapted layers, then fill it with `store.add(...)`"
)


def _record_shape(info: dict) -> tuple[int, ...]:
    if info["mask_type"] == "hard":
        return (math.ceil(2 * info["layers"] * info["bank_size"] / 8),)
    return (info["layers"], 2, info["bank_size"])


def _record_dtype(info: dict) -> torch.dtype:
    return torch.uint8 if info["mask_type"] == "hard" else torch.float32


def _stat_key(result: os.stat_result) -> tuple[int, ...]:
    return (result.st_dev, result.st_ino, result.st_size, result.st_mtime_ns)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)  # Linux returns at most ~2 GB per call
        if not chunk:
            break
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


class ProfileStore:
    """Thousands of profiles of one bank in one safetensors file (fixed-size records + a name index).

    ```py
    store = ProfileStore.create("profiles.safetensors", peft_model.peft_config["default"], layers=12)
    store.add({"alice": masks_alice, "bob": masks_bob})  # payloads from `profile_payload(model, name)`
    payload = store.get("alice")                           # reads one record only
    attach_profile(peft_model, store, "alice")             # a new adapter "alice" on the model
    ```

    Many handles, threads and processes may read and add to one store at once (POSIX file systems). `add` holds an
    OS file lock (`xpeft.serialization.write_lock`) around its whole read-modify-write, reads names and records from
    the file under that lock, and replaces the file atomically. Readers never lock: a handle keeps the version of the
    file it last indexed open, and before each `get`, `list`, `len` or `in` compares it with the file now at `path`
    (device, inode, size, modification time); if they differ it re-reads the index from the new file, then reads the
    record from that same open file. A reader thus sees one version or the next, never a mix. `close()` releases the
    kept file (the next access opens it again).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._fd: int | None = None
        self._key: tuple[int, ...] | None = None
        if not self.path.is_file():
            raise FileNotFoundError(f"No X-PEFT profile store at {self.path}; {_CREATE}.")
        self._sync()

    @classmethod
    def create(cls, path: str | os.PathLike, config, layers: int, overwrite: bool = False) -> ProfileStore:
        """An empty store for profiles of `config`'s bank, mask type and geometry (`layers` adapted layers).

        An existing file at `path` is never replaced silently: pass `overwrite=True` to replace it with an empty
        store (its profiles are lost); to add profiles to an existing store, open it with `ProfileStore(path)`.
        """
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(
                f"`layers` must be a positive int, the number of layers the profiles adapt (as many as the model has "
                f"X-PEFT layers), got {layers!r}."
            )
        if config.bank_fingerprint is None:
            raise ValueError("The config has no bank fingerprint yet; create the store from an attached config.")
        info = {
            "bank_fingerprint": config.bank_fingerprint,
            "mask_type": config.mask_type,
            "hard_k": config.hard_k,
            "bank_size": config.bank_size,
            "layers": layers,
        }
        with write_lock(path):
            if not overwrite and os.path.lexists(path):
                raise FileExistsError(
                    f"{path} already exists; open it with `ProfileStore(path)` to add profiles to it, or pass "
                    "`overwrite=True` to replace it with an empty store (its profiles are lost)."
                )
            cls._write(Path(path), torch.empty(0, *_record_shape(info), dtype=_record_dtype(info)), [], info)
        return cls(path)

    @staticmethod
    def _write(path: Path, records: torch.Tensor, names: list[str], info: dict) -> None:
        metadata = {"format": STORE_FORMAT, "info": json.dumps(info), "names": json.dumps(names)}
        atomic_save_file({"records": records}, path, metadata)

    def _sync(self) -> int:
        """Index the file now at `path` unless it is the version indexed last; return that version's open file."""
        try:
            key = _stat_key(os.stat(self.path))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"The X-PEFT profile store {self.path} was deleted or moved; {_CREATE}."
            ) from error
        if key == self._key:
            # Same inode as the file this handle keeps open: an inode number is not reused while a file is open.
            return self._fd
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._index_file(fd)
        except BaseException:
            os.close(fd)
            raise
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._key = fd, _stat_key(os.fstat(fd))
        return fd

    def _index_file(self, fd: int) -> None:
        header = read_safetensors_header(self.path, fd)
        metadata = header.get("__metadata__") or {}
        if metadata.get("format") != STORE_FORMAT:
            raise ValueError(
                f"{self.path} is not an X-PEFT profile store (format {metadata.get('format')!r}, expected "
                f"{STORE_FORMAT!r}); open a file written by `ProfileStore.create`, or {_CREATE}."
            )
        try:
            info, names, entry = json.loads(metadata["info"]), json.loads(metadata["names"]), header["records"]
            shape, dtype = _record_shape(info), _record_dtype(info)
            record_bytes = math.prod(shape) * dtype.itemsize
            expected = {"dtype": "U8" if dtype == torch.uint8 else "F32", "shape": [len(names), *shape]}
            found = {"dtype": entry["dtype"], "shape": entry["shape"]}
            if found != expected or entry["data_offsets"][1] - entry["data_offsets"][0] != len(names) * record_bytes:
                raise ValueError(f"its records are {found}, its index needs {expected}")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{self.path} is a corrupted X-PEFT profile store ({error}); re-create it and add the profiles again."
            ) from error
        self._info, self._names = info, names
        self._index = {name: i for i, name in enumerate(names)}
        self._shape, self._dtype, self._record_bytes = shape, dtype, record_bytes
        self._data_start = 8 + int.from_bytes(os.pread(fd, 8, 0), "little") + entry["data_offsets"][0]

    def close(self) -> None:
        """Release the open file this handle keeps; the next access opens the store again."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
            self._fd, self._key = None, None

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __reduce__(self):
        return type(self), (self.path,)  # another process opens the file itself

    @property
    def info(self) -> dict:
        """The store's bank fingerprint, mask type, `hard_k`, bank size and number of layers."""
        with self._lock:
            self._sync()
            return dict(self._info)

    def list(self) -> list[str]:
        """Names of the stored profiles, in insertion order."""
        with self._lock:
            self._sync()
            return list(self._names)

    def __len__(self) -> int:
        with self._lock:
            self._sync()
            return len(self._names)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            self._sync()
            return name in self._index

    def _records(self, fd: int) -> torch.Tensor:
        size = len(self._names) * self._record_bytes
        raw = _pread_exact(fd, size, self._data_start)
        if len(raw) != size:
            raise ValueError(f"{self.path} is truncated: its records are incomplete; re-create it.")
        if not raw:
            return torch.empty(0, *self._shape, dtype=self._dtype)
        return torch.frombuffer(bytearray(raw), dtype=self._dtype).view(-1, *self._shape)

    def add(self, payloads: dict[str, torch.Tensor], bank_fingerprint: str | None = None) -> None:
        """Add (or replace) profiles by name and rewrite the file atomically; refuse profiles of another bank.

        The file is read and rewritten under its write lock, so concurrent `add` calls from any handle or process
        all take effect, one after the other.
        """
        with write_lock(self.path), self._lock:
            fd = self._sync()  # under the lock nobody else writes: this is the file the new version builds on
            info = self._info
            if bank_fingerprint is not None and bank_fingerprint != info["bank_fingerprint"]:
                raise ValueError(
                    f"These profiles were trained against bank {bank_fingerprint} but the store {self.path} holds "
                    f"profiles of bank {info['bank_fingerprint']}; use a store created for that bank."
                )
            for name, payload in payloads.items():
                if tuple(payload.shape) != self._shape or payload.dtype != self._dtype:
                    raise ValueError(
                        f"Profile {name!r} has payload {payload.dtype} {list(payload.shape)}, the store expects "
                        f"{self._dtype} {list(self._shape)}."
                    )
            empty = torch.empty(0, *self._shape, dtype=self._dtype)
            stacked = torch.stack([p.detach().cpu() for p in payloads.values()]) if payloads else empty
            for start in range(0, len(stacked), 4096):  # decoding validates them (e.g. k selected adapters per layer)
                chunk = stacked[start : start + 4096]
                unpack_masks(chunk, info["mask_type"], info["hard_k"], info["layers"], info["bank_size"])
            records = self._records(fd)
            order = list(payloads)
            replaced = [i for i, name in enumerate(order) if name in self._index]
            added = [i for i, name in enumerate(order) if name not in self._index]
            if replaced:
                records[[self._index[order[i]] for i in replaced]] = stacked[replaced]
            records = torch.cat([records, stacked[added]])
            self._write(self.path, records, self._names + [order[i] for i in added], info)
            self._sync()

    def get(self, name: str) -> torch.Tensor:
        """The payload of profile `name`, read alone (one record of the current file)."""
        with self._lock:
            fd = self._sync()
            if name not in self._index:
                raise KeyError(
                    f"No profile {name!r} in {self.path}; `store.list()` gives the {len(self._names)} stored names."
                )
            raw = _pread_exact(fd, self._record_bytes, self._data_start + self._index[name] * self._record_bytes)
        if len(raw) != self._record_bytes:
            raise ValueError(f"{self.path} is truncated: the record of profile {name!r} is incomplete; re-create it.")
        return torch.frombuffer(bytearray(raw), dtype=self._dtype).view(self._shape)

    def masks(self, name: str) -> torch.Tensor:
        """Mask logits `[layers, 2, bank_size]` of profile `name`."""
        with self._lock:
            payload, info = self.get(name), self._info  # the info of the version the record was read from
        return unpack_masks(payload, info["mask_type"], info["hard_k"], info["layers"], info["bank_size"])
