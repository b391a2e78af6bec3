"""The published-model format: ``models/<name>/<version>/`` in the artifact store, and its typed card.

A published model is ``model.safetensors`` + ``model_card.json`` under one manifest (see
``shared.storage``): the training engine publishes it, the benchmark measures it, the inference server
serves it. The card says how to rebuild the module (``architecture`` + the exact ``model_kwargs`` given
to ``shared.models.create_model``) and how to feed it (``input_size``, ``normalization``), so loading
never needs the training config, and weights are read with safetensors only (nothing is unpickled).

Model references, wherever a command takes one: ``store:models/<name>[/<version>]`` (or the bare
``models/<name>/<version>`` a run reports as its ``model_uri``).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from shared.errors import AlreadyExists, IntegrityError, InvalidArgument, NotFound
from shared.logs import get_logger
from shared.names import validate_name

log = get_logger(__name__)

MODELS_ROOT = "models"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"
# Bounds of a card's serving settings (and of a load request's config override).
MAX_SERVING_BATCH = 4096
MAX_SERVING_DELAY_MS = 10_000.0


class Normalization(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mean: list[float]
    std: list[float]


class Serving(BaseModel):
    """How the inference server batches this model; an unset field falls back to the server's flag
    (``--max-batch-size`` / ``--max-queue-delay-ms``). The bounds keep a card from opening the server to
    requests of unbounded size."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(None, ge=1, le=MAX_SERVING_BATCH)
    max_queue_delay_ms: float | None = Field(None, ge=0, le=MAX_SERVING_DELAY_MS)


class ModelCard(BaseModel):
    """What a published model is and how to feed it. Unknown keys are kept (a newer writer's fields)."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int = Field(ge=0)
    architecture: str
    model_kwargs: dict[str, Any]
    # What the model does: "classification" (images -> class probabilities), "trajectory" (multi-camera
    # clips -> class probabilities and the future position) or "captioning" (an image -> text); the serving
    # signature follows from it.
    task: Literal["classification", "trajectory", "captioning"] = "classification"
    classes: list[str]
    # The forward input of one sample: [C, H, W] for images, [cameras, C, T, H, W] for trajectory models.
    input_size: list[int] = Field(min_length=3, max_length=6)
    # Trajectory models: one raw uint8 sample as served ([cameras, frames, C, H, W]); the model prepares it.
    clip_size: list[int] | None = Field(None, min_length=4, max_length=5)
    normalization: Normalization
    metrics: dict[str, float] = Field(default_factory=dict)
    run_id: str
    created: str = Field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat())
    mlflow_run_id: str | None = None
    # Softmax temperature fitted on validation (1.0: none); the inference server divides logits by it.
    temperature: float = Field(1.0, gt=0)
    # The split model selection saw ("test" only when the config chose to select on it) and where the
    # validation split came from; test figures in ``metrics`` are from one final evaluation.
    selection_split: Literal["val", "test"] = "val"
    val_source: str = ""
    # Confusion matrices (true x predicted) of the selected model, by split.
    confusion: dict[str, list[list[int]]] = Field(default_factory=dict)
    # Files published beside the weights that the module needs (a captioner's tokenizer.json): the loader
    # reads them, verified, and hands them to the module's ``load_files``.
    files: list[str] = Field(default_factory=list)
    # Captioning: how text is generated when served (max_new_tokens, num_beams, length_penalty, prompt).
    generation: dict[str, Any] = Field(default_factory=dict)
    # Dynamic batching when served (absent in cards written before it existed: the server's flags apply).
    serving: Serving | None = None
    # Where the weights training started from: {"source": "none"} (random init), or the source
    # ("store:models/<name>/<version>", "file:<path>", "lora:<base>"), the sha256 of its weights and what
    # came with them (shared.models.pretrained). Absent in cards written before it was recorded.
    backbone: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value, "model name")

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, value: Any) -> Any:
        return [str(c) for c in value] if isinstance(value, (list, tuple)) else value

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, source: str = CARD_FILE) -> ModelCard:
        """Parse and validate a card; anything malformed is stored data gone bad: IntegrityError."""
        try:
            return cls.model_validate(json.loads(data))
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{source} is not valid JSON: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
            raise IntegrityError(f"{source} is not a valid model card: {problems}") from exc


def model_prefix(name: str, version: int) -> str:
    return f"{MODELS_ROOT}/{validate_name(name, 'model name')}/{int(version)}"


@dataclass(frozen=True)
class ModelRef:
    """A reference to a published model: a version number, a registry alias, or neither (the newest)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def resolve(self, store, tracking_uri: str | None = None) -> int:
        """The version number this reference names (an alias is looked up in MLflow's model registry)."""
        if self.version is not None:
            return self.version
        if self.alias is not None:
            from shared.tracking.registry import alias_version

            return alias_version(tracking_uri, self.name, self.alias)
        versions = list_versions(store, self.name)
        if not versions:
            raise NotFound(f"no published versions of model {self.name!r}")
        return versions[-1]


def parse_model_ref(ref: str) -> ModelRef:
    """``store:models/<name>[/<version>]``, ``models/<name>/<version>`` (a run's model_uri),
    ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (MLflow's forms), ``<name>[:<version>]`` or
    ``<name>@<alias>``."""
    body = ref.strip()
    if body.startswith("models:/"):
        body = body[len("models:/"):]
    else:
        body = body.removeprefix("store:").strip("/").removeprefix(f"{MODELS_ROOT}/")
    name, sep, rest = next(((*body.partition(c),) for c in "@/:" if c in body), (body, "", ""))
    name = validate_name(name, "model name")
    if sep == "@":
        if not rest.replace("-", "_").isidentifier():
            raise InvalidArgument(f"model reference {ref!r}: {rest!r} is not an alias")
        return ModelRef(name, alias=rest)
    if sep and not (rest.isdigit() and int(rest) >= 1):
        raise InvalidArgument(f"model reference {ref!r}: the version must be a positive integer, got {rest!r}")
    return ModelRef(name, version=int(rest) if sep else None)


def list_published(store, name: str | None = None) -> dict[str, list[int]]:
    """Every published model in ``store`` (or only ``name``) -> its versions, ascending (prefixes with a
    manifest only)."""
    base = f"{MODELS_ROOT}/{validate_name(name, 'model name')}/" if name else f"{MODELS_ROOT}/"
    found: dict[str, set[int]] = {}
    for prefix in store.list_published(base):
        parts = prefix.split("/")
        if len(parts) == 3 and parts[2].isdigit():
            found.setdefault(parts[1], set()).add(int(parts[2]))
    return {model: sorted(v) for model, v in sorted(found.items())}


def list_versions(store, name: str) -> list[int]:
    """Published integer versions of ``name``, ascending."""
    return list_published(store, name).get(name, [])


def publish_model(store, card: ModelCard, weights: bytes, attempts: int = 5, *, version: int | None = None,
                  extra_files: dict[str, bytes] | None = None) -> tuple[int, str]:
    """Publish under ``version``, or the next free integer version when None; returns (version, prefix).

    Two runs exporting the same name at once could pick the same number: the publish re-checks the
    prefix right before writing and moves on to the next number, which narrows (not closes) that window.
    A given ``version`` that is taken is an error (the caller's numbering, e.g. the registry's, must hold).
    """
    fixed = version is not None
    if version is None:
        existing = list_versions(store, card.name)
        version = (existing[-1] + 1) if existing else 1
    for _ in range(1 if fixed else attempts):
        prefix = model_prefix(card.name, version)
        if store.is_published(prefix) or store.list(prefix + "/"):
            if fixed:
                raise AlreadyExists(f"model {card.name!r} version {version} already exists in {store.url}")
            version += 1
            continue
        final = card.model_copy(update={"version": version})
        files = {WEIGHTS_FILE: weights, CARD_FILE: final.to_json(), **(extra_files or {})}
        store.publish(prefix, files, meta={"name": card.name, "version": version, "run_id": card.run_id})
        log.info("model published", extra={"model": card.name, "version": version, "prefix": prefix})
        return version, prefix
    raise AlreadyExists(f"could not find a free version for model {card.name} after {attempts} attempts")


def read_card(store, name: str, version: int | None = None) -> ModelCard:
    """The validated card of ``name`` (newest version when None); its bytes are checked against the manifest."""
    version = ModelRef(name, version).resolve(store)
    prefix = model_prefix(name, version)
    if not store.is_published(prefix):
        raise NotFound(f"model {name!r} version {version} is not published")
    return ModelCard.from_json(published_file(store, prefix, CARD_FILE), f"{prefix}/{CARD_FILE}")


def published_file(store, prefix: str, rel: str) -> bytes:
    """A file a published version must hold: once its manifest exists, a missing file is damage (DATA_LOSS),
    not an absent model (NOT_FOUND)."""
    try:
        return store.get_verified(prefix, rel)
    except NotFound as exc:
        raise IntegrityError(f"{prefix} is published but damaged: {exc}") from None


def build_module(card: ModelCard, state: dict[str, torch.Tensor], source: str,
                 files: dict[str, bytes] | None = None) -> torch.nn.Module:
    """Rebuild ``card``'s architecture and load ``state`` strictly: weights that do not fit fail loudly;
    ``files``: the card's ``files`` as read from beside the weights."""
    from shared.models import create_model

    model = create_model(card.architecture, **card.model_kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise IntegrityError(f"{source}: weights do not fit architecture {card.architecture}: {exc}") from exc
    if card.files:
        missing = sorted(set(card.files) - set(files or {}))
        if missing:
            raise IntegrityError(f"{source}: the card lists {missing} beside the weights, but they were not given")
        try:
            model.load_files({name: files[name] for name in card.files})
        except InvalidArgument as exc:
            raise IntegrityError(f"{source}: {exc}") from exc
    return model.eval()


def load_published(store, name: str, version: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild a published model in eval mode and return ``(model, card)``; newest version when None."""
    card = read_card(store, name, version)
    prefix = model_prefix(name, card.version)
    try:
        state = st_load(published_file(store, prefix, WEIGHTS_FILE))
    except SafetensorError as exc:
        raise IntegrityError(f"{prefix}/{WEIGHTS_FILE} is not a valid safetensors file: {exc}") from exc
    files = {name: published_file(store, prefix, name) for name in card.files}
    return build_module(card, state, prefix, files).to(device), card
