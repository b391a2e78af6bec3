"""The generic sharded dataset writer: render in a process pool, checkpoint per shard, publish last.

A *job* describes a deterministic dataset:

- ``kind`` (str), ``generator_version`` (str), ``seed`` (int), ``total`` (items), ``shard_size``,
  ``config`` (JSON-able dict);
- ``render_shard(index, start, stop) -> dict[str, bytes]``: the files of items ``[start, stop)``
  as paths relative to the dataset prefix. Every item's randomness must come from (seed, item
  index) so shard boundaries and worker counts never change the bytes;
- optional ``shard_info(index, start, stop, files) -> dict``: small JSON facts about a shard
  (class counts...), computed in the worker and kept in the shard record; ``failed`` (a count) and
  ``failures`` (``[{"model_id", "reason"}]``) there name items that could not be rendered, and a render
  with more than ``max_failed_items`` of them is refused instead of published;
- optional ``summarize(list_of_shard_records) -> dict``: merged into the dataset metadata;
- optional ``estimate_bytes() -> int``: expected dataset size, checked against free space.

Layout under ``prefix``: the job's files; ``_shards/run.json`` (what is being rendered);
``_shards/<index>.json`` per finished shard, written only after all its files, so after a crash
(or ``kill -9``) a record marks exactly the whole shards; ``metadata.json``; and finally
``MANIFEST.json``, written last, which is what makes the dataset visible. The ``_shards``
records are removed once the manifest exists.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from shared import deadlines
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from shared.logs import get_logger
from shared.parallel import pool_context
from shared.storage.base import ArtifactStore
from shared.storage.lease import Lease
from shared.storage.local import LocalStore
from shared.storage.manifest import FileEntry, Manifest, hash_bytes, now_iso

log = get_logger(__name__)

RECORDS_DIR = "_shards"
RUN_RECORD = f"{RECORDS_DIR}/run.json"
METADATA_NAME = "metadata.json"

ProgressFn = Callable[[int, int, dict], None]
# What a render that finds its output taken is told to do (CLI flags; RenderRequest fields of the same name).
RENDER_LEASE_ADVICE = ("wait for that render to finish, or render to another --out; if it was stopped, rerun "
                       "with --resume once its lease is free to continue from its complete shards")


class ShardPlan:
    """``(index, start, stop)`` for every shard of a ``total``-item dataset, computed on demand, so a plan
    costs the same few bytes whatever the item count (a list of a huge render's tasks once exhausted memory)."""

    def __init__(self, total: int, shard_size: int):
        if total <= 0 or shard_size <= 0:
            raise InvalidArgument(f"total ({total}) and shard_size ({shard_size}) must be positive")
        self.total, self.shard_size = total, shard_size

    def __len__(self) -> int:
        return -(-self.total // self.shard_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for index, start in enumerate(range(0, self.total, self.shard_size)):
            yield index, start, min(start + self.shard_size, self.total)


def run_spec(job) -> dict[str, Any]:
    """What identifies a render: a resumed run must match it exactly."""
    spec = {
        "kind": job.kind,
        "generator_version": str(job.generator_version),
        "seed": int(job.seed),
        "total": int(job.total),
        "shard_size": int(job.shard_size),
        "config": job.config,
    }
    # Round-trip through JSON so tuples/lists and int/float spellings compare as stored.
    return json.loads(json.dumps(spec, sort_keys=True))


def record_key(prefix: str, index: int) -> str:
    return f"{prefix}/{RECORDS_DIR}/{index:05d}.json"


def publish_existing(
    store: ArtifactStore, prefix: str, files: Mapping[str, FileEntry], meta: dict[str, Any]
) -> Manifest:
    """Publish files that are already uploaded under ``prefix``: write only ``MANIFEST.json``.

    ``ArtifactStore.publish`` uploads the files itself; after a sharded render they are in place
    already, so the manifest is built from their recorded sizes/digests and written last in the
    store's own format.
    """
    if not files:
        raise InvalidArgument(f"publish {prefix!r}: no files given")
    with store.lease(prefix, purpose=f"publish {prefix}") as lease:
        if store.is_published(prefix):
            raise AlreadyExists(f"{prefix!r} is already published in {store.url}")
        manifest = Manifest(files=dict(files), meta=dict(meta), created=now_iso())
        lease.ensure()  # a writer whose lease lapsed must not publish over its successor's files
        store.put_bytes(f"{prefix}/MANIFEST.json", manifest.to_json())
    log.info("published", extra={"store": store.url, "prefix": prefix, "files": len(files),
                                 "bytes": manifest.total_size})
    return manifest


def local_dir(store: ArtifactStore, prefix: str) -> Path | None:
    """The directory a local store writes ``prefix`` to; None for remote stores."""
    return store.root / prefix if isinstance(store, LocalStore) else None


def check_free_space(store: ArtifactStore, prefix: str, need_bytes: int) -> None:
    """Raise ResourceExhausted when a local store lacks ``need_bytes`` (plus 5 % headroom)."""
    path = local_dir(store, prefix)
    if path is None or need_bytes <= 0:
        return
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need_bytes * 1.05 > free:
        raise ResourceExhausted(
            f"rendering {prefix!r} needs ~{need_bytes / 1e9:.2f} GB, {free / 1e9:.2f} GB free at {probe}; "
            "free space or choose another store"
        )


def preflight(job, store: ArtifactStore, prefix: str, fraction_left: float = 1.0) -> None:
    """Check before writing that the job's estimated size fits (local stores only)."""
    estimate = getattr(job, "estimate_bytes", None)
    if estimate is None or local_dir(store, prefix) is None:
        return
    check_free_space(store, prefix, int(estimate() * fraction_left))


# ---- worker side ----

_worker_job = None


def _init_worker(job, deadline: float | None) -> None:
    global _worker_job
    _worker_job = job
    deadlines.carry(deadline)  # the job's client deadline holds in its workers too


def _render(job, task: tuple[int, int, int]) -> dict[str, Any]:
    index, start, stop = task
    t0 = time.perf_counter()
    files = job.render_shard(index, start, stop)
    if not files:
        raise InvalidArgument(f"{job.kind}: shard {index} rendered no files")
    info_fn = getattr(job, "shard_info", None)
    info = info_fn(index, start, stop, files) if info_fn else {}
    return {"index": index, "start": start, "stop": stop, "files": files, "info": info,
            "seconds": round(time.perf_counter() - t0, 4)}


def _render_in_worker(task: tuple[int, int, int]) -> dict[str, Any]:
    return _render(_worker_job, task)


# ---- main side ----


def _read_json(store: ArtifactStore, key: str) -> Any:
    return json.loads(store.get_bytes(key))


def _verified(store: ArtifactStore, prefix: str, record: dict) -> bool:
    """True when every file a shard record names is present with its recorded size and sha256."""
    for rel, entry in record["files"].items():
        key = f"{prefix}/{rel}"
        if not store.exists(key):
            return False
        if hash_bytes(store.get_bytes(key)) != FileEntry(entry["size"], entry["sha256"]):
            return False
    return True


def _check_existing(store: ArtifactStore, prefix: str, spec: dict, resume: bool) -> bool:
    """Validate what is already at ``prefix``; True when a previous run's records are there."""
    if store.is_published(prefix):
        raise AlreadyExists(f"{prefix!r} is already published in {store.url}; choose another --out")
    existing = store.list(prefix)
    if not existing:
        return False
    if not store.exists(f"{prefix}/{RUN_RECORD}"):
        raise FailedPrecondition(
            f"{prefix!r} in {store.url} already holds {len(existing)} files that are not a render run; "
            "choose an empty prefix"
        )
    if not resume:
        raise FailedPrecondition(
            f"{prefix!r} holds an incomplete render; pass --resume (resume=True) to continue it, "
            "or delete the prefix to start over"
        )
    previous = _read_json(store, f"{prefix}/{RUN_RECORD}")
    different = [k for k in spec if previous.get(k) != spec[k]]
    if different:
        detail = "; ".join(f"{k}: existing {previous.get(k)!r} vs requested {spec[k]!r}" for k in different)
        raise FailedPrecondition(
            f"cannot resume {prefix!r}: the existing run differs ({detail}); "
            "resume with the same parameters or use another prefix"
        )
    return True


def _write_shard(store: ArtifactStore, prefix: str, result: dict) -> dict:
    """Upload a shard's files, then its record; returns the record."""
    entries = {}
    for rel, data in result["files"].items():
        store.put_bytes(f"{prefix}/{rel}", data)
        entry = hash_bytes(data)
        entries[rel] = {"size": entry.size, "sha256": entry.sha256}
    record = {k: result[k] for k in ("index", "start", "stop", "info", "seconds")}
    record["files"] = entries
    store.put_bytes(record_key(prefix, result["index"]), json.dumps(record, sort_keys=True).encode())
    return record


def _discard_partial(store: ArtifactStore, prefix: str, result: dict) -> None:
    """Best effort: drop the files of a shard that could not be finished, to give space back."""
    for rel in result["files"]:
        with contextlib.suppress(OSError):
            store.delete(f"{prefix}/{rel}")


def _check_failures(prefix: str, records: list[dict], total: int, limit: int | None) -> None:
    """Refuse to publish a render where more items failed than ``limit`` (shards stay for --resume)."""
    failed = sum(int(r.get("info", {}).get("failed", 0)) for r in records)
    if limit is None or failed <= limit:
        return
    reasons = [f"{f.get('model_id')}: {f.get('reason')}"
               for r in records for f in r.get("info", {}).get("failures", [])]
    raise FailedPrecondition(
        f"{failed} of {total} items of {prefix!r} failed, more than the {limit} allowed (--max-failures); "
        f"not published. First failures: {'; '.join(reasons[:3])}. The rendered shards are kept: fix the "
        "inputs, or accept the failures with a larger --max-failures and rerun with --resume")


def run_sharded(
    job,
    store: ArtifactStore,
    prefix: str,
    *,
    workers: int = 1,
    resume: bool = False,
    progress: ProgressFn | None = None,
    mp_context: multiprocessing.context.BaseContext | None = None,
    max_failed_items: int | None = None,
) -> Manifest:
    """Render ``job`` into ``store`` under ``prefix`` shard by shard and publish it; see the module doc.

    The render is the prefix's one writer: it holds the prefix's lease from the first look at what is
    there to the manifest, so a second render of the same output (another process, replica or thread)
    fails at once naming this one, instead of interleaving its files with these.
    """
    prefix = prefix.strip("/")
    with store.lease(prefix, purpose=f"render {job.kind}", advice=RENDER_LEASE_ADVICE) as lease:
        return _render_and_publish(job, store, prefix, lease, workers=workers, resume=resume, progress=progress,
                                   mp_context=mp_context, max_failed_items=max_failed_items)


def _render_and_publish(job, store: ArtifactStore, prefix: str, lease: Lease, *, workers: int, resume: bool,
                        progress: ProgressFn | None, mp_context: multiprocessing.context.BaseContext | None,
                        max_failed_items: int | None) -> Manifest:
    if workers < 1:
        raise InvalidArgument(f"workers must be >= 1, got {workers}")
    spec = run_spec(job)
    plan = ShardPlan(job.total, job.shard_size)
    resuming = _check_existing(store, prefix, spec, resume)

    records: dict[int, dict] = {}
    if resuming:
        for index, _start, _stop in plan:
            key = record_key(prefix, index)
            if store.exists(key):
                record = _read_json(store, key)
                if _verified(store, prefix, record):
                    records[index] = record
                else:
                    log.warning("shard failed verification; re-rendering", extra={"prefix": prefix, "shard": index})
                    store.delete(key)
        log.info("resuming render", extra={"prefix": prefix, "complete_shards": len(records), "shards": len(plan)})

    pending = (task for task in plan if task[0] not in records)
    pending_shards = len(plan) - len(records)
    done_items = sum(r["stop"] - r["start"] for r in records.values())
    preflight(job, store, prefix, fraction_left=(job.total - done_items) / job.total)
    if not resuming:
        store.put_bytes(f"{prefix}/{RUN_RECORD}", json.dumps({**spec, "started": now_iso()}, sort_keys=True).encode())

    t0 = time.perf_counter()
    written_bytes = written_items = 0
    pool = None
    if pending_shards and workers > 1:
        ctx = mp_context or pool_context()
        pool = ctx.Pool(min(workers, pending_shards), initializer=_init_worker,
                        initargs=(job, deadlines.current_deadline()))
        results = pool.imap_unordered(_render_in_worker, pending)
    else:
        results = (_render(job, task) for task in pending)
    try:
        for result in results:
            try:
                record = _write_shard(store, prefix, result)
            except ResourceExhausted as exc:  # the store's word for a full disk
                _discard_partial(store, prefix, result)
                raise ResourceExhausted(
                    f"no space left on the device while writing shard {result['index']} of {prefix!r}: "
                    f"{len(records)}/{len(plan)} shards are complete and kept; free space and rerun "
                    "with --resume to continue"
                ) from exc
            records[record["index"]] = record
            lease.ensure()  # stop writing as soon as another writer has taken the prefix over
            n_items = record["stop"] - record["start"]
            done_items += n_items
            written_items += n_items
            written_bytes += sum(e["size"] for e in record["files"].values())
            if written_items == n_items and done_items < job.total:
                # The first real shard is a far better size estimate than any guess made up front.
                check_free_space(store, prefix, int(written_bytes / written_items * (job.total - done_items)))
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress(done_items, job.total, {
                    "shard": record["index"], "shards_done": len(records), "shards_total": len(plan),
                    "elapsed_s": round(elapsed, 3), "items_per_s": round(written_items / max(elapsed, 1e-9), 2),
                })
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    ordered = [records[i] for i, _, _ in plan]
    _check_failures(prefix, ordered, job.total, max_failed_items)
    meta: dict[str, Any] = {
        **spec,
        "num_shards": len(plan),
        "render_seconds": round(sum(r["seconds"] for r in ordered), 3),
        "created": now_iso(),
    }
    summarize = getattr(job, "summarize", None)
    if summarize is not None:
        meta.update(summarize(ordered))
    files: dict[str, FileEntry] = {}
    for record in ordered:
        for rel, entry in record["files"].items():
            files[rel] = FileEntry(entry["size"], entry["sha256"])
    metadata = json.dumps(meta, indent=2, sort_keys=True).encode()
    try:
        store.put_bytes(f"{prefix}/{METADATA_NAME}", metadata)
        files[METADATA_NAME] = hash_bytes(metadata)
        manifest = publish_existing(store, prefix, files, meta)
    except ResourceExhausted as exc:
        raise ResourceExhausted(
            f"no space left on the device while publishing {prefix!r}: all {len(plan)} shards are complete; "
            "free space and rerun with --resume to publish"
        ) from exc
    store.delete_prefix(f"{prefix}/{RECORDS_DIR}")
    log.info("render complete", extra={"prefix": prefix, "kind": job.kind, "items": job.total,
                                       "bytes": manifest.total_size,
                                       "wall_s": round(time.perf_counter() - t0, 2)})
    return manifest
