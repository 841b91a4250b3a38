"""PEDRO (arXiv 2409.17834): prompt-conditioned vectors scaling Q, V and the FFN up projection, as a peft method."""

from .._registry import register_method
from .config import PedroConfig
from .layer import PedroLayer
from .model import PedroModel

__all__ = ["PedroConfig", "PedroLayer", "PedroModel"]

register_method("pedro", PedroConfig, PedroModel)
