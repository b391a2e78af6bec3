"""The render kinds, in one table: each kind's name, its RenderRequest field, its job class, the options it
reads and how a request becomes the job. The CLI's choices, the service's request decoding and the job
factory all come from ``KINDS``; adding a kind is adding a row.

``create_job("trajectories", {"total": 1000, "seed": 3})`` builds a job from its constructor's parameters;
``build_job(spec)`` from a render request; ``run_job(job, store, prefix, ...)`` renders and publishes it:
jobs with their own ``run`` method (the digits, whose IDX files are not shardable) use it, every other job
goes through ``services.render.shards.run_sharded``.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.render.shards import RENDER_LEASE_ADVICE, ProgressFn, run_sharded
from shared.errors import InvalidArgument
from shared.storage import ArtifactStore, Manifest


@dataclass(frozen=True)
class RenderKind:
    name: str  # as the CLI spells it
    field: str  # the RenderRequest oneof field, whose message holds ``options``
    job_class: str  # "module:Class", imported on first use so listing kinds imports no generator
    options: tuple[str, ...]  # kind-specific request fields (CLI flags of the same name)
    # (count, seed, options with unset ones dropped) -> the job
    build: Callable[[int, int, dict[str, Any]], Any]
    help: str
    # The most items one request may ask for: the digit and CIFAR writers hold a split in memory, the
    # sharded kinds are bounded by what a disk holds; past it a typo (10**12) is refused, not attempted.
    max_count: int = 1_000_000

    def job_factory(self) -> Callable[..., Any]:
        module, _, name = self.job_class.partition(":")
        return getattr(importlib.import_module(module), name)


def _cad(count: int, seed: int, opts: dict[str, Any]) -> Any:
    if not opts.get("input"):
        raise InvalidArgument("render cad needs --input: a folder (or store URL) of DeepCAD JSON files")
    return KINDS["cad"].job_factory().from_input(opts["input"], size=int(opts.get("image_size") or 512))


def _trajectories(count: int, seed: int, opts: dict[str, Any]) -> Any:
    return create_job("trajectories", {"seed": seed, "total": count or 1000,
                                       **({"shard_size": int(opts["shard_size"])} if "shard_size" in opts else {})})


def _logos(count: int, seed: int, opts: dict[str, Any]) -> Any:
    per_class = max(1, (count or 800) // 4)
    params = {"seed": seed, "train_per_class": per_class,
              "val_per_class": int(opts.get("val_per_class") or max(1, per_class // 4)),
              "test_per_class": int(opts.get("test_per_class") or 0)}
    if "image_size" in opts:
        params["image_size"] = int(opts["image_size"])
    return create_job("logos", params)


def _digits(count: int, seed: int, opts: dict[str, Any]) -> Any:
    train = count or 60_000
    test = int(opts.get("test_count") or max(1, train // 6))
    return create_job("digits", {"seed": seed, "train": train, "test": test, "gzip": bool(opts.get("gzip", False))})


def _cifar_synth(count: int, seed: int, opts: dict[str, Any]) -> Any:
    train = count or 50_000
    return create_job("cifar-synth", {"seed": seed, "train": train,
                                      "test": int(opts.get("test_count") or max(1, train // 5))})


KINDS: dict[str, RenderKind] = {k.name: k for k in (
    RenderKind("cad", "cad", "services.render.cad.jobs:CadRenderJob", ("input", "image_size"), _cad,
               "front/top/right views of DeepCAD JSON models"),
    RenderKind("cad-synth", "cad_synth", "services.render.cad.jobs:CadSynthJob", (),
               lambda count, seed, _: create_job("cad-synth", {"seed": seed, "total": count or 100}),
               "random valid DeepCAD JSON models"),
    RenderKind("trajectories", "trajectories", "services.render.trajectories:TrajectoryJob", ("shard_size",),
               _trajectories, "4-camera trajectory videos with labels and future positions",
               max_count=200_000),  # ~0.5 MB a sample on disk
    RenderKind("logos", "logos", "services.render.logos:LogoJob", ("image_size", "val_per_class", "test_per_class"),
               _logos,
               "logo images in four classes (simple, text, gradient, complex)"),
    RenderKind("digits", "digits", "services.render.digits:DigitsJob", ("test_count", "gzip"), _digits,
               "handwritten-style digits in MNIST's IDX format"),
    RenderKind("cifar-synth", "cifar_synth", "services.render.cifar:CifarSynthJob", ("test_count",), _cifar_synth,
               "10-class 32x32 RGB shapes in CIFAR-10's python-batch format",
               max_count=300_000),  # a split is held in memory: 3 KB an image
)}


# The range each numeric option accepts, checked before any work starts (a request with image_size=-1
# used to "succeed" with every model failed).
OPTION_RANGES: dict[str, tuple[int, int]] = {
    "image_size": (16, 2048),
    "shard_size": (1, 10_000),
    "val_per_class": (1, 250_000),
    "test_per_class": (1, 250_000),
}
MAX_WORKERS = 256
SEED_RANGE = (0, 2**63 - 1)


def _check_range(what: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise InvalidArgument(f"{what} must be between {lo:,} and {hi:,}, got {value:,}")


def get_kind(name: str) -> RenderKind:
    try:
        return KINDS[name]
    except KeyError:
        raise InvalidArgument(f"unknown render job kind {name!r}; known kinds: {', '.join(KINDS)}") from None


def kind_of_field(field: str) -> RenderKind:
    """The kind a RenderRequest's oneof field names."""
    return next(k for k in KINDS.values() if k.field == field)


def list_jobs() -> list[str]:
    return sorted(KINDS)


def create_job(kind: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build a ``kind`` job from ``params`` (keyword arguments of its constructor)."""
    factory = get_kind(kind).job_factory()
    params = dict(params or {})
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidArgument(f"{kind} job: unknown parameter(s) {unknown}; accepted: {accepted}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise InvalidArgument(f"{kind} job: bad parameters {params}: {exc}") from exc


def build_job(kind: str, count: int, seed: int, options: Mapping[str, Any] | None = None) -> Any:
    """The job a render request describes; options left unset (None, 0, "") take the kind's defaults.

    Every number is checked against its range here, before a job (and its work list) exists.
    """
    entry = get_kind(kind)
    _check_range(f"render {kind}: count (0 for the default)", count, 0, entry.max_count)
    _check_range(f"render {kind}: seed", seed, *SEED_RANGE)
    opts = {k: v for k, v in (options or {}).items() if v not in (None, 0, "", False)}
    unknown = sorted(set(opts) - set(entry.options))
    if unknown:
        raise InvalidArgument(f"render {kind} does not take {', '.join(unknown)}; it takes "
                              f"{', '.join(entry.options) or 'no options'}")
    for name, value in (options or {}).items():
        if name in OPTION_RANGES and value not in (None, 0):
            _check_range(f"render {kind}: {name}", value, *OPTION_RANGES[name])
    if (options or {}).get("test_count"):
        _check_range(f"render {kind}: test_count", options["test_count"], 1, entry.max_count)
    return entry.build(count, seed, opts)


DEFAULT_MAX_FAILURES = "10%"


def failure_limit(max_failures: str, total: int) -> int:
    """How many of ``total`` items may fail: ``max_failures`` is a count ("5") or a share ("10%")."""
    text = (max_failures or DEFAULT_MAX_FAILURES).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(total * share / 100)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise InvalidArgument(f"max_failures must be a count (5) or a percentage (10%), got {max_failures!r}") from None


def run_job(job: Any, store: ArtifactStore, prefix: str, *, workers: int = 1, resume: bool = False,
            progress: ProgressFn | None = None, max_failures: str = DEFAULT_MAX_FAILURES) -> Manifest:
    _check_range("workers", workers, 1, MAX_WORKERS)
    limit = failure_limit(max_failures, job.total)  # checked for every kind, before work starts
    if hasattr(job, "run"):  # the digit and CIFAR writers have no per-item failures
        # They publish in one step at the end; the lease makes them the output's one writer from the start.
        with store.lease(prefix, purpose=f"render {job.kind}", advice=RENDER_LEASE_ADVICE):
            return job.run(store, prefix, workers=workers, resume=resume, progress=progress)
    return run_sharded(job, store, prefix, workers=workers, resume=resume, progress=progress,
                       max_failed_items=limit)
