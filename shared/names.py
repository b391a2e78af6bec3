"""Name rules, in one place: what a model, experiment or run may be called.

Two rules exist because names end up in two kinds of places:
- a *resource name* (models, experiments, engine run ids) becomes a store key segment and an MLflow name:
  1-128 of ``[A-Za-z0-9_.-]``, starting alphanumeric;
- a *run id* the train service hands out also becomes a Kubernetes Job name and label value, so it
  follows DNS-1123 label rules: 1-42 lowercase letters, digits and dashes (42 leaves room for the
  Job's suffixes within the 63-character limit).
"""
from __future__ import annotations

import re

from shared.errors import InvalidArgument

RESOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RUN_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")


def validate_name(value: str, what: str = "name") -> str:
    """``value`` when it is a valid resource name, else InvalidArgument naming ``what``."""
    if not isinstance(value, str) or not RESOURCE_NAME.match(value):
        raise InvalidArgument(f"{what} {value!r} must be 1-128 of [A-Za-z0-9_.-], starting alphanumeric")
    return value


def validate_run_id(value: str) -> str:
    """``value`` when it can name a run in every backend (a DNS-1123 label), else InvalidArgument."""
    if not isinstance(value, str) or not RUN_ID.match(value):
        raise InvalidArgument(f"run id {value!r} must be 1-42 lowercase letters, digits and dashes")
    return value


def slug(text: str, max_len: int = 24) -> str:
    """A lowercase DNS-safe fragment of ``text`` for generated run ids (``run`` when nothing is left)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return (s or "run")[:max_len].strip("-") or "run"
