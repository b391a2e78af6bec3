"""What the render service and `trainyard render` do: build the job for a kind and run it.

``out`` names where the dataset goes: its last path segment is the dataset's prefix inside the
store formed by the rest (``/data/digits`` → store ``file:///data``, prefix ``digits``;
``s3://bucket/datasets/digits`` → store ``s3://bucket/datasets``, prefix ``digits``). Where it may go
is ``shared.storage.open_output``'s rule: the artifact store's ``datasets/`` area or a local path outside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.render.jobs import DEFAULT_MAX_FAILURES, build_job, run_job
from services.render.shards import ProgressFn
from shared.storage import Manifest, open_output


@dataclass
class RenderSpec:
    kind: str
    out: str
    count: int = 0
    seed: int = 0
    workers: int = 1
    resume: bool = False
    max_failures: str = DEFAULT_MAX_FAILURES
    # Kind-specific, named as in the kind's RenderRequest message (see services.render.jobs.KINDS).
    options: dict[str, Any] | None = None


def render(spec: RenderSpec, progress: ProgressFn | None = None) -> tuple[str, Manifest]:
    """Render and publish; returns (the dataset's location, its manifest)."""
    store, prefix = open_output(spec.out)
    job = build_job(spec.kind, spec.count, spec.seed, spec.options)
    manifest = run_job(job, store, prefix, workers=spec.workers, resume=spec.resume, progress=progress,
                       max_failures=spec.max_failures)
    return spec.out, manifest
