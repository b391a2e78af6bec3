"""What the render service and `trainyard render` do: build the job for a kind and run it.

``out`` names where the dataset goes: its last path segment is the dataset's prefix inside the
store formed by the rest (``/data/digits`` → store ``file:///data``, prefix ``digits``;
``s3://bucket/datasets/digits`` → store ``s3://bucket/datasets``, prefix ``digits``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from services.render.jobs import create_job, run_job
from shared.errors import InvalidArgument
from shared.storage import Manifest, open_location

KINDS = ("cad", "cad-synth", "trajectories", "logos", "digits")
ProgressFn = Callable[[int, int, dict], None]


@dataclass
class RenderSpec:
    kind: str
    out: str
    count: int = 0
    seed: int = 0
    workers: int = 1
    resume: bool = False
    # Kind-specific: cad {input, image_size}; trajectories {shard_size}; logos {image_size,
    # val_per_class}; digits {test_count, gzip}.
    options: dict[str, Any] | None = None


def build_job(spec: RenderSpec):
    opts = {k: v for k, v in (spec.options or {}).items() if v not in (None, 0, "")}
    if spec.count < 0:
        raise InvalidArgument(f"count must be >= 0, got {spec.count}")
    if spec.kind == "cad":
        from services.render.cad.jobs import CadRenderJob

        if not opts.get("input"):
            raise InvalidArgument("render cad needs --input: a folder (or store URL) of DeepCAD JSON files")
        return CadRenderJob.from_input(opts["input"], size=int(opts.get("image_size") or 512))
    count = spec.count
    if spec.kind == "cad-synth":
        from services.render.cad.jobs import CadSynthJob

        return CadSynthJob(seed=spec.seed, total=count or 100)
    if spec.kind == "trajectories":
        params = {"seed": spec.seed, "total": count or 1000}
        if opts.get("shard_size"):
            params["shard_size"] = int(opts["shard_size"])
        return create_job("trajectories", params)
    if spec.kind == "logos":
        per_class = max(1, (count or 800) // 4)
        params = {"seed": spec.seed, "train_per_class": per_class,
                  "val_per_class": int(opts.get("val_per_class") or max(1, per_class // 4))}
        if opts.get("image_size"):
            params["image_size"] = int(opts["image_size"])
        return create_job("logos", params)
    if spec.kind == "digits":
        train = count or 60_000
        return create_job("digits", {"seed": spec.seed, "train": train,
                                     "test": int(opts.get("test_count") or max(1, train // 6)),
                                     "gzip": bool(opts.get("gzip", False))})
    raise InvalidArgument(f"unknown dataset kind {spec.kind!r}; one of {', '.join(KINDS)}")


def render(spec: RenderSpec, progress: ProgressFn | None = None) -> tuple[str, Manifest]:
    """Render and publish; returns (the dataset's location, its manifest)."""
    if spec.workers < 1:
        raise InvalidArgument(f"workers must be >= 1, got {spec.workers}")
    store, prefix = open_location(spec.out)
    job = build_job(spec)
    manifest = run_job(job, store, prefix, workers=spec.workers, resume=spec.resume,
                       progress=progress)
    return spec.out, manifest
