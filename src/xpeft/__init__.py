"""xpeft: X-PEFT, ETHER/ETHER+ and PEDRO as Hugging Face peft tuners.

`import xpeft` adds the methods to peft's registry; from then on peft's own API (`get_peft_model`,
`PeftModel.from_pretrained`, `save_pretrained`, ...) handles them like built-in methods.
"""

from . import saving  # noqa: F401  (makes `PeftModel.save_pretrained` crash-safe for xpeft adapters)
from ._registry import ensure_peft_type, register_method
from .ether import EtherConfig, EtherModel
from .pedro import PedroConfig, PedroModel
from .x_peft import ProfileStore, XPeftConfig, XPeftModel, attach_profile, build_bank, profile_cost

__version__ = "0.1.0"

__all__ = [
    "EtherConfig",
    "EtherModel",
    "PedroConfig",
    "PedroModel",
    "ProfileStore",
    "XPeftConfig",
    "XPeftModel",
    "__version__",
    "attach_profile",
    "build_bank",
    "ensure_peft_type",
    "profile_cost",
    "register_method",
]
