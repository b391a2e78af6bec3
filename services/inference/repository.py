"""The model repository: published models (``models/<name>/<version>/`` in the artifact store) loaded,
warmed up and served, several versions side by side.

A model is READY only once its weights are loaded (sha256-verified, safetensors only) and one forward
pass has run. A request without a version gets the newest loaded version.

Each model is batched with its own settings: a load request's override (Triton's load ``config``), else the
card's ``serving`` fields, else the server's flags; ``LoadedModel.batching`` is what is applied.
"""
from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field

import torch

from services.inference.batcher import DynamicBatcher
from services.inference.statistics import ModelStats
from shared.errors import InvalidArgument, NotFound
from shared.logs import get_logger
from shared.modelcard import (
    ModelCard,
    ModelRef,
    Serving,
    list_published,
    list_versions,
    load_published,
    parse_model_ref,
)
from shared.names import validate_name
from shared.predict import Signature, signature_for
from shared.quantize import quantize_int8

log = get_logger(__name__)

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
MAX_FAILED_LOADS = 256


def parse_version(version: str | int | None) -> int | None:
    """'' / None -> None (newest); '3' / 3 -> 3."""
    if version is None or version == "":
        return None
    try:
        value = int(version)
    except (TypeError, ValueError):
        raise InvalidArgument(f"model version must be a positive integer, got {version!r}") from None
    if value < 1:
        raise InvalidArgument(f"model version must be a positive integer, got {version!r}")
    return value


def parse_model_specs(spec: str) -> list[ModelRef] | str:
    """``"a,b:2,c@champion"`` -> the three references; ``"all"`` -> "all"; "" -> []."""
    spec = (spec or "").strip()
    if spec == "all":
        return "all"
    return [parse_model_ref(item) for item in filter(None, (s.strip() for s in spec.split(",")))]


@dataclass(frozen=True)
class Batching:
    """The dynamic-batching settings applied to one loaded model."""

    max_batch_size: int
    max_queue_delay_ms: float


@dataclass
class LoadedModel:
    name: str
    version: int
    card: ModelCard
    module: torch.nn.Module
    signature: Signature
    batcher: DynamicBatcher | None = None
    state: str = LOADING
    quantized: bool = False
    stats: ModelStats = field(default_factory=ModelStats)

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    @property
    def input_size(self) -> list[int]:
        return self.card.input_size

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named outputs (shared.predict) for a prepared batch (runs on the batcher's thread)."""
        return self.signature.forward(x)

    def infer(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.batcher.submit(x)

    @property
    def batching(self) -> Batching:
        return Batching(self.batcher.max_batch_size, self.batcher.max_queue_delay_ms)


@dataclass
class IndexEntry:
    name: str
    version: int
    state: str
    reason: str = ""


class ModelRepository:
    """Loads published models from ``store`` and keeps them ready for inference.

    ``max_batch_size`` / ``max_queue_delay_ms`` configure the dynamic batcher of every model whose card (or
    load request) does not set its own; ``quantize`` applies int8 dynamic quantization on load.
    """

    def __init__(self, store, *, max_batch_size: int = 32, max_queue_delay_ms: float = 2.0,
                 quantize: bool = False, tracking_uri: str | None = None):
        if max_batch_size < 1:
            raise InvalidArgument(f"max batch size must be >= 1, got {max_batch_size}")
        if max_queue_delay_ms < 0:
            raise InvalidArgument(f"max queue delay must be >= 0 ms, got {max_queue_delay_ms}")
        self.store = store
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.quantize = quantize
        self.tracking_uri = tracking_uri  # where registry aliases are resolved (default: MLFLOW_TRACKING_URI)
        self._models: dict[tuple[str, int], LoadedModel] = {}
        # Why a load of a published version failed, newest last; bounded, so a flood of bad loads cannot grow
        # the index (or the RepositoryIndex answer) without limit.
        self._failed: collections.OrderedDict[tuple[str, int], str] = collections.OrderedDict()
        self._lock = threading.Lock()
        # One load at a time: loads are rare, and this keeps two loads of one model from racing.
        self._load_lock = threading.Lock()

    # ---- what the store offers

    def published(self) -> dict[str, list[int]]:
        """Every published model in the store -> its versions, ascending."""
        return list_published(self.store)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Published and loaded models with their state (READY / LOADING / UNAVAILABLE + reason)."""
        with self._lock:
            states = {key: m.state for key, m in self._models.items()}
            failed = dict(self._failed)
        keys = set(states) | set(failed)
        for name, versions in self.published().items():
            keys.update((name, v) for v in versions)
        out = []
        for key in sorted(keys):
            if key in states:
                out.append(IndexEntry(key[0], key[1], states[key]))
            else:
                out.append(IndexEntry(key[0], key[1], UNAVAILABLE, failed.get(key, "unloaded")))
        return [e for e in out if e.state == READY] if ready_only else out

    # ---- load / unload

    def load(self, name: str, version: int | None = None, alias: str | None = None,
             serving: Serving | None = None) -> LoadedModel:
        """Load ``name`` (``version``; the version MLflow's registry gives ``alias``; else the newest published
        one), warm it up, mark it READY. Idempotent; ``serving`` overrides the card's batching settings, and
        given for a loaded model it re-batches that model with them (queued requests finish first)."""
        validate_name(name, "model name")
        with self._load_lock:
            if version is None and alias is not None:
                version = ModelRef(name, alias=alias).resolve(self.store, self.tracking_uri)
            if version is None:
                versions = list_versions(self.store, name)
                if not versions:
                    raise NotFound(f"model {name!r} is not published in {self.store.url}")
                version = versions[-1]
            key = (name, version)
            with self._lock:
                existing = self._models.get(key)
            if existing is not None and existing.state == READY:
                if serving is not None:
                    self._rebatch(existing, self._batching(existing.card, serving))
                return existing
            try:
                loaded = self._build(name, version, serving)
            except NotFound:
                raise  # nothing published under that name: nothing to list as failed
            except Exception as exc:
                self._record_failure(key, f"{type(exc).__name__}: {exc}")
                raise
            with self._lock:
                self._models[key] = loaded
                self._failed.pop(key, None)
            try:
                self._warm_up(loaded)
            except Exception as exc:
                self._discard(key)
                self._record_failure(key, f"warm-up failed: {exc}")
                raise
            loaded.state = READY
            log.info("model ready", extra={"model": name, "version": version, "quantized": loaded.quantized,
                                           "max_batch_size": loaded.batching.max_batch_size,
                                           "max_queue_delay_ms": loaded.batching.max_queue_delay_ms})
            return loaded

    def unload(self, name: str, version: int | None = None) -> list[int]:
        """Unload one version, or every loaded version of ``name``; returns the versions unloaded."""
        with self._lock:
            keys = [k for k in self._models if k[0] == name and (version is None or k[1] == version)]
        if not keys:
            what = f"model {name!r}" + (f" version {version}" if version is not None else "")
            raise NotFound(f"{what} is not loaded")
        for key in keys:
            self._discard(key)
            log.info("model unloaded", extra={"model": key[0], "version": key[1]})
        return sorted(k[1] for k in keys)

    def load_all_newest(self) -> list[LoadedModel]:
        return [self.load(name, versions[-1]) for name, versions in self.published().items()]

    def close(self) -> None:
        with self._lock:
            keys = list(self._models)
        for key in keys:
            self._discard(key)

    # ---- lookup

    def get(self, name: str, version: str | int | None = None) -> LoadedModel:
        """The READY model for a request: that version, or the newest loaded one when none is given."""
        wanted = parse_version(version)
        with self._lock:
            ready = {v: m for (n, v), m in self._models.items() if n == name and m.state == READY}
        if wanted is None:
            if ready:
                return ready[max(ready)]
            raise NotFound(f"model {name!r} is not loaded (loaded: {self._loaded_names() or 'none'})")
        if wanted in ready:
            return ready[wanted]
        have = ", ".join(map(str, sorted(ready))) or "none"
        raise NotFound(f"model {name!r} version {wanted} is not loaded (loaded versions: {have})")

    def is_ready(self, name: str, version: str | int | None = None) -> bool:
        try:
            self.get(name, version)
        except NotFound:
            return False
        return True

    def loaded(self, name: str | None = None) -> list[LoadedModel]:
        """The READY models (of ``name``, or all), by name and version."""
        with self._lock:
            found = [m for (n, _), m in self._models.items() if m.state == READY and name in (None, n)]
        return sorted(found, key=lambda m: (m.name, m.version))

    def loaded_versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(v for (n, v), m in self._models.items() if n == name and m.state == READY)

    def _loaded_names(self) -> str:
        with self._lock:
            return ", ".join(sorted({f"{n}:{v}" for (n, v), m in self._models.items() if m.state == READY}))

    # ---- internals

    def _batching(self, card: ModelCard, override: Serving | None) -> Batching:
        """Each setting from the load request's override, else the card, else the server's flag."""
        def pick(key: str, default):
            for source in (override, card.serving):
                value = getattr(source, key, None) if source is not None else None
                if value is not None:
                    return value
            return default

        return Batching(pick("max_batch_size", self.max_batch_size),
                        pick("max_queue_delay_ms", self.max_queue_delay_ms))

    def _batcher(self, loaded: LoadedModel, batching: Batching) -> DynamicBatcher:
        return DynamicBatcher(loaded.forward, max_batch_size=batching.max_batch_size,
                              max_queue_delay_ms=batching.max_queue_delay_ms, model=loaded.name,
                              version=str(loaded.version), stats=loaded.stats)

    def _build(self, name: str, version: int, serving: Serving | None = None) -> LoadedModel:
        module, card = load_published(self.store, name, version)
        if self.quantize:
            module, _ = quantize_int8(module)
        loaded = LoadedModel(name, version, card, module, signature_for(card, module), quantized=self.quantize)
        loaded.batcher = self._batcher(loaded, self._batching(card, serving))
        return loaded

    def _rebatch(self, loaded: LoadedModel, batching: Batching) -> None:
        if batching == loaded.batching:
            return
        old, loaded.batcher = loaded.batcher, self._batcher(loaded, batching)
        old.close()  # its queued requests finish; new ones already go to the new batcher
        log.info("model re-batched", extra={"model": loaded.name, "version": loaded.version,
                                            "max_batch_size": batching.max_batch_size,
                                            "max_queue_delay_ms": batching.max_queue_delay_ms})

    def _warm_up(self, loaded: LoadedModel) -> None:
        # The first forward pass allocates and picks kernels; it should not land on a client's request.
        for n in sorted({1, min(loaded.batching.max_batch_size, 8)}):
            loaded.signature.check(loaded.forward(torch.zeros(n, *loaded.signature.input_shape)), n)

    def _record_failure(self, key: tuple[str, int], reason: str) -> None:
        with self._lock:
            self._failed.pop(key, None)
            self._failed[key] = reason
            while len(self._failed) > MAX_FAILED_LOADS:
                self._failed.popitem(last=False)

    def _discard(self, key: tuple[str, int]) -> None:
        with self._lock:
            loaded = self._models.pop(key, None)
        if loaded is not None and loaded.batcher is not None:
            loaded.batcher.close()


def default_threads() -> int:
    """Torch intra-op threads for the forward pass: one core fewer than this process may use (a
    container's cpuset, not the host's count), since request handling (parsing, preprocessing, gRPC)
    needs a core too. On a busy 2-core machine two OpenMP threads lose far more to descheduled barrier
    waits than they gain: resnet50 ran 30x slower with 2 threads than with 1 under load (measured)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)
