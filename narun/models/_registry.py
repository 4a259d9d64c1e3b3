"""Models by name, so a YAML config can say `model: {name: gpt, preset: gpt2-tiny}`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from narun.config import register_model_fields
from narun.errors import ConfigError

_BUILDERS: dict[str, Callable[..., Any]] = {}
_PRESETS: set[str] = set()


def register_model(name: str, fields: Any, presets: Any = None
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make `builder(**options)` reachable as `build_model(name, **options)`.

    `fields` (a dataclass or {key: type}) and `presets` tell config loading which
    `model.*` keys are valid, so a typo fails when the YAML is read, not mid-run.
    """

    def deco(builder: Callable[..., Any]) -> Callable[..., Any]:
        _BUILDERS[name] = builder
        register_model_fields(name, fields, presets)
        if presets is not None:
            _PRESETS.add(name)
        return builder

    return deco


def model_names() -> list[str]:
    return sorted(_BUILDERS)


def build_model(name: str, **options: Any) -> Any:
    """The model `name` built from `options`; ConfigError names unknown models and keys."""
    if name not in _BUILDERS:
        raise ConfigError(f"model.name: unknown model {name!r}; valid: {model_names()}")
    return _BUILDERS[name](**options)


def build_from_config(model_cfg: Any) -> Any:
    """The model a config's `model` section describes (preset only for models with presets)."""
    options = dict(model_cfg.overrides)
    if model_cfg.name in _PRESETS:
        options["preset"] = model_cfg.preset
    return build_model(model_cfg.name, **options)
