"""Publishing a trained model as ``models/<name>/<version>/`` and loading it back (safetensors only).

A published model is ``model.safetensors`` + ``model_card.json``:
  {"name", "version", "architecture", "model_kwargs", "classes", "input_size": [C, H, W],
   "normalization": {"mean", "std"}, "metrics", "run_id", "created"}
``model_kwargs`` are the exact keyword arguments given to ``shared.models.create_model`` (including
num_classes and in_chans), so loading rebuilds the same module before the weights go in.
"""
from __future__ import annotations

import datetime as dt
import json
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from shared.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound
from shared.logs import get_logger

log = get_logger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CARD_KEYS = ("name", "version", "architecture", "model_kwargs", "classes", "input_size", "normalization",
             "metrics", "run_id", "created")


def validate_model_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise InvalidArgument(f"model name {name!r} must be 1-128 of [A-Za-z0-9_.-], starting alphanumeric")
    return name


def model_prefix(name: str, version: int) -> str:
    return f"models/{validate_model_name(name)}/{int(version)}"


def list_versions(store, name: str) -> list[int]:
    """Published (manifest present) integer versions of ``name``, ascending."""
    base = f"models/{validate_model_name(name)}/"
    versions = set()
    for key in store.list(base):
        parts = key[len(base):].split("/")
        if len(parts) == 2 and parts[1] == "MANIFEST.json" and parts[0].isdigit():
            versions.add(int(parts[0]))
    return sorted(versions)


def make_card(*, name: str, version: int, architecture: str, model_kwargs: dict, classes: list[str],
              input_size: list[int], mean: list[float], std: list[float], metrics: dict, run_id: str) -> dict:
    return {
        "name": name,
        "version": int(version),
        "architecture": architecture,
        "model_kwargs": dict(model_kwargs),
        "classes": [str(c) for c in classes],
        "input_size": [int(v) for v in input_size],
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "run_id": run_id,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(),
    }


def publish_model(store, name: str, model_bytes: bytes, card: dict, attempts: int = 5) -> tuple[int, str]:
    """Publish under the next free integer version; returns (version, prefix).

    Two runs exporting the same name at once could pick the same number: the publish re-checks the
    prefix right before writing and moves on to the next number, which narrows (not closes) that window.
    """
    validate_model_name(name)
    existing = list_versions(store, name)
    version = (existing[-1] + 1) if existing else 1
    for _ in range(attempts):
        prefix = model_prefix(name, version)
        if store.is_published(prefix) or store.list(prefix + "/"):
            version += 1
            continue
        card = {**card, "name": name, "version": version}
        files = {"model.safetensors": model_bytes,
                 "model_card.json": json.dumps(card, indent=2, sort_keys=True).encode()}
        store.publish(prefix, files, meta={"name": name, "version": version, "run_id": card.get("run_id")})
        log.info("model published", extra={"model": name, "version": version, "prefix": prefix})
        return version, prefix
    raise AlreadyExists(f"could not find a free version for model {name} after {attempts} attempts")


def read_card(store, name: str, version: int | None = None) -> dict:
    if version is None:
        versions = list_versions(store, name)
        if not versions:
            raise NotFound(f"no published versions of model {name!r}")
        version = versions[-1]
    prefix = model_prefix(name, version)
    if not store.is_published(prefix):
        raise NotFound(f"model {name!r} version {version} is not published")
    try:
        card = json.loads(store.get_verified(prefix, "model_card.json"))
    except json.JSONDecodeError as exc:
        raise IntegrityError(f"{prefix}/model_card.json is not valid JSON: {exc}") from exc
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise IntegrityError(f"{prefix}/model_card.json lacks {missing}")
    return card


def load_exported(store, name: str, version: int | None = None,
                  device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a published model in eval mode and return ``(model, card)``; latest version when None.

    Weights are read with safetensors (no pickle), sha256-verified against the manifest, and loaded
    strictly: a card whose architecture does not match the weights fails loudly.
    """
    from shared.models import create_model

    card = read_card(store, name, version)
    prefix = model_prefix(name, card["version"])
    try:
        state = st_load(store.get_verified(prefix, "model.safetensors"))
    except SafetensorError as exc:
        raise IntegrityError(f"{prefix}/model.safetensors is not a valid safetensors file: {exc}") from exc
    model = create_model(card["architecture"], **card["model_kwargs"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"{prefix}: weights do not fit architecture {card['architecture']}: {exc}") from exc
    model.to(device).eval()
    return model, card
