"""The frozen bank of X-PEFT: N adapters per adapted layer, shared by every profile of a model.

Two kinds, recorded in a bank file's metadata (`kind`; a file without it is a bottleneck bank, as all files written
before LoRA banks were):

- **bottleneck**: per layer `A: [N, r, d]` (down), `a: [N, r]`, `B: [N, d, r]` (up) and `b: [N, d]`, the adapters
  `h ↦ h + B f(A h + a) + b` on the layer's output h.
- **lora**: per layer `A: [N, r, in]` and `B: [N, out, r]` from N peft LoRA adapters, each adapter's scaling
  (`lora_alpha / r`, or `lora_alpha / √r` with rslora) folded into its B, so that adapter i is `x ↦ B_i A_i x` on
  the layer's input x. Adapters of different ranks are zero-padded to the largest rank (the padding adds nothing to
  any `B_j A_i`).

Two sources of bottleneck banks (DESIGN.md §2, "Bank sources"):

- **random**: each layer's adapters are drawn on the CPU from a `torch.Generator` seeded by `(bank_seed, layer name)`,
  then moved to the layer's device, so the same recipe gives the same bank bit for bit on CPU or CUDA and costs zero
  bytes to store. Its fingerprint is the `recipe_fingerprint` of the recipe: generator version, seed, bank size,
  reduction factor, non-linearity, dtype and each adapted layer's name, size d and bottleneck r (the layers are part
  of it because they determine the tensors: a profile trained on a hidden-64 model must not load onto the different
  bank of a hidden-128 model with the same layer names).
- **trained**: built once from N existing single bottleneck adapters with [`build_bank`] and saved as one safetensors
  file whose metadata holds the `tensor_fingerprint` of its tensors.

LoRA banks always come from a file written by [`build_bank`]; their fingerprint hashes the kind with the tensors
([`file_fingerprint`]). Tensors are float32. A bank's size is checked against [`MAX_BANK_BYTES`] before any layer is
drawn or read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn import functional as F

from ..loading import PEFT_PREFIX, read_safetensors_header
from ..serialization import (
    SAFETENSORS_ITEM_BYTES,
    atomic_save_file,
    load_checked,
    read_safetensors_metadata,
    recipe_fingerprint,
)
from ..serialization import tensor_fingerprint as _tensor_fingerprint

BANK_FORMAT = "xpeft-bank/v1"
RANDOM_GENERATOR = "xpeft-random-bank/v1"
PARTS = ("A", "a", "B", "b")
LORA_PARTS = ("A", "B")
KINDS = {"bottleneck": PARTS, "lora": LORA_PARTS}
"""The tensors each layer of a bank of each kind holds."""
LEGACY_INIT_SCALE = 1.0
"""The `bank_init_scale` of every random bank made before the field existed (and of a profile whose saved config lacks
it): the bank is drawn exactly as then and its recipe, hence its fingerprint, omits the scale."""
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
    init_scale: float = LEGACY_INIT_SCALE,
) -> dict:
    """The recipe that determines a random bank; with `layers` (`(name, d)` of each adapted layer), the bank of those
    layers exactly. Without them it names the generator and its settings only (and is xpeft 0.1's fingerprint).

    `init_scale` enters the recipe only when it is not the legacy 1.0, so that every random bank made before the
    field existed keeps its fingerprint."""
    recipe = {
        "kind": "random",
        "generator": RANDOM_GENERATOR,
        "seed": bank_seed,
        "bank_size": bank_size,
        "reduction_factor": reduction_factor,
        "non_linearity": non_linearity,
        "dtype": "float32",
    }
    if init_scale != LEGACY_INIT_SCALE:
        recipe["init_scale"] = float(init_scale)
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


def random_bank_layer(
    bank_seed: int, layer_name: str, bank_size: int, d: int, r: int, init_scale: float = LEGACY_INIT_SCALE
) -> dict[str, torch.Tensor]:
    """Draw one layer's random bank on the CPU: `A ~ N(0, 1/d)`, `a ~ N(0, 0.02²)`, `B ~ N(0, s²/r)`,
    `b ~ N(0, (0.02 s)²)` with `s = init_scale`.

    The scale multiplies each adapter's up projection and output bias only, so every composition of the bank (any
    mask, any non-linearity) adds exactly `s` times the residual `B f(A h + a) + b` of the unscaled bank; the same
    random draws are scaled, so banks of one seed differ only by that factor. The generator seed mixes `bank_seed`
    with the layer name, so a layer's adapters do not depend on which other layers are adapted or in which order
    they are created.
    """
    digest = hashlib.sha256(f"{RANDOM_GENERATOR}|{bank_seed}|{layer_name}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    tensors = {
        "A": torch.randn(bank_size, r, d, generator=generator) / d**0.5,
        "a": torch.randn(bank_size, r, generator=generator) * BIAS_STD,
        "B": torch.randn(bank_size, d, r, generator=generator) / r**0.5,
        "b": torch.randn(bank_size, d, generator=generator) * BIAS_STD,
    }
    if init_scale != LEGACY_INIT_SCALE:  # the legacy bank is left untouched, bit for bit
        tensors["B"] *= init_scale
        tensors["b"] *= init_scale
    return tensors


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


def file_fingerprint(tensors: Mapping[str, torch.Tensor], kind: str) -> str:
    """A bank file's fingerprint: the `tensor_fingerprint` of its tensors, with the kind hashed in for LoRA banks.

    A bottleneck bank's fingerprint is the bare tensor hash, as it was before banks had kinds, so that profiles saved
    against existing bank files still match them.
    """
    fingerprint = _tensor_fingerprint(tensors)
    return fingerprint if kind == "bottleneck" else recipe_fingerprint({"kind": kind, "tensors": fingerprint})


def bank_kind(metadata: Mapping[str, str], path: str | os.PathLike) -> str:
    """The kind a bank file's metadata records; 'bottleneck' for files written before banks had kinds."""
    kind = metadata.get("kind", "bottleneck")
    if kind not in KINDS:
        raise ValueError(
            f"Bank file {path} records kind {kind!r}, which this xpeft does not know (it knows {', '.join(KINDS)}); "
            "upgrade xpeft, or rebuild the bank with `xpeft.x_peft.build_bank`."
        )
    return kind


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
    kind = bank_kind(metadata, path)
    tensors = _BankFile(path)
    fingerprint = file_fingerprint(tensors, kind)
    if fingerprint != metadata.get("fingerprint"):
        raise ValueError(
            f"Bank file {path} is corrupted: its tensors (kind {kind!r}) hash to {fingerprint} but its metadata "
            f"records {metadata.get('fingerprint')}. Rebuild it with `xpeft.x_peft.build_bank`."
        )
    return tensors, metadata


BottleneckAdapter = Mapping[str, Mapping[str, torch.Tensor]]
LoraAdapter = str | os.PathLike | PeftModel | tuple[nn.Module, str] | Mapping[str, Mapping[str, torch.Tensor]]


def build_bank(
    adapters: Sequence[BottleneckAdapter | LoraAdapter], path: str | os.PathLike, non_linearity: str = "relu"
) -> str:
    """Build a trained bank from N single adapters and save it once; return its fingerprint.

    **Bottleneck bank**: each adapter maps a layer name (the module path of the adapted layer in the base model, e.g.
    `"bert.encoder.layer.0.output.dense"`) to its weights `{"A": [r, d], "a": [r], "B": [d, r], "b": [d]}` for
    `h ↦ h + B f(A h + a) + b` with `f` = `non_linearity`. Single adapters trained with this library come from
    [`extract_adapter`]. All adapters must cover the same layers with the same shapes. An AdapterHub Pfeiffer
    adapter (`SeqBnConfig`: scaling 1, no gating, PHM or adapter LayerNorms) of a BERT-style model has the data flow of
    `placement='pfeiffer'`: per block, `adapter_down.0` gives A and a and `adapter_up` gives B and b, under the name of
    the block's output module (e.g. `"bert.encoder.layer.0.output"`). This mapping follows AdapterHub's source; it is
    not tested against the `adapters` library, which is not a dependency.

    **LoRA bank**: each adapter is a peft LoRA adapter, given as the folder `save_pretrained` wrote
    (`adapter_config.json` + `adapter_model.safetensors`), a loaded `PeftModel` (its one active adapter) or a
    `(model, adapter_name)` pair; or as factors `{layer name: {"A": [r, in], "B": [out, r]}}` with the scaling
    already in B (what [`extract_adapter`] gives for a profile over a LoRA bank). All must adapt the same modules
    (nn.Linear, or GPT-2's Conv1D with `fan_in_fan_out`) of the same base model; ranks may differ and are zero-padded
    to the largest. Each adapter's scaling (`lora_alpha / r`, `lora_alpha / √r` with rslora, per-module
    `alpha_pattern`) is folded into its B. DoRA and other variants whose effect is not `scaling · B A x` are refused,
    and so are adapters that train base biases; a trained head (`modules_to_save`) is not part of the bank and is
    left out. `non_linearity` is unused. A profile over a LoRA bank targets the bank's layers by default.
    """
    if not adapters:
        raise ValueError("`build_bank` needs at least one adapter.")
    is_bottleneck = [isinstance(adapter, Mapping) and not _is_factors(adapter) for adapter in adapters]
    if all(is_bottleneck):
        return _write_bank(_bottleneck_tensors(adapters), path, "bottleneck", len(adapters), non_linearity)
    if any(is_bottleneck):
        raise ValueError(
            f"`build_bank` got bottleneck adapters (dicts, e.g. adapter {is_bottleneck.index(True)}) and LoRA "
            f"adapters (e.g. adapter {is_bottleneck.index(False)}) together; a bank holds one kind. Build one bank per "
            "kind."
        )
    return _write_bank(_lora_tensors(adapters), path, "lora", len(adapters), None)


def _write_bank(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, kind: str, bank_size: int, non_linearity: str | None
) -> str:
    tensors = {name: tensor.detach().float().cpu() for name, tensor in tensors.items()}
    fingerprint = file_fingerprint(tensors, kind)
    metadata = {"format": BANK_FORMAT, "kind": kind, "fingerprint": fingerprint, "bank_size": str(bank_size)}
    if non_linearity is not None:
        metadata["non_linearity"] = non_linearity
    atomic_save_file(tensors, path, metadata)
    return fingerprint


def _bottleneck_tensors(adapters: Sequence[BottleneckAdapter]) -> dict[str, torch.Tensor]:
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
    return tensors


# -- LoRA banks ------------------------------------------------------------------------------------------------------

LoraFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer name -> (A [r, in], scaling · B [out, r])

# LoRA options under which an adapter computes something other than `scaling · B A x` on its layer (or changes the
# model elsewhere): a bank of bare factors would silently drop that part of what the adapter learned.
_LORA_VARIANTS = {
    "use_dora": "DoRA (a learned magnitude rescales each column of the merged weight)",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "aLoRA (activated only after invocation tokens)",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "target_parameters": "LoRA on parameters rather than modules",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "arrow_config": "Arrow routing",
    "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}


def _check_lora_config(config: Mapping, source: str) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{source} is a {config.get('peft_type')!r} adapter, not LoRA; `build_bank` takes peft LoRA adapters or "
            "bottleneck adapters given as `{layer name: {'A', 'a', 'B', 'b'}}` dicts."
        )
    for field_name, what in _LORA_VARIANTS.items():
        if config.get(field_name):
            raise ValueError(
                f"{source} uses {what} (`{field_name}={config[field_name]!r}`): its effect is not `scaling · B A x`, "
                "so X-PEFT masks cannot mix it. Pass plain LoRA adapters, trained without "
                f"`{field_name}`."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{source} trains base-layer biases (`bias={config['bias']!r}`), which a LoRA bank cannot hold: the bank "
            "would silently drop part of what the adapter learned. Pass LoRA adapters trained with `bias='none'`."
        )


def _lora_scaling(config: Mapping, layer_name: str, r: int) -> float:
    """peft's `scaling` of one LoRA layer (`LoraModel._create_and_replace`, `LoraLayer.update_layer`)."""
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), layer_name), config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _lora_from_folder(folder: str | os.PathLike) -> LoraFactors:
    folder = Path(folder)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no adapter_config.json, so it is not a saved peft adapter; pass the folder "
            "`save_pretrained` wrote, or the loaded PeftModel."
        )
    if not weights_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no adapter_model.safetensors (`build_bank` reads safetensors only); re-save the adapter "
            "with `save_pretrained(folder)` (safetensors is its default), or pass the loaded PeftModel."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{config_file} is not valid JSON ({error}); re-save the adapter with `save_pretrained`."
        ) from error
    _check_lora_config(config, str(folder))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_checked(weights_file).items():
        if "lora_embedding_" in key:
            raise ValueError(
                f"{folder} adapts an embedding ({key}); a LoRA bank takes adapters of nn.Linear (or GPT-2 Conv1D) "
                "layers only. Pass adapters whose `target_modules` are linear layers."
            )
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)].removeprefix(PEFT_PREFIX), {})[part] = tensor
    factors = {}
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise ValueError(f"{weights_file} holds only {list(pair)} for layer {name!r}; re-save the adapter.")
        A, B = pair["lora_A"], pair["lora_B"]
        factors[name] = (A, B * _lora_scaling(config, name, A.shape[0]) if A.dim() == 2 else B)
    return _checked_factors(factors, str(folder))


def _lora_from_model(model: nn.Module, adapter_name: str, source: str) -> LoraFactors:
    configs = getattr(model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(
            f"{source} has no adapter named {adapter_name!r}; its adapters are {sorted(configs)}. Pass one of them."
        )
    _check_lora_config(configs[adapter_name].to_dict(), f"{source} (adapter {adapter_name!r})")
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    factors = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear) or module.use_dora.get(adapter_name) or module.lora_bias[adapter_name]:
            raise ValueError(
                f"{source}: layer {name!r} of adapter {adapter_name!r} is a {type(module).__name__} (or uses DoRA or "
                "a LoRA bias); a LoRA bank takes plain LoRA adapters of nn.Linear or GPT-2 Conv1D layers. Leave such "
                "layers out of the adapter's `target_modules`."
            )
        scaling = module.scaling[adapter_name]
        factors[name] = (module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight * scaling)
    return _checked_factors(factors, f"{source} (adapter {adapter_name!r})")


def _checked_factors(factors: LoraFactors, source: str) -> LoraFactors:
    if not factors:
        raise ValueError(f"{source} holds no LoRA layers; pass a trained LoRA adapter.")
    for name, (A, B) in factors.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{source}: layer {name!r} has LoRA factors of shapes {list(A.shape)} and {list(B.shape)}, not "
                "[r, in] and [out, r]; a LoRA bank takes adapters of nn.Linear (or GPT-2 Conv1D) layers only."
            )
    return {name: (A.detach().float().cpu(), B.detach().float().cpu()) for name, (A, B) in factors.items()}


def _is_factors(adapter: Mapping) -> bool:
    return bool(adapter) and all(
        isinstance(parts, Mapping) and set(parts) == set(LORA_PARTS) for parts in adapter.values()
    )


def lora_factors(adapter: LoraAdapter, index: int = 0) -> LoraFactors:
    """`{layer name: (A [r, in], scaling · B [out, r])}` of one LoRA adapter given to [`build_bank`]."""
    if isinstance(adapter, Mapping):
        factors = {name: (parts["A"], parts["B"]) for name, parts in adapter.items()}
        return _checked_factors(factors, f"Adapter {index} (factors)")
    if isinstance(adapter, (str, os.PathLike)):
        return _lora_from_folder(adapter)
    if isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[1], str):
        return _lora_from_model(adapter[0], adapter[1], f"Adapter {index} (a model)")
    if isinstance(adapter, PeftModel):
        if len(adapter.active_adapters) != 1:
            raise ValueError(
                f"Adapter {index} is a PeftModel with active adapters {adapter.active_adapters}; pass a "
                "`(model, adapter_name)` pair to say which one goes into the bank."
            )
        return _lora_from_model(adapter, adapter.active_adapters[0], f"Adapter {index} (a PeftModel)")
    raise TypeError(
        f"Adapter {index} is a {type(adapter).__name__}; `build_bank` takes LoRA adapters as a saved folder, a "
        "PeftModel or a `(model, adapter_name)` pair, or bottleneck adapters as `{layer name: {'A', 'a', 'B', 'b'}}`."
    )


def _lora_tensors(adapters: Sequence[LoraAdapter]) -> dict[str, torch.Tensor]:
    """Stack N adapters' factors per layer, zero-padding each to the largest rank: a zero row of A_i and a zero
    column of B_j add nothing to any `B_j A_i`, so each adapter is unchanged."""
    factors = [lora_factors(adapter, i) for i, adapter in enumerate(adapters)]
    layer_names = sorted(factors[0])
    for i, other in enumerate(factors[1:], start=1):
        if sorted(other) != layer_names:
            only_first, only_other = sorted(set(layer_names) - set(other)), sorted(set(other) - set(layer_names))
            raise ValueError(
                f"LoRA adapters 0 and {i} adapt different modules (only in 0: {only_first}; only in {i}: "
                f"{only_other}). Every adapter of a LoRA bank must target the same modules of the same base model."
            )
    tensors = {}
    for name in layer_names:
        shapes = [(A.shape[1], B.shape[0]) for A, B in (f[name] for f in factors)]
        if len(set(shapes)) != 1:
            raise ValueError(
                f"LoRA adapters disagree on the (in, out) size of layer {name!r}: "
                f"{', '.join(f'adapter {i}: {shape}' for i, shape in enumerate(shapes))}. Every adapter of a LoRA "
                "bank must come from the same base model."
            )
        r = max(f[name][0].shape[0] for f in factors)
        tensors[f"{name}.A"] = torch.stack([F.pad(f[name][0], (0, 0, 0, r - f[name][0].shape[0])) for f in factors])
        tensors[f"{name}.B"] = torch.stack([F.pad(f[name][1], (0, r - f[name][1].shape[1])) for f in factors])
    return tensors


def lora_bank_targets(path: str | os.PathLike) -> list[str] | None:
    """The layer names of the LoRA bank file `path` (the default `target_modules` of a profile over it: its factors
    act where their adapters did), or None for a bottleneck bank file. Reads the header only."""
    check_bank_file_exists(path)
    if bank_kind(read_safetensors_metadata(path), path) != "lora":
        return None
    header = read_safetensors_header(path, fix="Rebuild it with `xpeft.x_peft.build_bank`.")
    return sorted({name.rsplit(".", 1)[0] for name in header})


class XPeftBank(nn.Module):
    """The bank of one model, held once by the tuner model; each X-PEFT layer keeps a reference and its layer name.

    The tensors are non-persistent buffers: they follow `model.to(...)` but never enter a state dict, so no profile
    ever contains them.
    """

    def __init__(
        self,
        source: str,
        bank_seed: int,
        bank_size: int,
        reduction_factor: int,
        non_linearity: str,
        init_scale: float = LEGACY_INIT_SCALE,
    ):
        super().__init__()
        self.source, self.bank_seed, self.bank_size = source, bank_seed, bank_size
        self.reduction_factor, self.non_linearity = reduction_factor, non_linearity
        # Only a random bank is drawn at a scale; a bank file's tensors are used as trained.
        self.init_scale = init_scale if source == "random" else LEGACY_INIT_SCALE
        self.kind = "bottleneck"  # a random bank's; a file's is read below
        self.parts = nn.ModuleDict({part: BufferDict({}, persistent=False) for part in PARTS})
        # A trained bank's file, verified once here; each layer's tensors are read from it when the layer is created,
        # so the model never holds the file's other layers (e.g. of layers it does not adapt) in memory.
        self._file: _BankFile | None = None
        self._file_layer_names: set[str] = set()
        if source == "random":
            recipe = random_bank_recipe(bank_seed, bank_size, reduction_factor, non_linearity, init_scale=init_scale)
            # Names the generator and its settings: two random banks are the same bank exactly when this matches.
            self.source_fingerprint = recipe_fingerprint(recipe)
            return
        self._file, metadata = read_bank_file(source)
        self.kind = bank_kind(metadata, source)
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

    @property
    def part_names(self) -> tuple[str, ...]:
        """The tensors each layer holds: `("A", "a", "B", "b")` for a bottleneck bank, `("A", "B")` for a LoRA bank."""
        return KINDS[self.kind]

    def ensure_layer(self, layer_name: str, d: int, device: torch.device, in_features: int | None = None) -> None:
        """Create (random) or fetch (file) the adapters of `layer_name`, whose output size is `d` (and input size
        `in_features`, checked for a LoRA bank, whose A reads the layer's input)."""
        key = _buffer_key(layer_name)
        if key in self.parts["A"]:
            return
        if self._file is None:
            r = bottleneck_size(layer_name, d, self.reduction_factor)
            tensors = random_bank_layer(self.bank_seed, layer_name, self.bank_size, d, r, self.init_scale)
        else:
            if layer_name not in self._file_layer_names:
                raise ValueError(
                    f"Bank file {self.source} has no adapters for layer {layer_name!r}; it covers "
                    f"{sorted(self._file_layer_names)}. Choose `target_modules` to match the bank."
                )
            check_bank_file_exists(self.source)
            tensors = self._file.get([f"{layer_name}.{part}" for part in self.part_names])
            tensors = {name.rsplit(".", 1)[1]: tensor for name, tensor in tensors.items()}
            bank_shape = (tensors["A"].shape[2], tensors["B"].shape[1]) if self.kind == "lora" else None
            if tensors["B"].shape[1] != d or (
                bank_shape and in_features is not None and bank_shape != (in_features, d)
            ):
                found = f"(in, out) = {bank_shape}" if bank_shape else f"d={tensors['B'].shape[1]}"
                raise ValueError(
                    f"Bank adapters of layer {layer_name!r} have {found}, layer has "
                    f"{f'(in, out) = ({in_features}, {d})' if bank_shape else d}: the bank was built for another "
                    "model; build one for this model with `build_bank`."
                )
        for part in self.part_names:
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
            self.bank_seed, self.bank_size, self.reduction_factor, self.non_linearity, layers, self.init_scale
        )
        return recipe_fingerprint(recipe)

    def layer_sizes(self) -> list[tuple[str, int]]:
        """`(name, d)` of the layers created so far."""
        return [(key.replace("/", "."), B.shape[1]) for key, B in self.parts["B"].items()]

    def layer(self, layer_name: str) -> tuple[torch.Tensor, ...]:
        """The tensors of `layer_name` in [`part_names`] order (`(A, a, B, b)` or `(A, B)`), on the bank's device."""
        key = _buffer_key(layer_name)
        return tuple(self.parts[part][key] for part in self.part_names)

    def layer_names(self) -> list[str]:
        """Names of the layers created so far, in creation order (the model's module order)."""
        return [key.replace("/", ".") for key in self.parts["A"]]

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """All layers created so far, as `{layer name: {part: tensor}}` (e.g. to save a random bank with `save_bank`)."""
        parts = self.part_names
        return {key.replace("/", "."): {part: self.parts[part][key] for part in parts} for key in self.parts["A"]}


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
    """Save the layers of `bank` as a bank file of its kind (e.g. to freeze a random bank); return its fingerprint."""
    tensors = {f"{name}.{part}": t for name, parts in bank.layer_tensors().items() for part, t in parts.items()}
    non_linearity = bank.non_linearity if bank.kind == "bottleneck" else None
    return _write_bank(tensors, Path(path), bank.kind, bank.bank_size, non_linearity)
