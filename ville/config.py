"""Recipes: YAML files whose sections fill the stages' config dataclasses, then dotted `key=value` overrides.

Unknown keys and wrong types fail loudly, naming the key and the file (OmegaConf structured configs check both).
A recipe may start with a `#!` line (recipes are executable: `./recipes/tiny/stage1.yaml`); YAML treats it as a
comment.
"""
from __future__ import annotations

import os
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def _fail(path: str, e: OmegaConfBaseException, what: str = "") -> ValueError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    return ValueError(f"{path}: {what}{'key ' + repr(key) + ': ' if key else ''}{msg}")


def read_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ValueError(f"recipe {path!r} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: a recipe must be a mapping of sections, got {type(cfg).__name__}")
    return cfg


def apply_overrides(path: str, raw: DictConfig, overrides: list[str] | None) -> DictConfig:
    if not overrides:
        return raw
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be dotted key=value, got {bad}")
    try:
        return OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _fail(path, e, "override ") from e


def structured(path: str, schema: type[T], data: Any, prefix: str = "") -> T:
    """Fill dataclass `schema` from `data`; unknown keys / wrong types -> ValueError naming key and file."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, data if data is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        e.full_key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        raise _fail(path, e) from e


def load_section(path: str, section: str, schema: type[T], overrides: list[str] | None = None) -> T:
    raw = apply_overrides(path, read_yaml(path), overrides)
    if section not in raw:
        raise ValueError(f"{path}: missing section {section!r}")
    return structured(path, schema, raw[section], prefix=section)


def to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
