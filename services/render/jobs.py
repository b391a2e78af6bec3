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

from services.render.shards import ProgressFn, run_sharded
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
              "val_per_class": int(opts.get("val_per_class") or max(1, per_class // 4))}
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
               _trajectories, "4-camera trajectory videos with labels and future positions"),
    RenderKind("logos", "logos", "services.render.logos:LogoJob", ("image_size", "val_per_class"), _logos,
               "logo images in four classes (simple, text, gradient, complex)"),
    RenderKind("digits", "digits", "services.render.digits:DigitsJob", ("test_count", "gzip"), _digits,
               "handwritten-style digits in MNIST's IDX format"),
    RenderKind("cifar-synth", "cifar_synth", "services.render.cifar:CifarSynthJob", ("test_count",), _cifar_synth,
               "10-class 32x32 RGB shapes in CIFAR-10's python-batch format"),
)}


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
    """The job a render request describes; options left unset (None, 0, "") take the kind's defaults."""
    if count < 0:
        raise InvalidArgument(f"count must be >= 0, got {count}")
    entry = get_kind(kind)
    opts = {k: v for k, v in (options or {}).items() if v not in (None, 0, "", False)}
    unknown = sorted(set(opts) - set(entry.options))
    if unknown:
        raise InvalidArgument(f"render {kind} does not take {', '.join(unknown)}; it takes "
                              f"{', '.join(entry.options) or 'no options'}")
    return entry.build(count, seed, opts)


def run_job(job: Any, store: ArtifactStore, prefix: str, *, workers: int = 1, resume: bool = False,
            progress: ProgressFn | None = None) -> Manifest:
    if hasattr(job, "run"):
        return job.run(store, prefix, workers=workers, resume=resume, progress=progress)
    return run_sharded(job, store, prefix, workers=workers, resume=resume, progress=progress)
