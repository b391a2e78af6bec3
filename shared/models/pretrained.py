"""Backbone weights a run starts from: a model the platform published, or a local weights file.

``model.pretrained`` in a training config names either
- a published model, ``store:models/<name>[/<version>]`` (or ``models/<name>/<version>``, ``models:/...``):
  its weights, verified against the manifest, with the input size and normalisation its card records, so
  the fine-tune feeds the backbone what it was trained on (timm's ``pretrained_cfg`` carries the same two
  facts beside its weights);
- a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file (``file://`` optional). A safetensors file
  written by :func:`write_weights_file` carries the same facts in its metadata; any other file carries none
  and the dataset's usual normalisation applies.

Nothing is ever downloaded. :attr:`Pretrained.provenance` is what the model card records.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.errors import InvalidArgument

# Keys of a weights file's safetensors metadata (strings only, as safetensors stores them).
META_ARCHITECTURE, META_INPUT_SIZE, META_MEAN, META_STD, META_SOURCE = (
    "architecture", "input_size", "mean", "std", "source")


@dataclass(frozen=True)
class Pretrained:
    source: str  # "store:models/<name>/<version>" or "file:<absolute path>"
    sha256: str  # of the weights file's bytes
    state: dict[str, torch.Tensor]
    architecture: str = ""
    input_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "sha256": self.sha256}
        if self.architecture:
            out["architecture"] = self.architecture
        if self.input_size:
            out["input_size"] = list(self.input_size)
        if self.mean and self.std:
            out["normalization"] = {"mean": list(self.mean), "std": list(self.std)}
        return out


NO_BACKBONE = {"source": "none"}


def is_published_ref(ref: str) -> bool:
    return ref.startswith(("store:", "models/", "models:/"))


def read_pretrained(ref: str, store=None) -> Pretrained:
    """The weights ``ref`` names (see the module docstring); ``store`` holds published models."""
    if is_published_ref(ref):
        return _published(ref, store)
    return _file(Path(ref.removeprefix("file://")))


def _published(ref: str, store) -> Pretrained:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from shared.modelcard import WEIGHTS_FILE, model_prefix, parse_model_ref, published_file, read_card

    if store is None:
        raise InvalidArgument(f"model.pretrained={ref} names a published model, but no artifact store is configured")
    parsed = parse_model_ref(ref)
    card = read_card(store, parsed.name, parsed.resolve(store))
    prefix = model_prefix(card.name, card.version)
    data = published_file(store, prefix, WEIGHTS_FILE)
    try:
        state = st_load(data)
    except SafetensorError as exc:
        raise InvalidArgument(f"{prefix}/{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    return Pretrained(f"store:{prefix}", hashlib.sha256(data).hexdigest(), state, card.architecture,
                      list(card.input_size), list(card.normalization.mean), list(card.normalization.std))


def _file(path: Path) -> Pretrained:
    from shared.models.registry import read_state_dict

    state = read_state_dict(path)  # NotFound / InvalidArgument with the reason
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    try:
        input_size = json.loads(meta[META_INPUT_SIZE]) if META_INPUT_SIZE in meta else None
        mean = json.loads(meta[META_MEAN]) if META_MEAN in meta else None
        std = json.loads(meta[META_STD]) if META_STD in meta else None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{path}: unreadable input size or normalisation in its metadata: {exc}") from exc
    return Pretrained(f"file:{path.resolve()}", digest, state, meta.get(META_ARCHITECTURE, ""), input_size, mean, std)


def write_weights_file(pretrained: Pretrained, path: str | Path) -> Path:
    """Write ``pretrained`` as a local safetensors file whose metadata keeps its architecture, input size,
    normalisation and source, so a config can load it with ``model.pretrained: <path>`` anywhere."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise InvalidArgument(f"{path}: backbone weights are written as .safetensors")
    meta = {META_SOURCE: pretrained.source, META_ARCHITECTURE: pretrained.architecture}
    if pretrained.input_size:
        meta[META_INPUT_SIZE] = json.dumps(pretrained.input_size)
    if pretrained.mean and pretrained.std:
        meta[META_MEAN], meta[META_STD] = json.dumps(pretrained.mean), json.dumps(pretrained.std)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in pretrained.state.items()}, str(path), metadata=meta)
    return path
