"""Configuration of the X-PEFT tuner (DESIGN.md §2, arXiv 2401.16137)."""

from __future__ import annotations

import contextvars
import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from peft.config import PeftConfig

from .._registry import ensure_peft_type
from ..config_utils import (
    built_from_saved_config,
    check_scalar_fields,
    default_for_new_field,
    normalize_module_selection,
)
from ..loading import loaded_from, read_adapter_config
from ..serialization import TEMP_INFIX, read_safetensors_metadata
from .bank import LEGACY_INIT_SCALE

DEFAULT_INIT_SCALE = 10.0
"""`bank_init_scale` of a new config (see `XPeftConfig`)."""

NAME = "xpeft"
# 1000x the paper's N=100. Each layer's bank and each profile's masks grow with N; the bank's memory is bounded
# separately, from the model's layer sizes, by `xpeft.x_peft.bank.MAX_BANK_BYTES`.
MAX_BANK_SIZE = 100_000
# A random adapter at scale 1 already adds a residual about 0.7x the norm of MiniLM's FFN output; 1000x that only
# drowns the model.
MAX_BANK_INIT_SCALE = 1000.0
BANK_PATH_ENV = "XPEFT_BANK_PATH"
"""Environment variable: folders (or bank files), separated by `os.pathsep`, searched for a loaded profile's bank."""
# Set while `XPeftConfig.from_pretrained` builds a config from a file: a relative `bank` there is relative to the
# profile folder, not to the current directory, and is resolved once the folder is known.
_READING_SAVED_CONFIG = contextvars.ContextVar("xpeft_reading_saved_config", default=False)
_STAGED_FOLDER = re.compile(r"\.(.+)" + re.escape(TEMP_INFIX) + "[0-9a-f]{32}")


def portable_bank_path(bank: str, save_directory: str | os.PathLike) -> str:
    """The `bank` a profile saved in `save_directory` records: the bank file's path relative to the profile folder
    (POSIX separators), or only its file name when the two share no folder but the file system's root (e.g.
    `push_to_hub` saves into a temporary folder), so that no absolute local path is ever written."""
    folder = Path(os.path.realpath(save_directory))
    # A crash-safe save (xpeft.saving) writes into a temporary sibling `.{name}.xpeft-tmp-<hex>` of the folder.
    folder = Path(*(m.group(1) if (m := _STAGED_FOLDER.fullmatch(part)) else part for part in folder.parts))
    target = Path(os.path.realpath(bank))
    try:
        common = Path(os.path.commonpath([folder, target]))
    except ValueError:  # another drive
        return target.name
    if common == Path(common.anchor):
        return target.name
    return Path(os.path.relpath(target, folder)).as_posix()


def _fingerprint_of(path: Path) -> str | None:
    try:
        return read_safetensors_metadata(path).get("fingerprint")
    except (OSError, ValueError):  # unreadable or not a safetensors file: not the bank
        return None


def resolve_bank_path(recorded: str, fingerprint: str | None, folder: Path | None, bank_path=None) -> str:
    """The absolute path of a loaded profile's bank file, found by its recorded path and checked by fingerprint.

    Searched in order: `bank_path` (a bank file, or a folder holding one with the recorded file name; used alone when
    given), then each entry of `$XPEFT_BANK_PATH` (folders or files, separated by `os.pathsep`), then the recorded
    path, relative to the profile `folder` (an absolute path of an older profile is used as is). The first file whose
    header records the profile's `fingerprint` wins.
    """
    name = Path(recorded).name

    def candidate(entry) -> Path:
        path = Path(os.path.expanduser(os.fspath(entry)))
        return path / name if path.is_dir() else path

    if bank_path is not None:
        candidates = [("`bank_path`", candidate(bank_path))]
    else:
        entries = [e for e in os.environ.get(BANK_PATH_ENV, "").split(os.pathsep) if e]
        candidates = [(f"${BANK_PATH_ENV}", candidate(entry)) for entry in entries]
        if Path(recorded).is_absolute():
            candidates.append(("the recorded absolute path", Path(recorded)))
        elif folder is not None:
            candidates.append(("the path recorded relative to the profile", folder / recorded))
    others = []
    for origin, path in candidates:
        if not path.is_file():
            continue
        found = _fingerprint_of(path)
        if fingerprint is None or found == fingerprint:
            return os.path.abspath(path)
        others.append(f"{path} (from {origin}: fingerprint {found})")
    if others:
        raise ValueError(
            f"This X-PEFT profile was trained against bank {fingerprint}, but the bank files found for it are other "
            f"banks: {'; '.join(others)}. Point `bank_path` or ${BANK_PATH_ENV} at the bank the profile was trained "
            "with."
        )
    searched = "; ".join(f"{path} (from {origin})" for origin, path in candidates) or "nowhere"
    raise FileNotFoundError(
        f"X-PEFT bank file {name!r} (fingerprint {fingerprint}) of this profile not found; searched: {searched}. A "
        "bank is never saved with its profiles: pass its path, `PeftModel.from_pretrained(base, profile_dir, "
        f"bank_path='path/to/{name}')` (a file or its folder), or list its folder in ${BANK_PATH_ENV}, or put it "
        f"at the path recorded relative to the profile ({recorded!r})."
    )


@dataclass
class XPeftConfig(PeftConfig):
    """Configuration of an X-PEFT profile: mask logits over a frozen bank of bottleneck adapters.

    A profile trains only two mask vectors of `bank_size` logits per adapted layer; the bank is shared by all
    profiles of a model and never saved with them.

    Defaults where the paper is silent are xpeft's choices, measured (issue 17; `benchmarks/random_bank.py` →
    `benchmarks/results/random_bank_screen.json`: spam on all-MiniLM-L6-v2, the 1209 test mails, seed 0, batch 16,
    100 steps, mask lr 0.1; always "ham" scores 0.687). `bank_init_scale=10`: issue 17 found one random adapter of
    the scale-1 bank adding a residual 0.7x the norm of the layer output it joins, and the uniform soft mix of 100
    only 0.01x, too little to beat the head alone (0.835-0.873); at scale 10 the soft mix adds 0.071x and scores
    0.902 (head alone, 100 steps: 0.858). `hard_k=32`: a hard mask averages k adapters, about 1/k of one adapter's
    residual, so k=1 at scale 10 would add about 7x the layer output; k=32 adds 0.227x and scores 0.902 (issue 17:
    k=1 over the scale-1 bank at lr 1e-2, the old defaults, 0.708). Mask learning rate 0.1, the one the docs
    recommend (issue 17: the x10 bank at lr 1e-2 scored 0.854). At 1,000 steps (`random_bank.json`) the defaults
    score 0.938 (hard) and 0.931 (soft) against 0.907 for the head alone and 0.979 for a dedicated adapter; scale 30
    (0.942, 0.945) is within the standard error (about 0.007) of scale 10, and the old defaults (k=1, scale 1) score
    0.880. Chatterbot topic detection, 2 topics x 30 steps
    (`random_bank_topics.json`): soft 0.832, hard k=32 0.799, head alone 0.772.

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            The modules to adapt (the feed-forward output projection of each block). If None, a per-architecture default is used: 'output.dense' of each layer (not 'attention.output.dense') for BERT, RoBERTa and DeBERTa-v2, 'mlp.c_proj' for GPT-2, 'fc2' for OPT and 'down_proj' for Llama, Mistral and Qwen2.
        exclude_modules (`Optional[Union[list[str], str]]`):
            The modules not to adapt, as a list of name suffixes or a regex.
        bank_size (`int`):
            Number N of bottleneck adapters in the bank of every adapted layer, at most 100,000 (`MAX_BANK_SIZE`).
        reduction_factor (`int`):
            Bottleneck size r = d / reduction_factor, with d the output size of the adapted layer.
        non_linearity (`Literal['relu', 'gelu', 'silu', 'tanh']`):
            The activation f of the bottleneck, B f(A h + a) + b.
        mask_type (`Literal['soft', 'hard']`):
            'soft': softmax weights over the bank; 'hard': a binary top-k mask per layer divided by k, trained with a straight-through estimator.
        hard_k (`int`):
            Number of bank adapters each hard mask selects per layer (only used when mask_type is 'hard'); at most bank_size, so a hard profile over a bank of fewer than 32 adapters sets it.
        bank (`str`):
            'random' for a seeded random bank regenerated from its recipe, or the path of a bank file written by `save_bank` or `build_bank`; a relative path is made absolute against the current directory. The bank is never saved with a profile: `save_pretrained` records its path relative to the profile folder (only its file name if the two share no folder but the root, so no absolute local path is written) next to `bank_fingerprint`. Loading looks for the bank, in order: at `bank_path` (a file or its folder) if passed to `XPeftConfig.from_pretrained` or `PeftModel.from_pretrained`; in each folder of the environment variable XPEFT_BANK_PATH (separated by `os.pathsep`); at the recorded path, relative to the profile folder (an absolute path of an older profile as is). The first file with the recorded fingerprint is used.
        bank_seed (`int`):
            Seed of the random bank (only used when bank is 'random'); an integer, never a bool or a string.
        bank_init_scale (`Optional[float]`):
            Scale s of the random bank (only used when bank is 'random'; a bank file is used as trained and ignores it): each random adapter's up projection B and output bias b are drawn s times larger, so every composed adapter, soft or hard, adds exactly s times the residual of the scale-1 bank (the hidden f(A h + a) is untouched, so this holds for any non-linearity). It scales the bank, not a mask type: the bank stays shared by soft and hard profiles, and the size of a mix (the mean of N adapters for a uniform soft mask, of k for a hard one) is set by the mask (see `hard_k`). None (the default) means 10.0 for a new config and 1.0, the bank of profiles saved before this field existed, for a config read from such a profile (a saved dict without this key), so that it loads with its own bank. A float in (0, 1000], part of the random bank's recipe and fingerprint.
        bank_fingerprint (`Optional[str]`):
            Fingerprint of the bank the profile was trained against (of a random bank: its recipe and the adapted layers' names and sizes); filled in automatically for a new profile, required and checked when a saved profile is loaded.
        init_weights (`bool`):
            If True, soft mask logits start at zero (a uniform mix of the bank) and hard mask logits at small random values; if False, all logits are drawn from N(0, 1) (for tests).
        save_mask_logits (`bool`):
            Hard masks only (soft masks always save their logits): if True, `save_pretrained` also writes the float32 mask logits, 4·2·L·N bytes instead of the 2·L·N bits of the selection (32x larger: 9.6 KB instead of 300 bytes for L=12, N=100), so that training resumes exactly where it stopped. If False (default), a reloaded hard profile gives the same outputs (the selection is exact) but its logits restart at 1 for the selected adapters and 0 for the others, so further training takes another path.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            The layer indices to adapt; all matching layers if None.
        layers_pattern (`Optional[Union[list[str], str]]`):
            The name of the layer list, used only with layers_to_transform.
        modules_to_save (`Optional[list[str]]`):
            Modules besides the adapted layers that are trained and saved with the profile (e.g. a classifier head).
        placement (`Literal['ffn_output', 'pfeiffer']`):
            Where a bottleneck bank's adapter sits. 'ffn_output': on the raw output h of each targeted projection, y = h + B f(A h + a) + b (for BERT: before the dropout, residual and LayerNorm of `output`). 'pfeiffer': AdapterHub's Pfeiffer (SeqBn) data flow on BERT-style block output modules (`dense`, `dropout`, `LayerNorm`, called with the residual r): y = LN(h + Δ(LN(h + r)) + r) with h = dropout(dense(x)); the targets are those modules (default for BERT, RoBERTa and DeBERTa-v2: each layer's 'output'), and banks built for one placement do not fit the other. Default 'ffn_output' keeps profiles and banks made before this option unchanged. Unused by LoRA banks, whose factors act where their adapters did.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "The modules to adapt (the feed-forward output projection of each block). If None, a per-architecture default is used: 'output.dense' of each layer (not 'attention.output.dense') for BERT, RoBERTa and DeBERTa-v2, 'mlp.c_proj' for GPT-2, 'fc2' for OPT and 'down_proj' for Llama, Mistral and Qwen2."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "The modules not to adapt, as a list of name suffixes or a regex."}
    )
    bank_size: int = field(
        default=100,
        metadata={
            "help": "Number N of bottleneck adapters in the bank of every adapted layer, at most 100,000 (`MAX_BANK_SIZE`)."
        },
    )
    reduction_factor: int = field(
        default=16,
        metadata={"help": "Bottleneck size r = d / reduction_factor, with d the output size of the adapted layer."},
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = field(
        default="relu", metadata={"help": "The activation f of the bottleneck, B f(A h + a) + b."}
    )
    mask_type: Literal["soft", "hard"] = field(
        default="soft",
        metadata={
            "help": "'soft': softmax weights over the bank; 'hard': a binary top-k mask per layer divided by k, trained with a straight-through estimator."
        },
    )
    hard_k: int = field(
        default=32,
        metadata={
            "help": "Number of bank adapters each hard mask selects per layer (only used when mask_type is 'hard'); at most bank_size, so a hard profile over a bank of fewer than 32 adapters sets it."
        },
    )
    bank: str = field(
        default="random",
        metadata={
            "help": "'random' for a seeded random bank regenerated from its recipe, or the path of a bank file written by `save_bank` or `build_bank`; a relative path is made absolute against the current directory. The bank is never saved with a profile: `save_pretrained` records its path relative to the profile folder (only its file name if the two share no folder but the root, so no absolute local path is written) next to `bank_fingerprint`. Loading looks for the bank, in order: at `bank_path` (a file or its folder) if passed to `XPeftConfig.from_pretrained` or `PeftModel.from_pretrained`; in each folder of the environment variable XPEFT_BANK_PATH (separated by `os.pathsep`); at the recorded path, relative to the profile folder (an absolute path of an older profile as is). The first file with the recorded fingerprint is used."
        },
    )
    bank_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the random bank (only used when bank is 'random'); an integer, never a bool or a string."
        },
    )
    bank_init_scale: float | None = field(
        default=None,
        metadata={
            "help": "Scale s of the random bank (only used when bank is 'random'; a bank file is used as trained and ignores it): each random adapter's up projection B and output bias b are drawn s times larger, so every composed adapter, soft or hard, adds exactly s times the residual of the scale-1 bank (the hidden f(A h + a) is untouched, so this holds for any non-linearity). It scales the bank, not a mask type: the bank stays shared by soft and hard profiles, and the size of a mix (the mean of N adapters for a uniform soft mask, of k for a hard one) is set by the mask (see `hard_k`). None (the default) means 10.0 for a new config and 1.0, the bank of profiles saved before this field existed, for a config read from such a profile (a saved dict without this key), so that it loads with its own bank. A float in (0, 1000], part of the random bank's recipe and fingerprint."
        },
    )
    bank_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the bank the profile was trained against (of a random bank: its recipe and the adapted layers' names and sizes); filled in automatically for a new profile, required and checked when a saved profile is loaded."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "If True, soft mask logits start at zero (a uniform mix of the bank) and hard mask logits at small random values; if False, all logits are drawn from N(0, 1) (for tests)."
        },
    )
    save_mask_logits: bool = field(
        default=False,
        metadata={
            "help": "Hard masks only (soft masks always save their logits): if True, `save_pretrained` also writes the float32 mask logits, 4·2·L·N bytes instead of the 2·L·N bits of the selection (32x larger: 9.6 KB instead of 300 bytes for L=12, N=100), so that training resumes exactly where it stopped. If False (default), a reloaded hard profile gives the same outputs (the selection is exact) but its logits restart at 1 for the selected adapters and 0 for the others, so further training takes another path."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "The layer indices to adapt; all matching layers if None."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "The name of the layer list, used only with layers_to_transform."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules besides the adapted layers that are trained and saved with the profile (e.g. a classifier head)."
        },
    )

    placement: Literal["ffn_output", "pfeiffer"] = field(
        default="ffn_output",
        metadata={
            "help": "Where a bottleneck bank's adapter sits. 'ffn_output': on the raw output h of each targeted projection, y = h + B f(A h + a) + b (for BERT: before the dropout, residual and LayerNorm of `output`). 'pfeiffer': AdapterHub's Pfeiffer (SeqBn) data flow on BERT-style block output modules (`dense`, `dropout`, `LayerNorm`, called with the residual r): y = LN(h + Δ(LN(h + r)) + r) with h = dropout(dense(x)); the targets are those modules (default for BERT, RoBERTa and DeBERTa-v2: each layer's 'output'), and banks built for one placement do not fit the other. Default 'ffn_output' keeps profiles and banks made before this option unchanged. Unused by LoRA banks, whose factors act where their adapters did."
        },
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, bank_path=None, **kwargs):
        """Read a saved profile's config; `bank_path` (a bank file, or the folder holding it) is where to find its
        bank first (see `bank`). Also reached as `PeftModel.from_pretrained(base, profile_dir, bank_path=...)`."""
        token = _READING_SAVED_CONFIG.set(True)
        try:
            # Checks the folder's files and notes the folder on the config (see xpeft.loading).
            config = read_adapter_config(super().from_pretrained, pretrained_model_name_or_path, subfolder, **kwargs)
        finally:
            _READING_SAVED_CONFIG.reset(token)
        if config.bank != "random":
            source = loaded_from(config)
            folder = source.folder if source is not None else None
            config.bank = resolve_bank_path(config.bank, config.bank_fingerprint, folder, bank_path)
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if self.bank == "random":
            return super().save_pretrained(save_directory, **kwargs)
        saved = copy.copy(self)
        saved.bank = portable_bank_path(self.bank, save_directory)
        return PeftConfig.save_pretrained(saved, save_directory, **kwargs)

    def __post_init__(self) -> None:
        from_saved_config = built_from_saved_config(self)
        super().__post_init__()
        self.peft_type = ensure_peft_type(NAME.upper())
        if not isinstance(self.bank, (str, os.PathLike)):
            raise ValueError(
                f"`bank` must be 'random' or the path of a bank file, got {self.bank!r} ({type(self.bank).__name__})."
            )
        if self.bank != "random" and not _READING_SAVED_CONFIG.get():
            # A path given in code is relative to the current directory; make it independent of later `chdir`s.
            self.bank = os.path.abspath(os.path.expanduser(os.fspath(self.bank)))
        normalize_module_selection(self)
        if not isinstance(self.bank_size, int) or self.bank_size < 1:
            raise ValueError(f"`bank_size` must be a positive integer, got {self.bank_size!r}.")
        if self.bank_size > MAX_BANK_SIZE:
            raise ValueError(
                f"`bank_size`={self.bank_size} exceeds the limit of {MAX_BANK_SIZE:,} adapters per layer (the paper "
                "uses 100); lower `bank_size`."
            )
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"`reduction_factor` must be a positive integer, got {self.reduction_factor!r}.")
        if self.non_linearity not in ("relu", "gelu", "silu", "tanh"):
            raise ValueError(
                f"`non_linearity` must be one of 'relu', 'gelu', 'silu', 'tanh', got {self.non_linearity!r}."
            )
        if self.placement not in ("ffn_output", "pfeiffer"):
            raise ValueError(f"`placement` must be 'ffn_output' or 'pfeiffer', got {self.placement!r}.")
        if self.mask_type not in ("soft", "hard"):
            raise ValueError(f"`mask_type` must be 'soft' or 'hard', got {self.mask_type!r}.")
        if self.mask_type == "hard" and not (isinstance(self.hard_k, int) and 1 <= self.hard_k <= self.bank_size):
            raise ValueError(
                f"`hard_k` must be an integer between 1 and bank_size={self.bank_size}, got {self.hard_k!r} (the "
                "default is 32, for the paper's bank of 100); lower `hard_k` or raise `bank_size`."
            )
        scale = default_for_new_field(
            self.bank_init_scale, from_saved_config=from_saved_config, default=DEFAULT_INIT_SCALE, legacy=LEGACY_INIT_SCALE
        )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_BANK_INIT_SCALE:
            raise ValueError(
                f"`bank_init_scale` must be a number in (0, {MAX_BANK_INIT_SCALE:g}], got {scale!r}; pass e.g. "
                "1.0 (the bank of xpeft before this field) or a larger scale for a stronger random bank."
            )
        self.bank_init_scale = float(scale)
        check_scalar_fields(self)  # last: the checks above give the more specific message where they apply
