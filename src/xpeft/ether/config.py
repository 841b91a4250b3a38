"""Configuration of ETHER / ETHER+ adapters (DESIGN.md §1, arXiv 2405.20271)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from peft.config import PeftConfig

from .._registry import ensure_peft_type
from ..config_utils import check_scalar_fields, normalize_module_selection
from ..loading import read_adapter_config

EtherVariant = Literal["ether", "ether_plus", "ether_plus_one_sided"]
BlockLayout = Literal["paper", "reference_code"]


@dataclass
class EtherConfig(PeftConfig):
    """Configuration of an [`EtherModel`]: block-diagonal hyperplane reflections of a layer's weights.

    The weight layout (`nn.Linear` `[out, in]` or transformers `Conv1D` `[in, out]`, peft's `fan_in_fan_out`) is read
    from each layer's type. `fan_in_fan_out` exists so that LoRA keyword arguments carry over; an explicit value is
    checked against each layer and corrected with a warning where it is wrong.

    Learning rate and start (measured, the paper is silent; benchmarks/README.md, `ether_quality.json`): ETHER+ starts
    at the base model and tunes language models best at LoRA's learning rates, 1e-3 on q,v and 3e-4 on all linear
    layers (SmolLM2-135M, 40 steps: held-out perplexity 1.00x and 1.02x LoRA r=8's); at 1e-2 it diverges on all
    linear layers. For a freshly initialised classifier head, 1e-2 (MiniLM spam: 0.963 accuracy). Plain ETHER starts
    from a random reflection in every block: an input spread over all directions moves by about 2 sqrt(n/d) of its norm
    per adapted layer (0.56 at n=32, d=384, measured), so the model starts far from the base (SmolLM2 answer loss 7.86
    against 3.80). Use it with few blocks (n_blocks=4) and lr 1e-2 to 3e-2 (SmolLM2 q,v: perplexity 17.2, 1.10x LoRA),
    or prefer ETHER+.

    Args:
        target_modules (`Optional[Union[list[str], str]]`):
            The names of the modules to apply ETHER to. A list of names matches modules whose name is, or ends with,
            one of them; a string is a regex matched against the full module name; 'all-linear' targets every linear
            and transformers Conv1D (GPT-2) layer except the output layer. If None, the attention query/value
            projections of known architectures are chosen. `nn.Conv1d/2d/3d` layers are adapted when matched by name:
            ETHER acts on their weight flattened to `[out_channels, in_channels/groups x kernel elements]`.
        exclude_modules (`Optional[Union[list[str], str]]`):
            The names of the modules not to adapt, as a list of names or a regex string.
        n_blocks (`int`):
            Number of diagonal blocks n: each adapted feature axis of size d is cut into n contiguous chunks of d/n
            features, each with its own reflection. The parameter count does not depend on n; larger n is faster. The
            default 32 is the paper's best setting (Llama-2-7B, n=32); d must be divisible by n with at least two
            features per block.
        variant (`Literal['ether', 'ether_plus', 'ether_plus_one_sided']`):
            'ether': one Householder reflection H = I - 2uu^T on the layer's input features (W' = W H). 'ether_plus':
            the paper's ETHER+, H+ = I - uu^T + vv^T on both sides (W' = H+_out W H+_in). 'ether_plus_one_sided': H+
            on the input side only (the official code's ablation).
        init_weights (`bool`):
            If True, the paper's initialization: u Kaiming-uniform and, for ETHER+, v = -u so that H+ = I and the
            model starts unchanged. If False, v is drawn independently of u (ETHER+ then does not start at the
            identity; |u.v| is then about sqrt(n/d), H+ nearly singular, and unmerging in float32 is often
            refused, see `EtherLayer.unmerge_error`). Plain ETHER always starts from a random reflection: H = I is
            out of its reach.
        block_layout (`Literal['paper', 'reference_code']`):
            Which weight blocks each input-side transform acts on. 'paper' (the paper's equations): W' = W diag(H_1 ..
            H_n), block c of the input features transformed by H_c. 'reference_code': what the official code
            (mwbini/ether, lit_gpt/ether.py, ETHERLinear.forward) computes, and what the paper's published numbers came
            from: its reshape of the [out, in] weight to [n, out, in/n] splits the output rows into n groups R_r of
            out/n rows, and H_r transforms every input chunk C_c of its group, W'[R_r, C_c] = W[R_r, C_c] H_r; it
            equals 'paper' only at n = 1, and needs out_features divisible by n too. The variants 'ether',
            'ether_plus_one_sided' and 'ether_plus' are the official code's Htype 'ether', 'etherplus' and
            'etherplusHH'; the output side of 'ether_plus' (H+_out W, row blocks) is the same in both layouts, as
            there. Same parameters in both layouts, activation-side and mergeable; 'reference_code' adds a pass over
            the weight per forward (W_b u products), and stacking it with other active adapters runs on the transformed
            weight.
        ether_dropout (`float`):
            Dropout probability on the adapted layer's input, as the official code's `ether_dropout` (which drops the
            whole layer's input, not a side branch). Only active in training and on unmerged adapters.
        layers_to_transform (`Optional[Union[list[int], int]]`):
            The layer indices to adapt; if None, all layers matching `target_modules` are adapted.
        layers_pattern (`Optional[Union[list[str], str]]`):
            The name of the `nn.ModuleList` holding the layers (e.g. 'layers' or 'h'); used only with
            `layers_to_transform`.
        modules_to_save (`Optional[list[str]]`):
            Modules apart from the ETHER layers to train and save, e.g. a freshly initialized classifier head.
        fan_in_fan_out (`Optional[bool]`):
            Whether the target layers store their weight as `[in, out]` (True for GPT-2's `Conv1D`). None reads it
            from each layer's type; an explicit value that contradicts a layer's type is corrected for that layer with
            a warning, as peft's LoRA does.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "The names of the modules to apply ETHER to. A list of names matches modules whose name is, or ends "
                "with, one of them; a string is a regex matched against the full module name; 'all-linear' targets "
                "every linear and transformers Conv1D (GPT-2) layer except the output layer. If None, the attention "
                "query/value projections of known architectures are chosen. `nn.Conv1d/2d/3d` layers are adapted when "
                "matched by name: ETHER acts on their weight flattened to `[out_channels, in_channels/groups x kernel "
                "elements]`."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "The names of the modules not to adapt, as a list of names or a regex string."},
    )
    n_blocks: int = field(
        default=32,
        metadata={
            "help": (
                "Number of diagonal blocks n: each adapted feature axis of size d is cut into n contiguous chunks of "
                "d/n features, each with its own reflection. The parameter count does not depend on n; larger n is "
                "faster. The default 32 is the paper's best setting (Llama-2-7B, n=32); d must be divisible by n with "
                "at least two features per block."
            )
        },
    )
    variant: EtherVariant = field(
        default="ether",
        metadata={
            "help": (
                "'ether': one Householder reflection H = I - 2uu^T on the layer's input features (W' = W H). "
                "'ether_plus': the paper's ETHER+, H+ = I - uu^T + vv^T on both sides (W' = H+_out W H+_in). "
                "'ether_plus_one_sided': H+ on the input side only (the official code's ablation)."
            )
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "If True, the paper's initialization: u Kaiming-uniform and, for ETHER+, v = -u so that H+ = I and the "
                "model starts unchanged. If False, v is drawn independently of u (ETHER+ then does not start at the "
                "identity; |u.v| is then about sqrt(n/d), H+ nearly singular, and unmerging in float32 is often "
                "refused, see `EtherLayer.unmerge_error`). Plain ETHER always starts from a random reflection: H = I "
                "is out of its reach."
            )
        },
    )
    block_layout: BlockLayout = field(
        default="paper",
        metadata={
            "help": (
                "Which weight blocks each input-side transform acts on. 'paper' (the paper's equations): W' = W "
                "diag(H_1 .. H_n), block c of the input features transformed by H_c. 'reference_code': what the "
                "official code (mwbini/ether, lit_gpt/ether.py, ETHERLinear.forward) computes, and what the "
                "paper's published numbers came from: its reshape of the [out, in] weight to [n, out, in/n] splits"
                " the output rows into n groups R_r of out/n rows, and H_r transforms every input chunk C_c of its"
                " group, W'[R_r, C_c] = W[R_r, C_c] H_r; it equals 'paper' only at n = 1, and needs out_features "
                "divisible by n too. The variants 'ether', 'ether_plus_one_sided' and 'ether_plus' are the "
                "official code's Htype 'ether', 'etherplus' and 'etherplusHH'; the output side of 'ether_plus' "
                "(H+_out W, row blocks) is the same in both layouts, as there. Same parameters in both layouts, "
                "activation-side and mergeable; 'reference_code' adds a pass over the weight per forward (W_b u "
                "products), and stacking it with other active adapters runs on the transformed weight."
            )
        },
    )
    ether_dropout: float = field(
        default=0.0,
        metadata={
            "help": (
                "Dropout probability on the adapted layer's input, as the official code's `ether_dropout` (which "
                "drops the whole layer's input, not a side branch). Only active in training and on unmerged "
                "adapters."
            )
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "The layer indices to adapt; if None, all layers matching `target_modules` are adapted."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "The name of the `nn.ModuleList` holding the layers (e.g. 'layers' or 'h'); used only with "
                "`layers_to_transform`."
            )
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules apart from the ETHER layers to train and save, e.g. a freshly initialized classifier head."
            )
        },
    )

    fan_in_fan_out: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Whether the target layers store their weight as `[in, out]` (True for GPT-2's `Conv1D`). None reads "
                "it from each layer's type; an explicit value that contradicts a layer's type is corrected for that "
                "layer with a warning, as peft's LoRA does."
            )
        },
    )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        # Checks the folder's files and notes the folder on the config (see xpeft.loading).
        return read_adapter_config(super().from_pretrained, pretrained_model_name_or_path, subfolder, **kwargs)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("ETHER")
        normalize_module_selection(self)
        variants = get_args(EtherVariant)
        if self.variant not in variants:
            raise ValueError(
                f"`variant`={self.variant!r} is not an ETHER variant; choose one of {', '.join(map(repr, variants))}."
            )
        layouts = get_args(BlockLayout)
        if self.block_layout not in layouts:
            raise ValueError(
                f"`block_layout`={self.block_layout!r} is not an ETHER block layout; choose one of "
                f"{', '.join(map(repr, layouts))}."
            )
        dropout = self.ether_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(
                f"`ether_dropout` must be a probability in [0, 1), got {dropout!r}; use 0.0 for no dropout."
            )
        if self.fan_in_fan_out not in (None, True, False):
            raise ValueError(f"`fan_in_fan_out` must be None, True or False, got {self.fan_in_fan_out!r}.")
        if isinstance(self.n_blocks, bool) or not isinstance(self.n_blocks, int) or self.n_blocks < 1:
            raise ValueError(f"`n_blocks` must be a positive integer, got {self.n_blocks!r}.")
        check_scalar_fields(self)  # last: the checks above give the more specific message where they apply
