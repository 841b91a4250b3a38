"""ETHER and ETHER+: block-diagonal hyperplane reflections as a peft tuner (arXiv 2405.20271, DESIGN.md §1)."""

from .._registry import register_method
from .config import EtherConfig
from .export import to_lora
from .layer import EtherConv, EtherLayer, EtherLinear
from .model import EtherModel

__all__ = ["EtherConfig", "EtherConv", "EtherLayer", "EtherLinear", "EtherModel", "to_lora"]

register_method("ether", EtherConfig, EtherModel)
