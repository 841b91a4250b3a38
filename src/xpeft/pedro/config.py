"""Configuration of PEDRO (DESIGN.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from .._registry import ensure_peft_type
from ..config_utils import (
    built_from_saved_config,
    check_scalar_fields,
    default_for_new_field,
    normalize_module_selection,
)
from ..loading import read_adapter_config
from .generator import GELU_RATIONAL_INIT

# The degrees of the rational activation (see `rational_degrees`): the paper's for a new config, and the only ones
# xpeft had before the field existed for a config read from an adapter saved then (its dict has no such key).
PAPER_RATIONAL_DEGREES = (6, 5)
LEGACY_RATIONAL_DEGREES = (5, 4)

# Per architecture: the module names PEDRO scales and their role in the block. "q" is the query projection, "v" the
# value projection, "u" the FFN up projection (the first FFN linear of non-gated FFNs) and "qv" GPT-2's fused
# query/key/value projection, of which only the query and value thirds are scaled.
PEDRO_ROLES: dict[str, dict[str, str]] = {
    "llama": {"q_proj": "q", "v_proj": "v", "up_proj": "u"},
    "mistral": {"q_proj": "q", "v_proj": "v", "up_proj": "u"},
    "qwen2": {"q_proj": "q", "v_proj": "v", "up_proj": "u"},
    "opt": {"q_proj": "q", "v_proj": "v", "fc1": "u"},
    "gpt2": {"c_attn": "qv", "c_fc": "u"},
    "bert": {"query": "q", "value": "v", "intermediate.dense": "u"},
    "roberta": {"query": "q", "value": "v", "intermediate.dense": "u"},
    "deberta-v2": {"query_proj": "q", "value_proj": "v", "intermediate.dense": "u"},
}


@dataclass
class PedroConfig(PeftConfig):
    """Configuration of a [`PedroModel`]: prompt-conditioned vectors that scale Q, V and the FFN up projection.

    Args:
        target_modules (`list[str]`, *optional*):
            Which of the block's query, value and FFN-up projections to scale, by module name. Defaults to all three
            for the supported model types (llama, mistral, qwen2, opt, gpt2, bert, roberta, deberta-v2); an explicit
            list must be a subset of those names and contain the query or the value projection.
        vg_rank (`int`):
            Bottleneck size r of each vector generator (down d→r, up r→d_q+d_v+d_ff), at most the hidden size d.
        pooler (`Literal["attention", "mean", "last"]`):
            How the prompt's hidden states are pooled: a learned softmax attention over prompt positions, their mean,
            or the last prompt token.
        generator_input (`Literal["normalized", "block"]`):
            What each block's vector generator pools: "normalized", the input of the block's query projection (the
            block input after its normalisation), or "block", the block input itself (the residual stream), which is
            what the paper describes ("the hidden states before the layer"). xpeft deviates from the paper by
            default; `benchmarks/results/pedro_study.md` compares the two.
        activation (`Literal["rational", "gelu", "relu"]`):
            Activation between down and up: a learnable rational activation initialised to GeLU (degrees
            `rational_degrees`), GeLU or ReLU. The rational's coefficients train with the other parameters under
            `Trainer`, or on a held-out split with `xpeft.pedro.BilevelTrainer` (the sibling papers' bi-level
            training).
        rational_degrees (`tuple[int, int]`, *optional*):
            Degrees (m, n) of the rational activation R(x) = (a_0 + ... + a_m x^m) / (1 + |b_1 x + ... + b_n x^n|):
            (6, 5), the form of the PEDRO group's sibling papers, or (5, 4). None (the default) means (6, 5) for a new
            config and (5, 4) for a config read from an adapter saved before this field existed (a dict with
            `peft_type` and without this key), which is what those adapters were trained with.
        init_weights (`bool`):
            If True the up projections start at zero, so every vector is 1 and the model equals the base model.
        layers_to_transform (`list[int] | int`, *optional*):
            Indices of the transformer blocks to adapt; all blocks if None.
        layers_pattern (`list[str] | str`, *optional*):
            Name of the block list (e.g. "layers" or "h"), used with `layers_to_transform`.
        exclude_modules (`list[str] | str`, *optional*):
            Module names or a regex of modules not to adapt.
        modules_to_save (`list[str]`, *optional*):
            Modules besides the PEDRO layers that are trained and saved, e.g. a classification head.
    """

    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Which of the block's query, value and FFN-up projections to scale, by module name. Defaults to "
            "all three for the supported model types (llama, mistral, qwen2, opt, gpt2, bert, roberta, deberta-v2); "
            "an explicit list must be a subset of those names and contain the query or the value projection."
        },
    )
    vg_rank: int = field(
        default=12,
        metadata={
            "help": "Bottleneck size r of each vector generator (down d→r, up r→d_q+d_v+d_ff), at most the hidden size d."
        },
    )
    pooler: Literal["attention", "mean", "last"] = field(
        default="attention",
        metadata={
            "help": "How the prompt's hidden states are pooled: a learned softmax attention over prompt positions, "
            "their mean, or the last prompt token."
        },
    )
    generator_input: Literal["normalized", "block"] = field(
        default="normalized",
        metadata={
            "help": "What each block's vector generator pools: \"normalized\", the input of the block's query "
            'projection (the block input after its normalisation), or "block", the block input itself (the '
            'residual stream), which is what the paper describes ("the hidden states before the layer"). xpeft '
            "deviates from the paper by default; `benchmarks/results/pedro_study.md` compares the two."
        },
    )
    activation: Literal["rational", "gelu", "relu"] = field(
        default="rational",
        metadata={
            "help": "Activation between down and up: a learnable rational activation initialised to GeLU (degrees "
            "`rational_degrees`), GeLU or ReLU. The rational's coefficients train with the other parameters under "
            "`Trainer`, or on a held-out split with `xpeft.pedro.BilevelTrainer` (the sibling papers' bi-level "
            "training)."
        },
    )
    rational_degrees: tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Degrees (m, n) of the rational activation R(x) = (a_0 + ... + a_m x^m) / (1 + |b_1 x + ... + "
            "b_n x^n|): (6, 5), the form of the PEDRO group's sibling papers, or (5, 4). None (the default) means "
            "(6, 5) for a new config and (5, 4) for a config read from an adapter saved before this field existed (a "
            "dict with `peft_type` and without this key), which is what those adapters were trained with."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "If True the up projections start at zero, so every vector is 1 and the model equals the base "
            "model."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the transformer blocks to adapt; all blocks if None."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": 'Name of the block list (e.g. "layers" or "h"), used with `layers_to_transform`.'},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the PEDRO layers that are trained and saved, e.g. a classification head."},
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        # Checks the folder's files and notes the folder on the config (see xpeft.loading).
        return read_adapter_config(super().from_pretrained, pretrained_model_name_or_path, subfolder, **kwargs)

    def __post_init__(self) -> None:
        from_saved_config = built_from_saved_config(self)
        super().__post_init__()
        self.peft_type = ensure_peft_type("PEDRO")
        if isinstance(self.target_modules, str):
            # Roles (query, value, FFN up) are looked up by module name, which a regex cannot provide.
            raise ValueError(
                f"`target_modules` must be a list of module names for PEDRO, got the string {self.target_modules!r}; "
                "pass e.g. ['q_proj', 'v_proj', 'up_proj'] or None for the architecture's defaults."
            )
        normalize_module_selection(self)
        if not isinstance(self.vg_rank, int) or self.vg_rank < 1:
            raise ValueError(f"`vg_rank` must be a positive integer, got {self.vg_rank!r}.")
        if self.pooler not in ("attention", "mean", "last"):
            raise ValueError(f"`pooler` must be 'attention', 'mean' or 'last', got {self.pooler!r}.")
        if self.generator_input not in ("normalized", "block"):
            raise ValueError(f"`generator_input` must be 'normalized' or 'block', got {self.generator_input!r}.")
        if self.activation not in ("rational", "gelu", "relu"):
            raise ValueError(f"`activation` must be 'rational', 'gelu' or 'relu', got {self.activation!r}.")
        self.rational_degrees = _check_rational_degrees(
            default_for_new_field(
                self.rational_degrees,
                from_saved_config=from_saved_config,
                default=PAPER_RATIONAL_DEGREES,
                legacy=LEGACY_RATIONAL_DEGREES,
            )
        )
        check_scalar_fields(self)  # last: the checks above give the more specific message where they apply


def _check_rational_degrees(degrees) -> tuple[int, int]:
    pair = tuple(degrees) if isinstance(degrees, (list, tuple)) else degrees
    if pair not in GELU_RATIONAL_INIT:
        raise ValueError(
            f"`rational_degrees` must be one of {', '.join(map(str, GELU_RATIONAL_INIT))} (the degrees (m, n) with a "
            f"fitted GeLU initialisation), got {degrees!r}. Pass e.g. (6, 5) (in adapter_config.json: [6, 5])."
        )
    return pair
