"""YAML configs validated by pydantic, with ``--set a.b=c`` overrides.

An override's value is parsed as YAML, so ``--set optimizer.lr=0.01`` gives a float,
``--set data.augment=[flip,crop]`` a list and ``--set amp=false`` a bool.

Every YAML document read here (run configs, study specs, override values) is bounded: at most
``MAX_DOCUMENT_BYTES`` long, ``MAX_DEPTH`` deep, and at most ``MAX_EXPANDED_SIZE`` nodes and scalar
characters with each alias counted as often as it is used. A 500-byte alias bomb otherwise stands for
gigabytes once anything (JSON, pydantic) walks it.
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

# Configs are a few KB; parsing YAML in pure Python costs about 4 CPU-seconds per MiB.
MAX_DOCUMENT_BYTES = 256 * 1024
# About what a document of MAX_DOCUMENT_BYTES can spell out without aliases (each node takes a byte or
# more of text besides its characters), so aliases may share text but never make a config bigger than that.
MAX_EXPANDED_SIZE = 2 * MAX_DOCUMENT_BYTES
MAX_DEPTH = 64


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return []


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Nodes + scalar characters of the composed document with its aliases expanded, computed once per
    distinct node (so without expanding anything); InvalidArgument beyond the bounds or for a cycle."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, depth)
    open_nodes: set[int] = set()  # entered, children not yet measured: meeting one again is a cycle
    stack = [(root, False)]
    while stack:
        node, children_measured = stack.pop()
        key = id(node)
        if children_measured:
            kids = [measured[id(child)] for child in _children(node)]
            own = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            measured[key] = (own + sum(size for size, _ in kids), 1 + max((depth for _, depth in kids), default=0))
            open_nodes.discard(key)
        elif key in open_nodes:
            raise InvalidArgument(f"{source}: a YAML alias refers to a collection that contains it")
        elif key not in measured:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    size, depth = measured[id(root)]
    if depth > MAX_DEPTH:
        raise InvalidArgument(f"{source} nests {depth} levels deep; the limit is {MAX_DEPTH}")
    if size > MAX_EXPANDED_SIZE:
        raise InvalidArgument(
            f"{source} expands to more than {MAX_EXPANDED_SIZE:,} nodes and characters once its YAML aliases "
            f"are expanded (each counts as often as it is used); the limit is what a "
            f"{MAX_DOCUMENT_BYTES // 1024} KiB document holds")
    return size


def _load_bounded(text: str, source: str) -> tuple[Any, int]:
    """The YAML document in ``text`` and its expanded size, refused before construction when too big."""
    if len(text) > MAX_DOCUMENT_BYTES or len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise InvalidArgument(f"{source} is longer than {MAX_DOCUMENT_BYTES // 1024} KiB")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, 0
        size = _expanded_size(node, source)
        return loader.construct_document(node), size
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source} is not valid YAML: {exc}") from exc
    except RecursionError as exc:  # the composer recurses per level, before the depth can be measured
        raise InvalidArgument(f"{source} nests more than {MAX_DEPTH} levels deep") from exc
    finally:
        loader.dispose()


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``a.b.c=value`` override applied."""
    out = json.loads(json.dumps(data))
    expanded = 0
    for item in overrides:
        # Named in errors, which travel as gRPC status details: a long value is cut short there.
        shown = repr(item if len(item) <= 80 else item[:77] + "...")
        if "=" not in item:
            raise InvalidArgument(f"override {shown} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise InvalidArgument(f"override {shown} has an empty key segment")
        value, size = _load_bounded(raw, f"override {shown}: value") if raw != "" else ("", 0)
        # Many small overrides must not add up to what one document may not be.
        expanded += size
        if expanded > MAX_EXPANDED_SIZE:
            raise InvalidArgument(f"overrides expand to more than {MAX_EXPANDED_SIZE:,} nodes and characters")
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise InvalidArgument(f"override {shown}: {key!r} is not a mapping")
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
    data, _ = _load_bounded(text, source)
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
