"""The frozen bank of X-PEFT: N bottleneck adapters per adapted layer, shared by every profile of a model.

Two sources (DESIGN.md §2, "Bank sources"):

- **random**: each layer's adapters are drawn on the CPU from a `torch.Generator` seeded by `(bank_seed, layer name)`,
  then moved to the layer's device, so the same recipe gives the same bank bit for bit on CPU or CUDA and costs zero
  bytes to store. Its fingerprint is the `recipe_fingerprint` of the recipe: generator version, seed, bank size,
  reduction factor, non-linearity, dtype and each adapted layer's name, size d and bottleneck r (the layers are part
  of it because they determine the tensors: a profile trained on a hidden-64 model must not load onto the different
  bank of a hidden-128 model with the same layer names).
- **trained**: built once from N existing single bottleneck adapters with [`build_bank`] and saved as one safetensors
  file whose metadata holds the `tensor_fingerprint` of its tensors.

Per layer the bank holds `A: [N, r, d]` (down), `a: [N, r]`, `B: [N, d, r]` (up) and `b: [N, d]`, in float32. Its
size is checked against [`MAX_BANK_BYTES`] before any layer is drawn or read.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft.tuners._buffer_dict import BufferDict
from safetensors import SafetensorError, safe_open
from torch import nn

from ..loading import read_safetensors_header
from ..serialization import SAFETENSORS_ITEM_BYTES, atomic_save_file, read_safetensors_metadata, recipe_fingerprint
from ..serialization import tensor_fingerprint as _tensor_fingerprint

BANK_FORMAT = "xpeft-bank/v1"
RANDOM_GENERATOR = "xpeft-random-bank/v1"
PARTS = ("A", "a", "B", "b")
BIAS_STD = 0.02  # [open] random-bank biases: small, so that composition of biases is exercised but does not dominate
MAX_BANK_BYTES = 16 * 2**30
"""Largest bank (all its layers, in bytes) a model may hold: 16 GiB by default. A bank takes
`N · Σ_layers (2 r d + r + d) · 4` bytes; BERT-base with the paper's N=100 (12 layers, d=768, r=48) needs 358 MB, but
Llama-2-7B's 32 down projections (d=4096, r=256) need 27 GB. Checked from the model's layer sizes before any layer is
drawn or read; raise it (`xpeft.x_peft.bank.MAX_BANK_BYTES = ...`) on a machine with the memory for a larger bank."""


def random_bank_recipe(
    bank_seed: int,
    bank_size: int,
    reduction_factor: int,
    non_linearity: str,
    layers: Sequence[tuple[str, int]] | None = None,
) -> dict:
    """The recipe that determines a random bank; with `layers` (`(name, d)` of each adapted layer), the bank of those
    layers exactly. Without them it names the generator and its settings only (and is xpeft 0.1's fingerprint)."""
    recipe = {
        "kind": "random",
        "generator": RANDOM_GENERATOR,
        "seed": bank_seed,
        "bank_size": bank_size,
        "reduction_factor": reduction_factor,
        "non_linearity": non_linearity,
        "dtype": "float32",
    }
    if layers is not None:
        recipe["layers"] = [[name, d, d // reduction_factor] for name, d in sorted(layers)]
    return recipe


def bottleneck_size(layer_name: str, d: int, reduction_factor: int) -> int:
    """`r = d // reduction_factor` of a random bank's layer, refusing 0."""
    r = d // reduction_factor
    if r < 1:
        raise ValueError(
            f"Layer {layer_name!r} has d={d} < reduction_factor={reduction_factor}, giving a bottleneck of size 0; "
            "lower `reduction_factor`."
        )
    return r


def random_bank_layer(bank_seed: int, layer_name: str, bank_size: int, d: int, r: int) -> dict[str, torch.Tensor]:
    """Draw one layer's random bank on the CPU: `A ~ N(0, 1/d)`, `B ~ N(0, 1/r)`, biases `~ N(0, 0.02²)`.

    The generator seed mixes `bank_seed` with the layer name, so a layer's adapters do not depend on which other
    layers are adapted or in which order they are created.
    """
    digest = hashlib.sha256(f"{RANDOM_GENERATOR}|{bank_seed}|{layer_name}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return {
        "A": torch.randn(bank_size, r, d, generator=generator) / d**0.5,
        "a": torch.randn(bank_size, r, generator=generator) * BIAS_STD,
        "B": torch.randn(bank_size, d, r, generator=generator) / r**0.5,
        "b": torch.randn(bank_size, d, generator=generator) * BIAS_STD,
    }


def _buffer_key(layer_name: str) -> str:
    # Buffer names may not contain dots; module paths never contain "/".
    return layer_name.replace(".", "/")


def check_bank_file_exists(path: str | os.PathLike) -> None:
    """Raise a `FileNotFoundError` saying how to point a profile at its bank's current path."""
    if Path(path).is_file():
        return
    raise FileNotFoundError(
        f"X-PEFT bank file not found: this profile's `bank` points to {path}, and no file is there (a bank is never "
        "saved with its profiles). Pass the bank's current path: `config = XPeftConfig.from_pretrained(profile_dir); "
        "config.bank = 'path/to/bank.safetensors'; PeftModel.from_pretrained(base_model, profile_dir, config=config)` "
        "(or `XPeftConfig(..., bank='path/to/bank.safetensors')` for a new profile)."
    )


class _BankFile(Mapping):
    """The tensors of a bank file as a read-only mapping that reads each tensor from disk on access.

    Handing it to `tensor_fingerprint` hashes the whole file one tensor at a time, never holding it all in memory.
    Each tensor read is also given a digest of its own on first read; later reads are checked against it, so that a
    layer read after the file was verified is exactly the verified one.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._digests: dict[str, str] = {}
        with self._open() as file:
            self._names = list(file.keys())

    def _open(self):
        try:
            return safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as error:
            raise self._unreadable(error) from error

    def _unreadable(self, error: Exception) -> ValueError:
        return ValueError(
            f"Could not read bank file {self.path}: {error}. It is truncated or corrupted; rebuild it with "
            "`xpeft.x_peft.build_bank`."
        )

    def get(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read the tensors `names` (only those) from the file."""
        with self._open() as file:
            try:
                tensors = {name: file.get_tensor(name) for name in names}
            except (SafetensorError, OSError) as error:
                raise self._unreadable(error) from error
        for name, tensor in tensors.items():
            digest = _tensor_fingerprint({name: tensor})
            if self._digests.setdefault(name, digest) != digest:
                raise ValueError(
                    f"Bank file {self.path} changed after it was verified against its fingerprint (tensor {name!r} "
                    "differs); rebuild the model (e.g. `get_peft_model` again) so that the file is checked anew."
                )
        return tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.get([name])[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_bank_file(path: str | os.PathLike) -> tuple[_BankFile, dict[str, str]]:
    """Open a bank file and check all its tensors against its recorded fingerprint; return `(file, metadata)`.

    The check streams the file tensor by tensor; the returned mapping reads tensors only when asked for.
    """
    check_bank_file_exists(path)
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != BANK_FORMAT:
        raise ValueError(
            f"{path} is not an X-PEFT bank file (format {metadata.get('format')!r}, expected {BANK_FORMAT!r}); "
            "create one with `xpeft.x_peft.build_bank`."
        )
    tensors = _BankFile(path)
    fingerprint = _tensor_fingerprint(tensors)
    if fingerprint != metadata.get("fingerprint"):
        raise ValueError(
            f"Bank file {path} is corrupted: its tensors hash to {fingerprint} but its metadata records "
            f"{metadata.get('fingerprint')}. Rebuild it with `xpeft.x_peft.build_bank`."
        )
    return tensors, metadata


def build_bank(
    adapters: Sequence[Mapping[str, Mapping[str, torch.Tensor]]], path: str | os.PathLike, non_linearity: str = "relu"
) -> str:
    """Build a trained bank from N single bottleneck adapters and save it once; return its fingerprint.

    Each adapter maps a layer name (the module path of the adapted layer in the base model, e.g.
    `"bert.encoder.layer.0.output.dense"`) to its weights `{"A": [r, d], "a": [r], "B": [d, r], "b": [d]}` for
    `h ↦ h + B f(A h + a) + b`. Single adapters trained with this library come from [`extract_adapter`]; others
    (e.g. AdapterHub Pfeiffer adapters) only need their weights put in this form. All adapters must cover the same
    layers with the same shapes.
    """
    if not adapters:
        raise ValueError("`build_bank` needs at least one adapter.")
    layer_names = sorted(adapters[0])
    tensors: dict[str, torch.Tensor] = {}
    for layer_name in layer_names:
        for part in PARTS:
            try:
                parts = [adapter[layer_name][part].detach().float().cpu() for adapter in adapters]
            except KeyError as error:
                raise ValueError(
                    f"Adapter is missing {error} for layer {layer_name!r}; every adapter given to `build_bank` must "
                    f"hold A, a, B and b for the same layers ({layer_names})."
                ) from error
            shapes = [tuple(p.shape) for p in parts]
            if len(set(shapes)) != 1:
                raise ValueError(
                    f"Adapters disagree on the shape of {part} in layer {layer_name!r}: "
                    f"{', '.join(f'adapter {i}: {list(shape)}' for i, shape in enumerate(shapes))}. Every adapter "
                    "given to `build_bank` must come from the same base model with the same `reduction_factor` "
                    "(bottleneck size r = d / reduction_factor)."
                )
            tensors[f"{layer_name}.{part}"] = torch.stack(parts)
    fingerprint = _tensor_fingerprint(tensors)
    metadata = {
        "format": BANK_FORMAT,
        "fingerprint": fingerprint,
        "bank_size": str(len(adapters)),
        "non_linearity": non_linearity,
    }
    atomic_save_file(tensors, path, metadata)
    return fingerprint


class XPeftBank(nn.Module):
    """The bank of one model, held once by the tuner model; each X-PEFT layer keeps a reference and its layer name.

    The tensors are non-persistent buffers: they follow `model.to(...)` but never enter a state dict, so no profile
    ever contains them.
    """

    def __init__(self, source: str, bank_seed: int, bank_size: int, reduction_factor: int, non_linearity: str):
        super().__init__()
        self.source, self.bank_seed, self.bank_size = source, bank_seed, bank_size
        self.reduction_factor, self.non_linearity = reduction_factor, non_linearity
        self.parts = nn.ModuleDict({part: BufferDict({}, persistent=False) for part in PARTS})
        # A trained bank's file, verified once here; each layer's tensors are read from it when the layer is created,
        # so the model never holds the file's other layers (e.g. of layers it does not adapt) in memory.
        self._file: _BankFile | None = None
        self._file_layer_names: set[str] = set()
        if source == "random":
            recipe = random_bank_recipe(bank_seed, bank_size, reduction_factor, non_linearity)
            # Names the generator and its settings: two random banks are the same bank exactly when this matches.
            self.source_fingerprint = recipe_fingerprint(recipe)
            return
        self._file, metadata = read_bank_file(source)
        self._file_layer_names = {name.rsplit(".", 1)[0] for name in self._file}
        self.source_fingerprint = metadata["fingerprint"]
        if int(metadata.get("bank_size", -1)) != bank_size:
            raise ValueError(
                f"Bank file {source} holds {metadata.get('bank_size')} adapters per layer but `bank_size` is "
                f"{bank_size}; set `bank_size={metadata.get('bank_size')}`."
            )
        if metadata.get("non_linearity", non_linearity) != non_linearity:
            raise ValueError(
                f"Bank file {source} was built for non_linearity={metadata['non_linearity']!r} but the config has "
                f"{non_linearity!r}; set `non_linearity={metadata['non_linearity']!r}`."
            )

    def ensure_layer(self, layer_name: str, d: int, device: torch.device) -> None:
        """Create (random) or fetch (file) the adapters of `layer_name`, whose output size is `d`."""
        key = _buffer_key(layer_name)
        if key in self.parts["A"]:
            return
        if self._file is None:
            r = bottleneck_size(layer_name, d, self.reduction_factor)
            tensors = random_bank_layer(self.bank_seed, layer_name, self.bank_size, d, r)
        else:
            if layer_name not in self._file_layer_names:
                raise ValueError(
                    f"Bank file {self.source} has no adapters for layer {layer_name!r}; it covers "
                    f"{sorted(self._file_layer_names)}. Choose `target_modules` to match the bank."
                )
            check_bank_file_exists(self.source)
            tensors = self._file.get([f"{layer_name}.{part}" for part in PARTS])
            tensors = {name.rsplit(".", 1)[1]: tensor for name, tensor in tensors.items()}
            if tensors["B"].shape[1] != d:
                raise ValueError(
                    f"Bank adapters of layer {layer_name!r} have d={tensors['B'].shape[1]}, layer has {d}: the bank was "
                    "built for another model; build one for this model with `build_bank`."
                )
        for part in PARTS:
            self.parts[part][key] = tensors[part].to(device)

    @property
    def fingerprint(self) -> str:
        """The bank's fingerprint: its file's, or the recipe's over every layer drawn so far."""
        return self.profile_fingerprint(self.layer_sizes())

    def profile_fingerprint(self, layers: Sequence[tuple[str, int]]) -> str:
        """The fingerprint of the part of this bank a profile adapting `layers` (`(name, d)` each) uses: a trained
        bank's file fingerprint (its tensors fix every layer), or the random recipe over those layers."""
        if self._file is not None:
            return self.source_fingerprint
        recipe = random_bank_recipe(
            self.bank_seed, self.bank_size, self.reduction_factor, self.non_linearity, layers=layers
        )
        return recipe_fingerprint(recipe)

    def layer_sizes(self) -> list[tuple[str, int]]:
        """`(name, d)` of the layers created so far."""
        return [(key.replace("/", "."), B.shape[1]) for key, B in self.parts["B"].items()]

    def layer(self, layer_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(A, a, B, b)` of `layer_name`, on the device the bank currently lives on."""
        key = _buffer_key(layer_name)
        return tuple(self.parts[part][key] for part in PARTS)

    def layer_names(self) -> list[str]:
        """Names of the layers created so far, in creation order (the model's module order)."""
        return [key.replace("/", ".") for key in self.parts["A"]]

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """All layers created so far, as `{layer name: {part: tensor}}` (e.g. to save a random bank with `save_bank`)."""
        return {key.replace("/", "."): {part: self.parts[part][key] for part in PARTS} for key in self.parts["A"]}


def check_bank_allocation(
    source: str,
    bank_size: int,
    reduction_factor: int,
    layers: Sequence[tuple[str, int]],
    held: XPeftBank | None = None,
) -> None:
    """Refuse a bank that would exceed [`MAX_BANK_BYTES`], before any of its layers is drawn or read.

    `layers` are the `(name, d)` a profile adapts; `held` is the model's bank, whose layers are counted once. A random
    layer takes `bank_size · (2 r d + r + d)` float32 values; a bank file's layers take what its header lists.
    """
    held_sizes = dict(held.layer_sizes()) if held is not None else {}
    total = sum(t.numel() * t.element_size() for part in held.parts.values() for t in part.values()) if held else 0
    new = [(name, d) for name, d in layers if name not in held_sizes]
    if source == "random":
        for name, d in new:
            r = bottleneck_size(name, d, reduction_factor)
            total += bank_size * (2 * r * d + r + d) * 4
    else:
        header = read_safetensors_header(source, fix="Rebuild it with `xpeft.x_peft.build_bank`.")
        for name, _ in new:
            # A layer the file lacks is refused, with its own message, when the layer is created.
            entries = [header.get(f"{name}.{part}") for part in PARTS]
            total += sum(
                math.prod(shape) * SAFETENSORS_ITEM_BYTES.get(dtype, 8) for dtype, shape in filter(None, entries)
            )
    if total > MAX_BANK_BYTES:
        raise ValueError(
            f"The X-PEFT bank would take {_in_mib(total)} ({bank_size} adapters for each of "
            f"{len(held_sizes) + len(new)} layers), above `xpeft.x_peft.bank.MAX_BANK_BYTES` = "
            f"{_in_mib(MAX_BANK_BYTES)}. Lower `bank_size` or raise `reduction_factor` (or adapt fewer layers); or "
            "raise the bound if the machine has the memory: `xpeft.x_peft.bank.MAX_BANK_BYTES = ...`."
        )


def _in_mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def save_bank(bank: XPeftBank, path: str | os.PathLike) -> str:
    """Save the layers of `bank` as a bank file (e.g. to freeze a random bank); return the file's fingerprint."""
    layers = bank.layer_tensors()
    adapters = [
        {name: {part: tensors[part][i] for part in PARTS} for name, tensors in layers.items()}
        for i in range(bank.bank_size)
    ]
    return build_bank(adapters, Path(path), non_linearity=bank.non_linearity)
