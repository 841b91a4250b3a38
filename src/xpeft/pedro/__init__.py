"""PEDRO (arXiv 2409.17834): prompt-conditioned vectors scaling Q, V and the FFN up projection, as a peft method."""

from .._registry import register_method
from .config import PedroConfig
from .layer import PedroLayer
from .model import PedroModel

__all__ = ["BilevelTrainer", "PedroConfig", "PedroLayer", "PedroModel", "activation_step", "rational_coefficients"]

register_method("pedro", PedroConfig, PedroModel)

_BILEVEL = ("BilevelTrainer", "activation_step", "rational_coefficients")


def __getattr__(name: str):
    # transformers' Trainer is slow to import: load the bi-level helpers on first use only.
    if name in _BILEVEL:
        from . import bilevel

        return getattr(bilevel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
