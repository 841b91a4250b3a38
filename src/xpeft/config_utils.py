"""Checks every xpeft config runs on its scalar and module-selection fields, with peft's semantics and one wording.

Configs also come from an `adapter_config.json` a user may have edited, so a value of the wrong type must fail here,
naming the field, and not later inside torch (a bool is an int to Python, and any non-empty string is truthy).
"""

from __future__ import annotations

import dataclasses

from peft.config import PeftConfig

_STRING_LISTS = ("list", "set", "tuple")


def built_from_saved_config(config: PeftConfig) -> bool:
    """Whether `config` is being built from a saved `adapter_config.json`, which records `peft_type`, where a config
    written in code leaves it to `__post_init__`. Call before `super().__post_init__()` sets it. Every load path goes
    through here, including those that bypass the config class's own `from_pretrained` (transformers' `load_adapter`
    calls `PeftConfig.from_pretrained`, which builds the subclass from the dict)."""
    return config.peft_type is not None


def default_for_new_field(value, *, from_saved_config: bool, default, legacy):
    """The value of a field added after adapters had been saved without it, whose default is None (not given): the
    given `value`; else `legacy`, the behaviour before the field existed, for a config built from a saved file (so
    that such adapters load as they were trained); else `default` for a new config."""
    if value is not None:
        return value
    return legacy if from_saved_config else default


def check_scalar_fields(config: PeftConfig) -> None:
    """Refuse a value of the wrong type in every field annotated `bool`, `bool | None` or `int`.

    Raises:
        ValueError: for a `bool` field that holds anything but True or False (e.g. the string "no", which would count
            as True), and for an `int` field that holds a bool or a non-integer (e.g. True or "4").
    """
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name)
        if spec.type in ("bool", "bool | None"):
            if isinstance(value, bool) or (value is None and spec.type == "bool | None"):
                continue
            allowed = "True or False" if spec.type == "bool" else "True, False or None"
            raise ValueError(
                f"`{spec.name}` must be {allowed}, got {value!r} ({type(value).__name__}); Python would read any "
                "non-empty string as True. Pass a bool (in adapter_config.json: true or false, without quotes)."
            )
        if spec.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(
                f"`{spec.name}` must be an integer, got {value!r} ({type(value).__name__}). Pass a whole number such "
                f"as {spec.default!r} (in adapter_config.json: a number, without quotes; not true or false)."
            )


def _check_names(config: PeftConfig, name: str, str_means: str | None) -> None:
    """`name` must be None, a list (set, tuple) of strings or, where `str_means` says what a string is, a string."""
    value = getattr(config, name)
    if value is None or (str_means is not None and isinstance(value, str)):
        return
    if type(value).__name__ in _STRING_LISTS and all(isinstance(item, str) for item in value):
        return
    expected = "a list of names" + (f" or {str_means}" if str_means else "")
    raise ValueError(
        f"`{name}` must be None or {expected}, got {value!r} ({type(value).__name__}). Pass e.g. ['q_proj', "
        "'v_proj'] (strings, in a list)."
    )


def _check_layer_indices(config: PeftConfig) -> None:
    value = config.layers_to_transform
    indices = value if isinstance(value, (list, tuple)) else [value]
    if value is None or all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        return
    raise ValueError(
        f"`layers_to_transform` must be None, a layer index or a list of layer indices (integers >= 0, counted from "
        f"the first block), got {value!r}. Pass e.g. [0, 1]."
    )


def normalize_module_selection(config: PeftConfig) -> None:
    """Check the types of the module-selection fields, turn list `target_modules` / `exclude_modules` into sets (as
    peft's configs do) and validate the layer filter.

    Raises:
        ValueError: when a field has the wrong type (e.g. `target_modules=5`, `layers_to_transform=[-1]` or
            `["0"]`); when `layers_to_transform` or `layers_pattern` is combined with a regex `target_modules` (a
            regex selects by full module name, so a layer filter on top would be ambiguous, as in peft), or when
            `layers_pattern` is set without `layers_to_transform`.
    """
    _check_names(config, "target_modules", "a regex string")
    _check_names(config, "exclude_modules", "a regex string")
    _check_names(config, "layers_pattern", "one name")
    _check_names(config, "modules_to_save", None)
    _check_layer_indices(config)
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, set(value))
    regex = isinstance(config.target_modules, str)
    for name in ("layers_to_transform", "layers_pattern"):
        if regex and getattr(config, name) is not None:
            raise ValueError(
                f"`{name}` cannot be used when `target_modules` is a str (a regex): put the layer indices into the "
                "regex, or pass `target_modules` as a list of module names."
            )
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(
            "`layers_pattern` is set but `layers_to_transform` is None; `layers_pattern` only names the layer list "
            "that `layers_to_transform` indexes, so set both or neither."
        )
