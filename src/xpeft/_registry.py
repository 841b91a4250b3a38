"""Registration of xpeft's tuners into peft (DESIGN.md §0).

peft's `register_peft_method` accepts only names that already exist in its `PeftType` enum, so xpeft first adds its
own members to that enum, then registers each config/model pair. Both steps are idempotent: importing `xpeft` twice,
or reloading a method's module, re-binds the mappings to the new classes instead of failing. A member that peft itself
defines under one of our names is never overridden: that is a conflict the user must resolve by pinning peft.
"""

from __future__ import annotations

import peft
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method

# Marks an enum member as created by xpeft, so that a second import can tell ours from peft's own.
_OWNER_FLAG = "_xpeft_owned"


def ensure_peft_type(name: str) -> PeftType:
    """Return `PeftType[name]`, adding the member to peft's enum if it does not exist yet.

    Raises:
        RuntimeError: if the installed peft already defines `name` itself (not through xpeft).
    """
    if name != name.upper() or not name.isidentifier():
        raise ValueError(f"PeftType member names are upper-case identifiers, got {name!r}.")
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        if getattr(existing, _OWNER_FLAG, False):
            return existing
        raise RuntimeError(
            f"peft {peft.__version__} already defines PeftType.{name}, which xpeft also uses for its own tuner. "
            "xpeft will not override a peft method; install a peft release without it "
            f"(`pip install 'peft<{peft.__version__}'`) or upgrade xpeft."
        )
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(member, _OWNER_FLAG, True)
    # The class attribute must be set before the member map knows the name: EnumType.__setattr__ refuses to
    # re-assign a known member.
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Make `config_cls`/`model_cls` a peft method called `name` (lower case), with prefix `model_cls.prefix`.

    After this call peft's own API (`get_peft_model`, `PeftModel.from_pretrained`, `PeftConfig.from_pretrained`,
    `save_pretrained`, ...) handles the method like a built-in one.
    """
    peft_type = ensure_peft_type(name.upper())
    prefix = model_cls.prefix
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
        return peft_type
    if (registered.__module__, registered.__qualname__) != (model_cls.__module__, model_cls.__qualname__):
        raise RuntimeError(
            f"peft type {peft_type.value} is already registered to {registered.__module__}.{registered.__qualname__}; "
            f"refusing to replace it with {model_cls.__module__}.{model_cls.__qualname__}. Register the new tuner "
            "under another name."
        )
    # Re-import (e.g. importlib.reload): re-bind to the fresh classes, as register_peft_method would have done.
    PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
    return peft_type
