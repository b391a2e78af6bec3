"""YAML configs validated by pydantic, with ``--set a.b=c`` overrides.

An override's value is parsed as YAML, so ``--set optimizer.lr=0.01`` gives a float,
``--set data.augment=[flip,crop]`` a list and ``--set amp=false`` a bool.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shared.errors import InvalidArgument, NotFound

M = TypeVar("M", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``a.b.c=value`` override applied."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise InvalidArgument(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise InvalidArgument(f"override {item!r} has an empty key segment")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise InvalidArgument(f"override {item!r}: {key!r} is not a mapping")
            node = child
        node[keys[-1]] = value
    return out


def parse_config(model: type[M], data: dict[str, Any], overrides: Iterable[str] = (), source: str = "config") -> M:
    data = apply_overrides(data or {}, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise InvalidArgument(f"{source} is invalid: {problems}") from exc


def load_yaml(text: str, source: str = "config") -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_config(model: type[M], path: str | Path, overrides: Iterable[str] = ()) -> M:
    """Load ``path`` as YAML, apply ``overrides`` and validate it as ``model``."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"config file {path} does not exist")
    return parse_config(model, load_yaml(path.read_text(), str(path)), overrides, str(path))


def config_hash(config: BaseModel) -> str:
    """A stable short hash of a validated config, logged as a tag so identical runs are findable."""
    blob = json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
