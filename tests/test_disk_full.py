"""A disk that really fills up (a size-limited tmpfs, not a simulated ENOSPC): a trajectory render and a
training run's checkpoint stop cleanly with RESOURCE_EXHAUSTED, keep what was complete, leave nothing
half-written, and finish once space is freed."""
from __future__ import annotations

import errno
import subprocess
import uuid

import pytest

from services.render.shards import RECORDS_DIR, run_sharded
from services.render.trajectories import TrajectoryJob
from services.train import checkpoint as ckpt
from services.train.config import parse_train_config
from services.train.engine import Engine
from services.train.events import read_events
from shared.errors import ResourceExhausted
from shared.storage import open_store
from shared.storage.base import TEMP_PREFIX


class SmallDisk:
    """A tmpfs of ``size_mb`` at ``path``; ``fill()`` writes a ballast file until the disk refuses more,
    ``free()`` removes it."""

    def __init__(self, path, size_mb: int):
        self.path, self.ballast = path, path / "ballast"
        path.mkdir()
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True,
                           capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root with CAP_SYS_ADMIN): {detail}")

    def fill(self) -> None:
        # Unbuffered: a write that no longer fits whole writes what fits, the next one fails.
        with open(self.ballast, "ab", buffering=0) as f:
            while True:
                try:
                    f.write(b"\0" * (1 << 16))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    return

    def free(self) -> None:
        self.ballast.unlink()

    def leftovers(self) -> list[str]:
        """Staged (half-written) files anywhere on the disk."""
        return [str(p) for p in self.path.rglob(f"{TEMP_PREFIX}*")]

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = SmallDisk(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", size_mb=16)
    yield disk
    disk.unmount()


def test_a_render_on_a_filling_disk_keeps_whole_shards_and_resumes(small_disk, tmp_path):
    job = TrajectoryJob(total=60, shard_size=10, seed=2)
    store = open_store(small_disk.path)

    def fill_after_two_shards(done, total, info):
        if info["shards_done"] == 2:
            small_disk.fill()  # another writer takes the rest of the disk

    with pytest.raises(ResourceExhausted, match=r"2/6 shards are complete and kept.*--resume"):
        run_sharded(job, store, "ds", progress=fill_after_two_shards)
    records = sorted(p.name for p in (small_disk.path / "ds" / RECORDS_DIR).iterdir())
    assert records == ["00000.json", "00001.json", "run.json"]
    assert sorted(p.name for p in (small_disk.path / "ds" / "shards").iterdir()) == [
        "00000.labels.npy", "00000.videos.npy.zst", "00001.labels.npy", "00001.videos.npy.zst"]
    assert small_disk.leftovers() == [] and not store.is_published("ds")

    # Still full: a resume stops the same way, before writing anything.
    with pytest.raises(ResourceExhausted):
        run_sharded(job, store, "ds", resume=True)
    assert small_disk.leftovers() == []

    small_disk.free()
    run_sharded(job, store, "ds", resume=True)
    reference = open_store(tmp_path / "reference")
    run_sharded(TrajectoryJob(total=60, shard_size=10, seed=2), reference, "ds")
    assert store.verify("ds").files.keys() == reference.read_manifest("ds").files.keys()
    for rel, entry in reference.read_manifest("ds").files.items():
        if rel != "metadata.json":
            assert store.read_manifest("ds").files[rel] == entry


def test_a_checkpoint_on_a_filling_disk_stops_the_run_cleanly_and_resume_finishes(small_disk, home):
    cfg = parse_train_config({
        "experiment": "disk-full", "model": {"name": "mnist_ultralight"},
        "data": {"kind": "synthetic", "train_size": 256, "val_size": 64}, "epochs": 3, "batch_size": 64,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "num_threads": 1, "seed": 0,
    })
    store = open_store(small_disk.path)
    epochs_started = []

    def fill_before_epoch_two() -> bool:  # the engine asks before every epoch whether to stop
        epochs_started.append(len(epochs_started) + 1)
        if len(epochs_started) == 2:
            small_disk.fill()
        return False

    expected = r"epoch 2's checkpoint of run 'full' was not written \(no space left.*epoch-0001 is kept.*--run-id full"
    with pytest.raises(ResourceExhausted, match=expected):
        Engine(cfg, "full", store=store, tracking=False, stop_flag=fill_before_epoch_two).run()
    state = [e for e in read_events(home / "runs/full/events.jsonl") if e["type"] == "state"][-1]
    assert state["state"] == "FAILED" and "ResourceExhausted" in state["message"]
    # The complete checkpoint is kept and loads; the one that did not fit left nothing behind.
    assert ckpt.latest_checkpoint(store, "full") == ckpt.epoch_prefix("full", 1)
    assert ckpt.load_checkpoint(store, ckpt.epoch_prefix("full", 1)).epoch == 1
    assert store.list(ckpt.epoch_prefix("full", 2)) == [] and small_disk.leftovers() == []

    small_disk.free()
    result = Engine(cfg, "full", store=store, tracking=False).run()
    assert result.epochs_done == 3
    assert [e["epoch"] for e in read_events(home / "runs/full/events.jsonl")
            if e["type"] == "state" and e["state"] == "RUNNING"][-1] == 1  # resumed after epoch 1
    assert ckpt.latest_checkpoint(store, "full") == ckpt.epoch_prefix("full", 3)

