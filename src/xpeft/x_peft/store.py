"""Profile payloads (the masks of one profile as one tensor) and a profile store holding thousands of them.

A profile's payload is what `save_pretrained` writes and what the store keeps per profile:

- soft masks: the logits as float32 `[L, 2, N]` (`[:, 0]` is `S_A`, `[:, 1]` is `S_B`);
- hard masks: only which adapters are selected, bit-packed: `ceil(2·L·N / 8)` bytes of uint8 (300 bytes for L=12,
  N=100). Unpacked, the selected logits are 1 and the others 0, which selects the same top-k.

The store is one safetensors file: a `[P, payload bytes]` uint8 tensor, one fixed-size record per profile, with the
names, bank fingerprint and geometry in the header metadata. [`ProfileStore.get`] reads one record through
one seek and one read, without reading the others.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..serialization import atomic_save_file, read_safetensors_metadata

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


class ProfileStore:
    """Thousands of profiles of one bank in one safetensors file (fixed-size records + a name index).

    ```py
    store = ProfileStore.create("profiles.safetensors", peft_model.peft_config["default"], layers=12)
    store.add({"alice": masks_alice, "bob": masks_bob})  # payloads from `profile_payload(model, name)`
    payload = store.get("alice")                           # reads one record only
    attach_profile(peft_model, store, "alice")             # a new adapter "alice" on the model
    ```
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        create = (
            "create one with `ProfileStore.create(path, peft_model.peft_config[adapter_name], layers=...)`, `layers` "
            "being the number of adapted layers, then fill it with `store.add(...)`"
        )
        if not self.path.is_file():
            raise FileNotFoundError(f"No X-PEFT profile store at {self.path}; {create}.")
        metadata = read_safetensors_metadata(self.path)
        if metadata.get("format") != STORE_FORMAT:
            raise ValueError(
                f"{self.path} is not an X-PEFT profile store (format {metadata.get('format')!r}, expected "
                f"{STORE_FORMAT!r}); open a file written by `ProfileStore.create`, or {create}."
            )
        self.info = json.loads(metadata["info"])
        self._names: list[str] = json.loads(metadata["names"])
        self._index = {name: i for i, name in enumerate(self._names)}
        # Locate the records once, so that `get` is one seek and one read of a single record.
        with open(self.path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            entry = json.loads(file.read(header_size))["records"]
        self._dtype = torch.uint8 if self.info["mask_type"] == "hard" else torch.float32
        self._shape = self._record_shape(self.info)
        self._record_bytes = math.prod(self._shape) * self._dtype.itemsize
        self._data_start = 8 + header_size + entry["data_offsets"][0]
        if self.path.stat().st_size < 8 + header_size + entry["data_offsets"][1]:
            raise ValueError(f"{self.path} is truncated: its header lists more records than the file holds.")

    @classmethod
    def create(cls, path: str | os.PathLike, config, layers: int) -> ProfileStore:
        """An empty store for profiles of `config`'s bank, mask type and geometry (`layers` adapted layers)."""
        if config.bank_fingerprint is None:
            raise ValueError("The config has no bank fingerprint yet; create the store from an attached config.")
        info = {
            "bank_fingerprint": config.bank_fingerprint,
            "mask_type": config.mask_type,
            "hard_k": config.hard_k,
            "bank_size": config.bank_size,
            "layers": layers,
        }
        shape = (0, *cls._record_shape(info))
        dtype = torch.uint8 if info["mask_type"] == "hard" else torch.float32
        cls._write(Path(path), torch.empty(shape, dtype=dtype), [], info)
        return cls(path)

    @staticmethod
    def _record_shape(info: dict) -> tuple[int, ...]:
        if info["mask_type"] == "hard":
            return (math.ceil(2 * info["layers"] * info["bank_size"] / 8),)
        return (info["layers"], 2, info["bank_size"])

    @staticmethod
    def _write(path: Path, records: torch.Tensor, names: list[str], info: dict) -> None:
        metadata = {"format": STORE_FORMAT, "info": json.dumps(info), "names": json.dumps(names)}
        atomic_save_file({"records": records}, path, metadata)

    def list(self) -> list[str]:
        """Names of the stored profiles, in insertion order."""
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def add(self, payloads: dict[str, torch.Tensor], bank_fingerprint: str | None = None) -> None:
        """Add (or replace) profiles by name and rewrite the file atomically; refuse profiles of another bank."""
        if bank_fingerprint is not None and bank_fingerprint != self.info["bank_fingerprint"]:
            raise ValueError(
                f"These profiles were trained against bank {bank_fingerprint} but the store {self.path} holds "
                f"profiles of bank {self.info['bank_fingerprint']}; use a store created for that bank."
            )
        shape = self._record_shape(self.info)
        for name, payload in payloads.items():
            if tuple(payload.shape) != shape or payload.dtype != self._dtype:
                raise ValueError(
                    f"Profile {name!r} has payload {payload.dtype} {list(payload.shape)}, the store expects "
                    f"{self._dtype} {list(shape)}."
                )
        stacked = torch.stack(list(payloads.values())) if payloads else torch.empty(0, *shape, dtype=self._dtype)
        info = self.info
        for start in range(0, len(stacked), 4096):  # decoding validates them (e.g. k selected adapters per layer)
            unpack_masks(
                stacked[start : start + 4096], info["mask_type"], info["hard_k"], info["layers"], info["bank_size"]
            )
        with safe_open(self.path, framework="pt") as file:
            records = file.get_tensor("records")
        order = list(payloads)
        replaced = [i for i, name in enumerate(order) if name in self._index]
        added = [i for i, name in enumerate(order) if name not in self._index]
        if replaced:
            records[[self._index[order[i]] for i in replaced]] = stacked[replaced]
        records = torch.cat([records, stacked[added]])
        names = self._names + [order[i] for i in added]
        self._write(self.path, records, names, self.info)
        self.__init__(self.path)  # the header (names) changed size, so the records moved: re-read their offsets

    def get(self, name: str) -> torch.Tensor:
        """The payload of profile `name`, read alone (one slice of the records tensor)."""
        if name not in self._index:
            raise KeyError(f"No profile {name!r} in {self.path}; `store.list()` gives the {len(self)} stored names.")
        with open(self.path, "rb") as file:
            file.seek(self._data_start + self._index[name] * self._record_bytes)
            raw = file.read(self._record_bytes)
        if len(raw) != self._record_bytes:
            raise ValueError(f"{self.path} is truncated: the record of profile {name!r} is incomplete.")
        return torch.frombuffer(bytearray(raw), dtype=self._dtype).view(self._shape)

    def masks(self, name: str) -> torch.Tensor:
        """Mask logits `[layers, 2, bank_size]` of profile `name`."""
        info = self.info
        return unpack_masks(self.get(name), info["mask_type"], info["hard_k"], info["layers"], info["bank_size"])
