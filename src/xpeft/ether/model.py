"""The ETHER tuner model: finds the target layers and swaps in [`EtherLinear`] or [`EtherConv`]."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING
from torch import nn

from ..tuners_utils import CONV_LAYER_TYPES, XpeftTuner
from .config import EtherConfig
from .layer import EtherConv, EtherLayer, EtherLinear


class EtherModel(XpeftTuner):
    """ETHER / ETHER+ (https://arxiv.org/abs/2405.20271) on a transformers model, through peft's API.

    Example:
        ```py
        >>> import xpeft  # registers the "ether" peft type
        >>> from peft import get_peft_model
        >>> from xpeft import EtherConfig

        >>> config = EtherConfig(target_modules=["q_proj", "v_proj"], n_blocks=32, variant="ether_plus")
        >>> model = get_peft_model(base_model, config)
        ```

    Per-sample `adapter_names=[...]` (including `"__base__"`) work in `forward` and `generate`, as for LoRA.
    """

    prefix: str = "ether_"
    tuner_layer_cls = EtherLayer
    # Same defaults as LoRA/HRA (attention query and value projections), which is what the paper adapts on Llama-2.
    target_module_mapping = TRANSFORMERS_MODELS_TO_HRA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: EtherConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, EtherLayer):
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        layer_cls = EtherConv if isinstance(base_layer, CONV_LAYER_TYPES) else EtherLinear
        new_module = layer_cls(base_layer, adapter_name, config, module_name=current_key)
        self._swap_in(parent, target_name, new_module, target, adapter_name)

    def unmerge_adapter(self) -> None:
        self._check_unmerge()  # every layer first, so that a refusal leaves no layer unmerged and another merged
        super().unmerge_adapter()

    def disable_adapter_layers(self) -> None:
        # Disabled layers unmerge at their next forward: refuse here, at the entry of `disable_adapter()`, rather than
        # in the middle of a forward.
        self._check_unmerge()
        super().disable_adapter_layers()

    def _check_unmerge(self) -> None:
        """Raise (see [`EtherLayer.check_unmerge`]) if some layer's merged adapters cannot be unmerged accurately."""
        for name, module in self.model.named_modules():
            if isinstance(module, EtherLayer) and module.merged:
                try:
                    module.check_unmerge()
                except ValueError as error:
                    raise ValueError(f"Module {name!r}: {error}") from None
