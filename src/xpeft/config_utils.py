"""Checks every xpeft config runs on its module-selection fields, with peft's semantics and one wording."""

from __future__ import annotations

from peft.config import PeftConfig


def normalize_module_selection(config: PeftConfig) -> None:
    """Turn list `target_modules` / `exclude_modules` into sets (as peft's configs do) and validate the layer filter.

    Raises:
        ValueError: when `layers_to_transform` or `layers_pattern` is combined with a regex `target_modules` (a regex
            selects by full module name, so a layer filter on top would be ambiguous, as in peft), or when
            `layers_pattern` is set without `layers_to_transform`.
    """
    for name in ("target_modules", "exclude_modules"):
        value = getattr(config, name, None)
        if isinstance(value, list):
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
