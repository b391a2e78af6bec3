"""Trajectory videos: tensors and labels read back through the streaming reader, the motion laws,
the camera parameters, determinism, kill -9 + resume, and a disk that fills up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.convert.indexes import publish_index, trajectory_from_store
from services.render.shards import RECORDS_DIR, run_sharded
from services.render.trajectories import CLASSES, TrajectoryJob, camera_rig
from shared.data.trajectories import TrajectoryShards, split_shards
from shared.errors import IntegrityError, ResourceExhausted
from shared.storage import open_store
from tests.harness.stores import FullDisk

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 samples in 4 shards, rendered once for the read-back tests."""
    store = open_store(tmp_path_factory.mktemp("traj"))
    run_sharded(TrajectoryJob(total=40, shard_size=10, seed=7), store, "ds", workers=2)
    return store


def all_samples(store, prefix="ds"):
    return list(TrajectoryShards(store, prefix))


def test_shapes_labels_and_balance(small):
    samples = all_samples(small)
    assert len(samples) == 40
    video = samples[0]["video"]
    assert video.shape == (4, 32, 3, 64, 64) and video.dtype == torch.uint8
    assert [int(s["index"]) for s in samples] == list(range(40))
    labels = [int(s["label"]) for s in samples]
    assert set(labels) == {0, 1, 2, 3} and all(labels.count(c) == 10 for c in range(4))
    assert samples[0]["future_position"].dtype == torch.float32
    meta = small.read_manifest("ds").meta
    assert meta["class_distribution"] == dict.fromkeys(CLASSES, 10)
    assert meta["sample_shape"] == [4, 32, 3, 64, 64] and meta["num_samples"] == 40
    # Every frame shows something: a ball over a grid, not an empty or saturated image.
    frames = torch.stack([s["video"] for s in samples]).float()
    assert 5 < frames.mean() < 60 and frames.amax() > 150


def test_index_and_loader(small):
    index = trajectory_from_store(small, "ds")
    assert index["num_samples"] == 40 and len(index["shards"]) == 4
    assert index["shards"][0]["class_counts"] == {name: 10 // 4 + (i < 10 % 4) for i, name in enumerate(CLASSES)}
    publish_index(small, "indexes/ds", index)
    assert small.is_published("indexes/ds")
    train, val = split_shards(index, 0.25)
    assert train == [0, 1, 2] and val == [3]
    ds = TrajectoryShards(small.url, "ds", shards=train, shuffle=True, shuffle_buffer=8, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2)
    seen = torch.cat([batch["index"] for batch in loader])
    assert sorted(seen.tolist()) == list(range(30)) and seen.tolist() != list(range(30))


def test_future_position_follows_the_motion_law(small):
    labels = np.concatenate([np.load(small.open_read(f"ds/shards/{i:05d}.labels.npy")) for i in range(4)])
    k = np.arange(32.0)
    for row in labels:
        p, future = row["positions"].astype(np.float64), row["future_position"].astype(np.float64)
        name = CLASSES[row["class_label"]]
        if name == "Linear":
            expected = p[31] + 5 * (p[31] - p[30])
        elif name == "Parabolic":
            expected = np.array([np.polyval(np.polyfit(k, p[:, a], 2), 36.0) for a in range(3)])
            assert np.polyfit(k, p[:, 2], 2)[0] < 0  # gravity pulls down
        else:
            # Uniform rotation (plus linear climb for the helix): every coordinate is a mix of
            # 1, k, cos(wk), sin(wk), so it obeys a fixed 4-term linear recurrence; fit it on the
            # 32 frames and roll it 5 frames forward.
            A = np.concatenate([np.stack([p[j:j + 28, a] for j in range(4)] + [np.ones(28)], 1) for a in range(3)])
            b = np.concatenate([p[4:, a] for a in range(3)])
            coef = np.linalg.lstsq(A, b, rcond=None)[0]
            seq = list(p)
            for _ in range(5):
                seq.append(np.array(seq[-4:]).T @ coef[:4] + coef[4])
            expected = seq[-1]
            steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
            assert steps.std() < 1e-3 * steps.mean()  # uniform speed
            if name == "Circular":
                assert np.linalg.svd(p - p.mean(0), compute_uv=False)[2] < 1e-4  # in one plane
            else:
                assert np.diff(p[:, 2]).std() < 1e-5 and abs(p[31, 2] - p[0, 2]) > 0.5  # steady climb
        np.testing.assert_allclose(future, expected, atol=2e-3, err_msg=name)


def test_camera_parameters_project_the_ball_where_it_is_drawn(small):
    sample = all_samples(small)[5]
    labels = np.load(small.open_read("ds/shards/00000.labels.npy"))[5]
    background = camera_rig(7)["background"]
    for cam in range(4):
        K, Rt = labels["intrinsics"][cam], labels["extrinsics"][cam]
        for frame in (0, 15, 31):
            x = K @ (Rt[:, :3] @ labels["positions"][frame] + Rt[:, 3])
            u, v = x[0] / x[2], x[1] / x[2]
            diff = np.abs(sample["video"][cam, frame].numpy().astype(int) - background[cam, 0]).sum(0)
            ys, xs = np.nonzero(diff > 30)
            assert len(ys) > 3
            assert abs(xs.mean() + 0.5 - u) < 1.5 and abs(ys.mean() + 0.5 - v) < 1.5


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = (TrajectoryJob(total=6, seed=s).render_shard(0, 0, 6) for s in (3, 3, 4))
    assert a == b and a != c
    # Shard boundaries do not matter: items 3..5 rendered alone equal the tail of the full shard.
    tail = TrajectoryJob(total=6, seed=3).render_items(3, 6)[0]
    full = TrajectoryJob(total=6, seed=3).render_items(0, 6)[0]
    assert np.array_equal(tail, full[3:])


def test_corrupted_shard_is_detected_while_streaming(tmp_path):
    store = open_store(tmp_path)
    run_sharded(TrajectoryJob(total=8, shard_size=8), store, "ds")
    path = tmp_path / "ds/shards/00000.videos.npy.zst"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        all_samples(store)


def _dataset(store, prefix):
    manifest = store.read_manifest(prefix)
    return manifest.files, {rel: store.get_bytes(f"{prefix}/{rel}") for rel in manifest.files
                            if rel != "metadata.json"}


def test_kill_dash_nine_then_resume_equals_uninterrupted_run(tmp_path):
    cmd = [sys.executable, "-m", "cli", "render", "trajectories", "--out", str(tmp_path / "killed" / "ds"),
           "--count", "256", "--shard-size", "16", "--seed", "11", "--no-progress"]
    proc = subprocess.Popen([*cmd, "--workers", "1"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    records = tmp_path / "killed/ds" / RECORDS_DIR
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and len(list(records.glob("0*.json"))) < 3:
            assert proc.poll() is None, "render finished or failed before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    store = open_store(tmp_path / "killed")
    assert not store.is_published("ds")
    complete = len(list(records.glob("0*.json")))
    assert 3 <= complete < 16

    resumed = subprocess.run([*cmd, "--resume", "--workers", "2"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = open_store(tmp_path / "reference")
    run_sharded(TrajectoryJob(total=256, shard_size=16, seed=11), reference, "ds", workers=2)
    files_a, bytes_a = _dataset(store, "ds")
    files_b, bytes_b = _dataset(reference, "ds")
    assert {k: v for k, v in files_a.items() if k != "metadata.json"} == \
        {k: v for k, v in files_b.items() if k != "metadata.json"}
    assert bytes_a == bytes_b and len(bytes_a) == 32


def test_disk_full_stops_cleanly_and_resume_finishes(tmp_path):
    job = TrajectoryJob(total=60, shard_size=10, seed=2)
    shard_bytes = sum(len(b) for b in job.render_shard(0, 0, 10).values())
    full = FullDisk(tmp_path, budget=int(shard_bytes * 2.5))
    with pytest.raises(ResourceExhausted, match=r"2/6 shards are complete and kept.*--resume"):
        run_sharded(job, full, "ds")
    store = open_store(tmp_path)
    assert sorted(p.name for p in (tmp_path / "ds" / RECORDS_DIR).iterdir()) == ["00000.json", "00001.json", "run.json"]
    assert not (tmp_path / "ds/shards/00002.videos.npy.zst").exists()  # the partial shard was dropped
    run_sharded(job, store, "ds", resume=True)
    samples = all_samples(store)
    assert [int(s["index"]) for s in samples] == list(range(60))
    reference = TrajectoryJob(total=60, shard_size=10, seed=2).render_shard(0, 0, 10)
    assert all(store.get_bytes(f"ds/{rel}") == data for rel, data in reference.items())


def test_render_and_stream_through_s3(s3_store_url):
    store = open_store(s3_store_url)
    run_sharded(TrajectoryJob(total=8, shard_size=4, seed=1), store, "traj", workers=2)
    samples = list(TrajectoryShards(s3_store_url, "traj"))
    local = TrajectoryJob(total=8, shard_size=4, seed=1).render_items(0, 8)[0]
    assert np.array_equal(torch.stack([s["video"] for s in samples]).numpy(), local)
    assert not store.list(f"traj/{RECORDS_DIR}")
