"""Registration of xpeft's tuners into peft (DESIGN.md §0).

peft's `register_peft_method` accepts only names that already exist in its `PeftType` enum, so xpeft first adds its
own members to that enum, then registers each config/model pair. Both steps are idempotent: importing `xpeft` twice,
or reloading a method's module, re-binds the mappings to the new classes instead of failing. A member that peft itself
defines under one of our names is never overridden: that is a conflict the user must resolve by pinning peft.

peft 0.21.2 has no documented way to add a `PeftType` member (`register_peft_method` refuses a name that is not one
already), and the standard library has no public API to extend an Enum, so `ensure_peft_type` fills the private
structures an Enum class body fills. Checked against CPython's Lib/enum.py:
- 3.11 (3.11.7, the tested version, read in full): `__getitem__` reads `_member_map_`, `__iter__`/`__len__` read
  `_member_names_`, by-value lookup (`PeftType("X")`, and so unpickling, whose `__reduce_ex__` is
  `(cls, (value,))`) reads `_value2member_map_`, attribute access goes through the class attribute or `__getattr__`
  on `_member_map_`; `member in PeftType` is `isinstance` plus `_member_map_`, and a plain string raises TypeError.
- 3.10 and older (an old CPython commit read): the same four structures, the same lookups and `__reduce_ex__`.
- 3.12 (its `__contains__`, as quoted by a backport): `value in PeftType` accepts plain values and reads
  `_value2member_map_`.
- 3.13 and later (CPython main read; gh-125710, labelled 3.13 and 3.14): a further list `_hashable_values_` that
  `__contains__` reads; it is filled when present. 3.13's `_add_member_` does the setattr and `_member_map_` steps
  done here by hand.
Only Python 3.11 runs the tests (tests/test_registry.py checks iteration, lookup by name and value, `in` and
pickling); 3.10, 3.12 and 3.13 are expected to work from the source reading above, not tested.
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
    # What the enum machinery does for a member defined in the class body (see the module docstring for the versions
    # checked). The class attribute goes first: EnumType.__setattr__ refuses to re-assign a name the member map knows.
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    hashable_values = getattr(PeftType, "_hashable_values_", None)
    if hashable_values is not None and name not in hashable_values:
        hashable_values.append(name)  # `value in PeftType` reads this list where it exists (gh-125710)
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
