"""Registry of render job kinds, and the command line that runs one.

``create_job("trajectories", {"total": 1000, "seed": 3})`` builds a job from CLI-ish params;
``run_job(job, store, prefix, ...)`` renders and publishes it: jobs with their own ``run``
method (the digits, whose IDX files are not shardable) use it, every other job goes through
``services.render.shards.run_sharded``.

    python -m services.render.jobs trajectories --store file:///data --prefix datasets/traj/v1 \
        --set total=10000 --workers 2 [--resume]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
from typing import Any, Callable, Mapping

from shared.config import apply_overrides
from shared.errors import InvalidArgument, TrainyardError
from shared.logs import configure, get_logger
from shared.storage import ArtifactStore, Manifest, open_store

from services.render.shards import ProgressFn, run_sharded

log = get_logger(__name__)

# Imported on first use so that listing kinds (or running one) does not import every generator.
_BUILTIN: dict[str, str] = {
    "trajectories": "services.render.trajectories:TrajectoryJob",
    "logos": "services.render.logos:LogoJob",
    "digits": "services.render.digits:DigitsJob",
}
_registered: dict[str, Callable[..., Any]] = {}


def register_job(kind: str, factory: Callable[..., Any]) -> None:
    """Add a job kind; ``factory(**params)`` must return a job (see services.render.shards)."""
    _registered[kind] = factory


def list_jobs() -> list[str]:
    return sorted(set(_BUILTIN) | set(_registered))


def job_factory(kind: str) -> Callable[..., Any]:
    if kind in _registered:
        return _registered[kind]
    if kind not in _BUILTIN:
        raise InvalidArgument(f"unknown render job kind {kind!r}; known kinds: {', '.join(list_jobs())}")
    module, _, name = _BUILTIN[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def create_job(kind: str, params: Mapping[str, Any] | None = None) -> Any:
    """Build a ``kind`` job from ``params`` (keyword arguments of its constructor)."""
    factory = job_factory(kind)
    params = dict(params or {})
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InvalidArgument(f"{kind} job: unknown parameter(s) {unknown}; accepted: {accepted}")
    try:
        return factory(**params)
    except TypeError as exc:
        raise InvalidArgument(f"{kind} job: bad parameters {params}: {exc}") from exc


def run_job(
    job: Any,
    store: ArtifactStore,
    prefix: str,
    *,
    workers: int = 1,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> Manifest:
    if hasattr(job, "run"):
        return job.run(store, prefix, workers=workers, resume=resume, progress=progress)
    return run_sharded(job, store, prefix, workers=workers, resume=resume, progress=progress)


def _log_progress(done: int, total: int, info: dict) -> None:
    log.info("render progress", extra={"done": done, "total": total, **info})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.render.jobs", description="Render a dataset.")
    parser.add_argument("kind", help=f"one of: {', '.join(list_jobs())}")
    parser.add_argument("--store", default=None, help="store URL or directory (default: TRAINYARD_STORE)")
    parser.add_argument("--prefix", required=True, help="dataset prefix inside the store")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="job parameter, value parsed as YAML (repeatable), e.g. --set total=1000")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted render at --prefix")
    args = parser.parse_args(argv)
    configure()
    try:
        job = create_job(args.kind, apply_overrides({}, args.sets))
        manifest = run_job(job, open_store(args.store), args.prefix, workers=args.workers,
                           resume=args.resume, progress=_log_progress)
    except TrainyardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"prefix": args.prefix, "files": len(manifest.files), "bytes": manifest.total_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
