"""Architecture registry: every supported family as data, found by config model_type."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from moetool.arch.schema import Config, Family, Role
from moetool.arch.unsupported import UNSUPPORTED, listed_reason

__all__ = ["Family", "Role", "all_families", "detect_family", "get_family", "unsupported_reason"]


@cache
def all_families() -> tuple[Family, ...]:
    """Every family defined in moetool/arch/families/ (one module each)."""
    from moetool.arch import families

    found = []
    for info in sorted(pkgutil.iter_modules(families.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{families.__name__}.{info.name}")
        found.append(module.FAMILY)
    return tuple(found)


@cache
def _by_model_type() -> dict[str, Family]:
    table: dict[str, Family] = {}
    for family in all_families():
        for model_type in family.model_types:
            if model_type in table:
                raise RuntimeError(f"model_type {model_type!r} claimed by {table[model_type].name} "
                                   f"and {family.name}")
            table[model_type] = family
    return table


def get_family(name: str) -> Family | None:
    return next((f for f in all_families() if f.name == name), None)


def detect_family(config: Config | None) -> Family | None:
    """The family whose model_types include config["model_type"] (or its text_config's, unless the
    wrapper's own type is listed unsupported: Inkling's multimodal wrapper), else None."""
    if not config:
        return None
    model_type = config.get("model_type")
    family = _by_model_type().get(model_type) if isinstance(model_type, str) else None
    if family is None and isinstance(config.get("text_config"), dict) and \
            not (isinstance(model_type, str) and model_type in UNSUPPORTED):
        family = _by_model_type().get(config["text_config"].get("model_type"))
    return family


def unsupported_reason(config: Config | None) -> str | None:
    """Why moetool does not support CONFIG, where its model type (or its text model's) is listed
    unsupported and no family claims it (a supported wrapper may hold a text model listed alone)."""
    return None if detect_family(config) else listed_reason(config)
