"""A test-only tuner ("xpeft_dummy") that proves xpeft's peft plumbing independently of the real methods.

Math: the layer output is scaled per output feature, `y ← (1 + s) ⊙ (x Wᵀ + b)`, with `s` zero at init. It is
mergeable (`W' = diag(1 + s) W`, `b' = (1 + s) ⊙ b`) and goes through `XpeftTuner` for mixed batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from xpeft import ensure_peft_type, register_method
from xpeft.tuners_utils import (
    XpeftTuner,
    adapter_index_groups,
    check_mixed_batch_args,
    layer_features,
)

NAME = "xpeft_dummy"


@dataclass
class DummyConfig(PeftConfig):
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to adapt."})
    init_weights: bool = field(default=True, metadata={"help": "Zero scale at init (identity) if True."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra trainable modules."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type(NAME.upper())


class DummyLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("xpeft_dummy_scale",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DummyConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.xpeft_dummy_scale = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer, "xpeft_dummy")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: DummyConfig) -> None:
        scale = torch.zeros(self.out_features)
        if not config.init_weights:
            scale.normal_(std=0.5)
        self.xpeft_dummy_scale[adapter_name] = nn.Parameter(scale)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        adapter_names = check_mixed_batch_args(self, x, adapter_names)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if adapter_names is not None:
            out = result.clone()
            for name, index in adapter_index_groups(adapter_names, x.device).items():
                if name in self.xpeft_dummy_scale:
                    out[index] = result[index] * (1 + self.xpeft_dummy_scale[name])
            return out
        for name in self.active_adapters:
            if name in self.xpeft_dummy_scale:
                result = result * (1 + self.xpeft_dummy_scale[name])
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            self._scale_base(1 + self.xpeft_dummy_scale[name].data)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._scale_base(1 / (1 + self.xpeft_dummy_scale[self.merged_adapters.pop()].data))

    def _scale_base(self, factor: torch.Tensor) -> None:
        base = self.get_base_layer()
        base.weight.data *= factor[None, :] if self.fan_in_fan_out else factor[:, None]
        if base.bias is not None:
            base.bias.data *= factor


class DummyModel(XpeftTuner):
    prefix = "xpeft_dummy_"
    tuner_layer_cls = DummyLayer
    target_module_mapping = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key) -> None:
        if isinstance(target, DummyLayer):
            target.update_layer(adapter_name, config)
            return
        self._swap_in(parent, target_name, DummyLayer(target, adapter_name, config), target, adapter_name)


register_method(NAME, DummyConfig, DummyModel)
