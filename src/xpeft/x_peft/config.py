"""Configuration of the X-PEFT tuner (DESIGN.md §2, arXiv 2401.16137)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .._registry import ensure_peft_type
from ..config_utils import check_scalar_fields, normalize_module_selection
from ..loading import read_adapter_config

NAME = "xpeft"
# 1000x the paper's N=100. Each layer's bank and each profile's masks grow with N; the bank's memory is bounded
# separately, from the model's layer sizes, by `xpeft.x_peft.bank.MAX_BANK_BYTES`.
MAX_BANK_SIZE = 100_000


@dataclass
class XPeftConfig(PeftConfig):
    """Configuration of an X-PEFT profile: mask logits over a frozen bank of bottleneck adapters.

    A profile trains only two mask vectors of `bank_size` logits per adapted layer; the bank is shared by all
    profiles of a model and never saved with them.

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
            Number of bank adapters each hard mask selects per layer (only used when mask_type is 'hard').
        bank (`str`):
            'random' for a seeded random bank regenerated from its recipe, or the path of a bank file written by `save_bank` or `build_bank`. A relative path is made absolute (against the current directory) when the config is created or attached, so that a saved profile finds its bank from any working directory; the bank itself is never saved with a profile.
        bank_seed (`int`):
            Seed of the random bank (only used when bank is 'random'); an integer, never a bool or a string.
        bank_fingerprint (`Optional[str]`):
            Fingerprint of the bank the profile was trained against (of a random bank: its recipe and the adapted layers' names and sizes); filled in automatically for a new profile, required and checked when a saved profile is loaded.
        init_weights (`bool`):
            If True, soft mask logits start at zero (a uniform mix of the bank) and hard mask logits at small random values; if False, all logits are drawn from N(0, 1) (for tests).
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
        default=1,
        metadata={
            "help": "Number of bank adapters each hard mask selects per layer (only used when mask_type is 'hard')."
        },
    )
    bank: str = field(
        default="random",
        metadata={
            "help": "'random' for a seeded random bank regenerated from its recipe, or the path of a bank file written by `save_bank` or `build_bank`. A relative path is made absolute (against the current directory) when the config is created or attached, so that a saved profile finds its bank from any working directory; the bank itself is never saved with a profile."
        },
    )
    bank_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the random bank (only used when bank is 'random'); an integer, never a bool or a string."
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
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        # Checks the folder's files and notes the folder on the config (see xpeft.loading).
        return read_adapter_config(super().from_pretrained, pretrained_model_name_or_path, subfolder, **kwargs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type(NAME.upper())
        if not isinstance(self.bank, (str, os.PathLike)):
            raise ValueError(
                f"`bank` must be 'random' or the path of a bank file, got {self.bank!r} ({type(self.bank).__name__})."
            )
        if self.bank != "random":
            # Saved profiles record this path: make it independent of the directory the profile is later loaded from.
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
                f"`hard_k` must be an integer between 1 and bank_size={self.bank_size}, got {self.hard_k!r}; "
                "lower `hard_k` or raise `bank_size`."
            )
        check_scalar_fields(self)  # last: the checks above give the more specific message where they apply
