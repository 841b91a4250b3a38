"""Profile payloads (the masks of one profile as one tensor) and a profile store holding thousands of whole profiles.

A profile's payload is what `save_pretrained` writes for its masks and what the store keeps of them:

- soft masks: the logits as float32 `[L, 2, N]` (`[:, 0]` is `S_A`, `[:, 1]` is `S_B`);
- hard masks: only which adapters are selected, bit-packed: `ceil(2·L·N / 8)` bytes of uint8 (300 bytes for L=12,
  N=100). Unpacked, the selected logits are 1 and the others 0, which selects the same top-k.

A stored profile is the whole profile: its payload and its head, the tensors of its `modules_to_save` copies (e.g. a
trained classifier), as `save_pretrained` writes them.

The store is one safetensors file (format `xpeft-profile-store/v2`): a `[P, record bytes]` uint8 tensor, one
fixed-size record per profile, the payload's bytes followed by the head's tensors' bytes in the order of the store's
head schema; the names, bank fingerprint, geometry and head schema (`[module, key, dtype, shape]` per tensor) are in
the header metadata. [`ProfileStore.get`] reads one record with one positioned read, without reading the others.
Stores of format v1 (xpeft 0.2: payloads only, as a uint8 or float32 records tensor, no head schema) still open and
take profiles without a head; `attach_profile` refuses them for a model whose profiles have a head, because the head
was never stored.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from ..serialization import atomic_save_file, read_safetensors_header, write_lock

STORE_FORMAT = "xpeft-profile-store/v2"
STORE_FORMAT_V1 = "xpeft-profile-store/v1"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_HEAD_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16)
    + (torch.int8, torch.uint8, torch.bool)
}


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


class StoredProfile(NamedTuple):
    """A whole profile as the store keeps it: its mask payload and its head (`{"module.key": tensor}`, the tensors of
    its `modules_to_save` copies; empty for a profile without a head)."""

    masks: torch.Tensor
    head: dict[str, torch.Tensor]


_CREATE = (
    "create one with `ProfileStore.create(path, peft_model, adapter_name=name)`, which reads the number of adapted "
    "layers and the head's shapes from the model, then fill it with `store.add_from(peft_model, [names])`"
)


def _mask_shape(info: dict) -> tuple[int, ...]:
    if info["mask_type"] == "hard":
        return (math.ceil(2 * info["layers"] * info["bank_size"] / 8),)
    return (info["layers"], 2, info["bank_size"])


def _mask_dtype(info: dict) -> torch.dtype:
    return torch.uint8 if info["mask_type"] == "hard" else torch.float32


def _mask_bytes(info: dict) -> int:
    return math.prod(_mask_shape(info)) * _mask_dtype(info).itemsize


def _entry_bytes(entry: list) -> int:
    return math.prod(entry[3]) * _HEAD_DTYPES[entry[2]].itemsize


def _check_head_schema(head) -> None:
    """Refuse a head schema that is not a list of `[module, key, dtype name, shape]` (strict header parsing)."""
    if not isinstance(head, list):
        raise ValueError(f"its head schema is {type(head).__name__}, not a list")
    for entry in head:
        valid = (
            isinstance(entry, list)
            and len(entry) == 4
            and all(isinstance(part, str) for part in entry[:2])
            and entry[2] in _HEAD_DTYPES
            and isinstance(entry[3], list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry[3])
        )
        if not valid:
            raise ValueError(f"its head schema holds {entry!r}, not [module, key, dtype, shape]")
    names = [f"{module}.{key}" for module, key, _, _ in head]
    if len(set(names)) != len(names):
        raise ValueError("its head schema names a tensor twice")


def head_schema(head: dict[str, tuple[str, str, torch.Tensor]]) -> list[list]:
    """The schema `[[module, key, dtype, shape], ...]` of head tensors given as `{name: (module, key, tensor)}`."""
    return [
        [module, key, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
        for module, key, tensor in head.values()
    ]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


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
    """Thousands of whole profiles (masks and head) of one bank in one safetensors file: fixed-size records + an index.

    ```py
    store = ProfileStore.create("profiles.safetensors", peft_model, adapter_name="alice")  # geometry from the model
    store.add_from(peft_model, ["alice", "bob"])           # masks + modules_to_save tensors, bank checked
    payload = store.get("alice")                           # reads one record only
    attach_profile(peft_model, store, "alice", adapter_name="alice_2")  # a new adapter, bit-identical outputs
    ```

    `store.record_bytes` gives the bytes each profile takes, masks and head separately.

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
    def create(
        cls,
        path: str | os.PathLike,
        source,
        layers: int | None = None,
        overwrite: bool = False,
        adapter_name: str | None = None,
    ) -> ProfileStore:
        """An empty store for the profiles of a peft model's X-PEFT adapter `adapter_name` (default: its first), or
        of an X-PEFT config.

        From a model (`source` a `PeftModel`), the store takes the bank fingerprint, mask type, number of adapted
        layers and the shapes of the profile's head (its `modules_to_save` tensors) from the model; `layers`, if
        given, is checked against it. From a config, `layers` (the number of layers the profiles adapt) is required
        and the profiles may have no head (a config with `modules_to_save` needs the model for the head's shapes).

        An existing file at `path` is never replaced silently: pass `overwrite=True` to replace it with an empty
        store (its profiles are lost); to add profiles to an existing store, open it with `ProfileStore(path)`.
        """
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(
                f"`layers` must be a positive int, the number of layers the profiles adapt (as many as the model has "
                f"X-PEFT layers), got {layers!r}; or leave it out and pass the model, which knows it."
            )
        if hasattr(source, "peft_config") and hasattr(source, "get_base_model"):
            from .model import store_geometry  # model.py imports this module

            config, found, head = store_geometry(source, adapter_name)
            if layers is not None and layers != found:
                raise ValueError(
                    f"`layers`={layers} but adapter {adapter_name or next(iter(source.peft_config))!r} of the model "
                    f"adapts {found} layers; leave `layers` out (the store reads it from the model)."
                )
            layers = found
        else:
            config, head = source, []
            if layers is None:
                raise ValueError(
                    "`layers` must be a positive int, the number of layers the profiles adapt, when the store is "
                    "created from a config; or pass the peft model instead of its config, which knows it: "
                    "`ProfileStore.create(path, peft_model, adapter_name=name)`."
                )
            if getattr(config, "modules_to_save", None):
                raise ValueError(
                    f"Profiles of this config have a head (modules_to_save={config.modules_to_save}), which the store "
                    "keeps with their masks, and only the model knows its tensors' shapes: create the store from the "
                    "model, `ProfileStore.create(path, peft_model, adapter_name=name)`."
                )
        if config.bank_fingerprint is None:
            raise ValueError("The config has no bank fingerprint yet; create the store from an attached config.")
        unsupported = sorted({dtype for _, _, dtype, _ in head} - set(_HEAD_DTYPES))
        if unsupported:
            raise ValueError(
                f"The profiles' head has tensors of dtype {unsupported}, which a profile store cannot keep (it keeps "
                f"{sorted(_HEAD_DTYPES)}); cast the `modules_to_save` modules to one of these first."
            )
        info = {
            "bank_fingerprint": config.bank_fingerprint,
            "mask_type": config.mask_type,
            "hard_k": config.hard_k,
            "bank_size": config.bank_size,
            "layers": layers,
            "head": head,
        }
        with write_lock(path):
            if not overwrite and os.path.lexists(path):
                raise FileExistsError(
                    f"{path} already exists; open it with `ProfileStore(path)` to add profiles to it, or pass "
                    "`overwrite=True` to replace it with an empty store (its profiles are lost)."
                )
            empty = torch.empty(0, _mask_bytes(info) + sum(map(_entry_bytes, head)), dtype=torch.uint8)
            cls._write(Path(path), empty, [], info)
        return cls(path)

    @staticmethod
    def _write(path: Path, records: torch.Tensor, names: list[str], info: dict) -> None:
        """Write raw `[P, record bytes]` records; a v1 store (no head schema) keeps its v1 layout."""
        if info.get("head") is None:
            fmt = STORE_FORMAT_V1
            records = records.view(_mask_dtype(info)).view(len(records), *_mask_shape(info))
        else:
            fmt = STORE_FORMAT
        metadata = {"format": fmt, "info": json.dumps(info), "names": json.dumps(names)}
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
        fmt = metadata.get("format")
        if fmt not in (STORE_FORMAT, STORE_FORMAT_V1):
            raise ValueError(
                f"{self.path} is not an X-PEFT profile store (format {fmt!r}, expected {STORE_FORMAT!r} or "
                f"{STORE_FORMAT_V1!r}); open a file written by `ProfileStore.create`, or {_CREATE}."
            )
        try:
            info, names, entry = json.loads(metadata["info"]), json.loads(metadata["names"]), header["records"]
            if not isinstance(info, dict) or not isinstance(names, list):
                raise ValueError("its info or names are not a JSON object and list")
            if fmt == STORE_FORMAT_V1:
                info.pop("head", None)  # v1 never recorded heads: None means "unknown", not "none"
                record_bytes = _mask_bytes(info)
                dtype = "U8" if _mask_dtype(info) == torch.uint8 else "F32"
                expected = {"dtype": dtype, "shape": [len(names), *_mask_shape(info)]}
            else:
                _check_head_schema(info.get("head"))
                record_bytes = _mask_bytes(info) + sum(map(_entry_bytes, info["head"]))
                expected = {"dtype": "U8", "shape": [len(names), record_bytes]}
            found = {"dtype": entry["dtype"], "shape": entry["shape"]}
            if found != expected or entry["data_offsets"][1] - entry["data_offsets"][0] != len(names) * record_bytes:
                raise ValueError(f"its records are {found}, its index needs {expected}")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{self.path} is a corrupted X-PEFT profile store ({error}); re-create it and add the profiles again."
            ) from error
        self._info, self._names = info, names
        self._index = {name: i for i, name in enumerate(names)}
        self._record_bytes = record_bytes
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
        """The store's bank fingerprint, mask type, `hard_k`, bank size, number of layers and head schema (`head`:
        `[module, key, dtype, shape]` per head tensor; `[]` for profiles without a head, absent in a v1 store)."""
        with self._lock:
            self._sync()
            return json.loads(json.dumps(self._info))

    @property
    def record_bytes(self) -> dict[str, int]:
        """Bytes each stored profile takes: `{"masks": ..., "head": ..., "total": ...}` (the file adds a header)."""
        with self._lock:
            self._sync()
            masks = _mask_bytes(self._info)
            return {"masks": masks, "head": self._record_bytes - masks, "total": self._record_bytes}

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
        """All records of the open version as raw bytes `[P, record bytes]`."""
        size = len(self._names) * self._record_bytes
        raw = _pread_exact(fd, size, self._data_start)
        if len(raw) != size:
            raise ValueError(f"{self.path} is truncated: its records are incomplete; re-create it.")
        if not raw:
            return torch.empty(0, self._record_bytes, dtype=torch.uint8)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, self._record_bytes)

    def _encode(self, name: str, profile, info: dict) -> torch.Tensor:
        """One profile (a payload tensor or a [`StoredProfile`]) as its raw record, refusing what does not fit."""
        masks, head = (profile.masks, profile.head) if isinstance(profile, StoredProfile) else (profile, None)
        shape, dtype = _mask_shape(info), _mask_dtype(info)
        if tuple(masks.shape) != shape or masks.dtype != dtype:
            raise ValueError(
                f"Profile {name!r} has masks {masks.dtype} {list(masks.shape)}, but this store holds profiles of "
                f"layers={info['layers']} adapted layers (bank_size={info['bank_size']}, {info['mask_type']} masks: "
                f"{dtype} {list(shape)}){_implied_layers(masks, info)}. If the store was created with the wrong "
                "`layers`, re-create it from the model, which knows it: `ProfileStore.create(path, peft_model, "
                "adapter_name=name)`."
            )
        schema = info.get("head")
        if head is None and schema:
            raise ValueError(
                f"Profile {name!r} is given without its head, but this store keeps the head of every profile "
                f"({', '.join(f'{m}.{k}' for m, k, _, _ in schema)}); add it with `store.add_from(peft_model, "
                f"[{name!r}])`, which takes the masks and the head from the model."
            )
        head = head or {}
        if schema is None and head:
            raise ValueError(
                f"{self.path} is a store of format {STORE_FORMAT_V1!r}, which keeps masks only, and profile {name!r} "
                "has a head; create a new store for whole profiles with `ProfileStore.create(path, peft_model)`."
            )
        expected = {f"{m}.{k}": (_HEAD_DTYPES[dt], tuple(s)) for m, k, dt, s in schema or []}
        found = {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in head.items()}
        if found != expected:
            raise ValueError(
                f"Profile {name!r} has head tensors {found}, but this store keeps heads {expected}: the profile comes "
                "from another model or `modules_to_save`. Use a store created for that model."
            )
        for key, tensor in head.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"Profile {name!r}'s head tensor {key!r} holds NaN or inf; retrain or re-save it.")
        parts = [_as_bytes(masks)] + [_as_bytes(head[f"{m}.{k}"]) for m, k, _, _ in schema or []]
        return torch.cat(parts)

    def add(self, profiles: dict, bank_fingerprint: str | None = None) -> None:
        """Add (or replace) profiles by name and rewrite the file atomically; refuse profiles of another bank.

        Each value is a [`StoredProfile`] (masks and head, as `profile_record(model, name)` gives it) or, for a
        store of profiles without a head, a mask payload (`profile_payload(model, name)`). [`add_from`] takes both
        from a model. The file is read and rewritten under its write lock, so concurrent `add` calls from any handle
        or process all take effect, one after the other.
        """
        with write_lock(self.path), self._lock:
            fd = self._sync()  # under the lock nobody else writes: this is the file the new version builds on
            info = self._info
            if bank_fingerprint is not None and bank_fingerprint != info["bank_fingerprint"]:
                raise ValueError(
                    f"These profiles were trained against bank {bank_fingerprint} but the store {self.path} holds "
                    f"profiles of bank {info['bank_fingerprint']}; use a store created for that bank."
                )
            encoded = [self._encode(name, profile, info) for name, profile in profiles.items()]
            stacked = torch.stack(encoded) if encoded else torch.empty(0, self._record_bytes, dtype=torch.uint8)
            masks = stacked[:, : _mask_bytes(info)].contiguous().view(_mask_dtype(info))
            masks = masks.view(len(stacked), *_mask_shape(info))
            for start in range(0, len(masks), 4096):  # decoding validates them (e.g. k selected adapters per layer)
                chunk = masks[start : start + 4096]
                unpack_masks(chunk, info["mask_type"], info["hard_k"], info["layers"], info["bank_size"])
            records = self._records(fd)
            order = list(profiles)
            replaced = [i for i, name in enumerate(order) if name in self._index]
            added = [i for i, name in enumerate(order) if name not in self._index]
            if replaced:
                records[[self._index[order[i]] for i in replaced]] = stacked[replaced]
            records = torch.cat([records, stacked[added]])
            self._write(self.path, records, self._names + [order[i] for i in added], info)
            self._sync()

    def add_from(self, model, adapter_names) -> None:
        """Add (or replace) the X-PEFT adapters `adapter_names` of the peft `model` as whole profiles (masks and
        head), checking that they were trained against this store's bank."""
        from .model import profile_record  # model.py imports this module

        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        records = {name: profile_record(model, name) for name in adapter_names}
        fingerprints = {name: model.peft_config[name].bank_fingerprint for name in adapter_names}
        for fingerprint in dict.fromkeys(fingerprints.values()):  # each group is checked against the store's bank
            group = {name: record for name, record in records.items() if fingerprints[name] == fingerprint}
            self.add(group, bank_fingerprint=fingerprint)

    def read_record(self, name: str) -> tuple[StoredProfile, dict]:
        """Profile `name` (its payload and head, read alone with one read) and the store info of the file version it
        was read from."""
        with self._lock:
            fd = self._sync()
            if name not in self._index:
                raise KeyError(
                    f"No profile {name!r} in {self.path}; `store.list()` gives the {len(self._names)} stored names."
                )
            raw = _pread_exact(fd, self._record_bytes, self._data_start + self._index[name] * self._record_bytes)
            info = self._info
        if len(raw) != self._record_bytes:
            raise ValueError(f"{self.path} is truncated: the record of profile {name!r} is incomplete; re-create it.")
        record = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        start = _mask_bytes(info)
        masks = record[:start].view(_mask_dtype(info)).view(_mask_shape(info))
        head = {}
        for module, key, dtype, shape in info.get("head") or []:
            end = start + _entry_bytes([module, key, dtype, shape])
            # A copy first: a view as a wider dtype needs an aligned start.
            head[f"{module}.{key}"] = record[start:end].clone().view(_HEAD_DTYPES[dtype]).view(shape)
            start = end
        return StoredProfile(masks, head), info

    def get(self, name: str) -> torch.Tensor:
        """The mask payload of profile `name`, read alone (one record of the current file)."""
        return self.read_record(name)[0].masks

    def profile(self, name: str) -> StoredProfile:
        """Profile `name` as stored: its mask payload and its head tensors."""
        return self.read_record(name)[0]

    def masks(self, name: str) -> torch.Tensor:
        """Mask logits `[layers, 2, bank_size]` of profile `name`."""
        profile, info = self.read_record(name)
        return unpack_masks(profile.masks, info["mask_type"], info["hard_k"], info["layers"], info["bank_size"])


def _implied_layers(masks: torch.Tensor, info: dict) -> str:
    """What a mis-sized payload says about its number of layers, for the error message."""
    if info["mask_type"] == "soft" and masks.dim() == 3 and masks.shape[1] == 2:
        return f"; the profile adapts {masks.shape[0]} layers"
    if info["mask_type"] == "hard" and masks.dim() == 1 and masks.dtype == torch.uint8:
        layers = masks.numel() * 8 // (2 * info["bank_size"])
        if math.ceil(2 * layers * info["bank_size"] / 8) == masks.numel():
            return f"; the profile adapts {layers} layers (if its bank_size is {info['bank_size']})"
    return ""
