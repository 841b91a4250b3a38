"""X-PEFT (arXiv 2401.16137): per-profile masks over a frozen bank of bottleneck adapters, as a peft tuner."""

from .._registry import register_method
from .bank import XPeftBank, build_bank, save_bank
from .config import NAME, XPeftConfig
from .layer import XPeftLayer, bottleneck_delta, compose_adapter, mask_weights
from .model import XPeftModel, attach_profile, extract_adapter, profile_cost, profile_payload, profile_record
from .store import ProfileStore, StoredProfile, pack_masks, unpack_masks

register_method(NAME, XPeftConfig, XPeftModel)

__all__ = [
    "ProfileStore",
    "StoredProfile",
    "XPeftBank",
    "XPeftConfig",
    "XPeftLayer",
    "XPeftModel",
    "attach_profile",
    "bottleneck_delta",
    "build_bank",
    "compose_adapter",
    "extract_adapter",
    "mask_weights",
    "pack_masks",
    "profile_cost",
    "profile_payload",
    "profile_record",
    "save_bank",
    "unpack_masks",
]
