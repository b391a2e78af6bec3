"""The sharded writer's contract: determinism across workers, checkpoints, resume, refusals, disk full."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from services.render.jobs import create_job, list_jobs
from services.render.shards import RECORDS_DIR, ShardPlan, publish_existing, record_key, run_sharded
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted
from shared.storage import FileEntry, open_store
from tests.harness.stores import FullDisk


class NoiseJob:
    """A small real job: item i is 1000 bytes drawn from rng(seed, i), grouped one file per shard."""

    kind = "noise"
    generator_version = "1"

    def __init__(self, total=50, shard_size=7, seed=0, width=1000, need_bytes=None):
        self.total, self.shard_size, self.seed, self.width = total, shard_size, seed, width
        self.config = {"width": width}
        self.need_bytes = need_bytes

    def render_shard(self, index, start, stop):
        items = [np.random.default_rng([self.seed, i]).bytes(self.width) for i in range(start, stop)]
        return {f"data/{index:03d}.bin": b"".join(items)}

    def shard_info(self, index, start, stop, files):
        return {"items": stop - start}

    def summarize(self, records):
        return {"items": sum(r["info"]["items"] for r in records)}

    def estimate_bytes(self):
        return self.need_bytes if self.need_bytes is not None else self.total * self.width


def dataset_bytes(store, prefix):
    manifest = store.read_manifest(prefix)
    return {rel: store.get_bytes(f"{prefix}/{rel}") for rel in manifest.files if rel != "metadata.json"}


def test_shard_plan_covers_every_item_once():
    plan = list(ShardPlan(50, 7))
    assert plan[0] == (0, 0, 7) and plan[-1] == (7, 49, 50)
    assert sum(stop - start for _, start, stop in plan) == 50 and len(ShardPlan(50, 7)) == len(plan)
    with pytest.raises(InvalidArgument):
        ShardPlan(0, 7)
    # A plan is computed as it is walked: a huge one costs nothing until it is.
    assert len(ShardPlan(10**15, 1)) == 10**15


def test_output_is_independent_of_workers_and_publishes_manifest(tmp_path):
    store = open_store(tmp_path)
    seen = []
    manifest = run_sharded(NoiseJob(), store, "a", workers=1, progress=lambda d, t, info: seen.append((d, t)))
    run_sharded(NoiseJob(), store, "b", workers=3)
    assert dataset_bytes(store, "a") == dataset_bytes(store, "b")
    # Item 10 sits in shard 1 at offset 3; its bytes are a pure function of (seed, 10).
    assert store.get_bytes("a/data/001.bin")[3000:4000] == np.random.default_rng([0, 10]).bytes(1000)
    assert seen[-1] == (50, 50) and len(seen) == 8
    read = store.read_manifest("a")
    assert read.files == manifest.files and len(read.files) == 9  # 8 shards + metadata.json
    assert read.meta["seed"] == 0 and read.meta["kind"] == "noise" and read.meta["items"] == 50
    assert read.meta["config"] == {"width": 1000} and read.meta["num_shards"] == 8
    assert json.loads(store.get_verified("a", "metadata.json"))["total"] == 50
    assert not store.list(f"a/{RECORDS_DIR}")  # bookkeeping removed once published


def test_refuses_published_and_incomplete_prefixes(tmp_path):
    store = open_store(tmp_path)
    run_sharded(NoiseJob(total=10), store, "done")
    with pytest.raises(AlreadyExists):
        run_sharded(NoiseJob(total=10), store, "done", resume=True)

    with pytest.raises(ResourceExhausted):
        run_sharded(NoiseJob(), FullDisk(tmp_path, budget=20_000), "half")
    with pytest.raises(FailedPrecondition, match="--resume"):
        run_sharded(NoiseJob(), store, "half")
    with pytest.raises(FailedPrecondition, match="seed: existing 0 vs requested 1"):
        run_sharded(NoiseJob(seed=1), store, "half", resume=True)
    with pytest.raises(FailedPrecondition, match="config"):
        run_sharded(NoiseJob(width=999), store, "half", resume=True)

    store.put_bytes("other/file.txt", b"x")
    with pytest.raises(FailedPrecondition, match="not a render run"):
        run_sharded(NoiseJob(), store, "other")


def test_disk_full_keeps_whole_shards_and_resume_finishes(tmp_path):
    reference = open_store(tmp_path / "ref")
    run_sharded(NoiseJob(), reference, "ds")

    full = FullDisk(tmp_path / "full", budget=25_000)
    with pytest.raises(ResourceExhausted, match=r"3/8 shards are complete.*--resume"):
        run_sharded(NoiseJob(), full, "ds", workers=2)
    store = open_store(tmp_path / "full")
    records = [k for k in store.list(f"ds/{RECORDS_DIR}") if not k.endswith("run.json")]
    assert len(records) == 3
    for key in records:  # every recorded shard is whole: its files match the record's digests
        record = json.loads(store.get_bytes(key))
        for rel, entry in record["files"].items():
            assert hashlib.sha256(store.get_bytes(f"ds/{rel}")).hexdigest() == entry["sha256"]
    assert not store.is_published("ds")

    run_sharded(NoiseJob(), store, "ds", resume=True, workers=2)
    assert dataset_bytes(store, "ds") == dataset_bytes(reference, "ds")


def test_resume_rerenders_a_corrupted_shard(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ResourceExhausted):
        run_sharded(NoiseJob(), FullDisk(tmp_path, budget=30_000), "ds")
    store.put_bytes("ds/data/000.bin", b"garbage")  # a shard the record calls complete, now damaged
    run_sharded(NoiseJob(), store, "ds", resume=True)
    assert store.get_verified("ds", "data/000.bin")[:1000] == np.random.default_rng([0, 0]).bytes(1000)


def test_preflight_refuses_before_writing_when_space_is_short(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ResourceExhausted, match=r"needs ~\d+\.\d+ GB, \d+\.\d+ GB free at"):
        run_sharded(NoiseJob(need_bytes=10**16), store, "big")
    assert store.list("big") == []


def test_publish_existing_writes_a_store_manifest(tmp_path):
    store = open_store(tmp_path)
    store.put_bytes("p/x.bin", b"abc")
    entry = FileEntry(3, hashlib.sha256(b"abc").hexdigest())
    publish_existing(store, "p", {"x.bin": entry}, {"note": 1})
    assert store.read_manifest("p").files == {"x.bin": entry}
    assert store.get_verified("p", "x.bin") == b"abc"
    with pytest.raises(AlreadyExists):
        publish_existing(store, "p", {"x.bin": entry}, {})


def test_job_registry_builds_jobs_from_params():
    assert {"trajectories", "logos", "digits"} <= set(list_jobs())
    job = create_job("trajectories", {"total": 12, "seed": 5})
    assert (job.kind, job.total, job.seed) == ("trajectories", 12, 5)
    with pytest.raises(InvalidArgument, match="unknown parameter"):
        create_job("logos", {"colour": "red"})
    with pytest.raises(InvalidArgument, match="unknown render job kind"):
        create_job("nope", {})
    assert record_key("ds", 3) == "ds/_shards/00003.json"
