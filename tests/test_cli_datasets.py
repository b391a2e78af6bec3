"""`trainyard render` and `trainyard convert` as a user runs them: real subprocesses, exit codes, the
published datasets read back, a render killed with SIGKILL and finished with --resume, and a render
through a running RenderService."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.render.server import RenderServiceServicer
from shared.grpc_server import start
from shared.pb import render_pb2, render_pb2_grpc
from shared.storage import open_location

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINYARD_", "AWS_"))}
    return {**env, "TRAINYARD_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}


def cli(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def verified_manifest(location: str):
    store, prefix = open_location(location)
    manifest = store.read_manifest(prefix)
    for rel in manifest.files:
        store.get_verified(prefix, rel)
    return manifest


def idx_shape(data: bytes) -> tuple[int, ...]:
    """The dimensions in an IDX header (MNIST's format: 0, 0, dtype, ndim, then ndim big-endian int32)."""
    assert data[:2] == b"\0\0" and data[2] == 0x08  # unsigned bytes
    return struct.unpack(f">{data[3]}i", data[4:4 + 4 * data[3]])


def test_render_digits_publishes_idx_files(env, tmp_path):
    out = tmp_path / "digits"
    run = cli(env, "render", "digits", "--out", str(out), "--count", "40", "--test-count", "8", "--workers", "1",
              "--no-progress")
    assert run.returncode == 0, run.stderr
    assert f"published {out}" in run.stdout and "48 items, 0 failed" in run.stdout
    manifest = verified_manifest(str(out))
    shapes = {rel: idx_shape((out / rel).read_bytes()) for rel in manifest.files}
    assert shapes == {"train-images-idx3-ubyte": (40, 28, 28), "train-labels-idx1-ubyte": (40,),
                      "t10k-images-idx3-ubyte": (8, 28, 28), "t10k-labels-idx1-ubyte": (8,)}

    again = cli(env, "render", "digits", "--out", str(out), "--count", "40", "--no-progress")
    assert again.returncode == 2
    assert "already published" in again.stderr


def test_render_cad_convert_and_validate_exit_codes(env, tmp_path):
    synth, cad, llava = tmp_path / "synth", tmp_path / "cad", tmp_path / "llava"
    steps = [
        ["render", "cad-synth", "--out", str(synth), "--count", "6", "--seed", "2", "--workers", "1", "--no-progress"],
        # cad and tinyllava read the models straight from cad-synth's published dataset
        ["render", "cad", "--input", str(synth), "--out", str(cad), "--image-size", "48", "--workers", "1",
         "--no-progress"],
        ["convert", "tinyllava", "--cad-json", str(synth), "--images", str(cad), "--out", str(llava)],
    ]
    runs = []
    for step in steps:
        runs.append(cli(env, *step))
        assert runs[-1].returncode == 0, (step, runs[-1].stderr)
    assert "6 items, 0 failed" in runs[1].stdout
    assert "6 models, 18 records" in runs[2].stdout
    good = cli(env, "convert", "validate", str(llava))
    assert good.returncode == 0, good.stdout + good.stderr
    assert f"{llava}: OK" in good.stdout and "records: 18" in good.stdout

    victim = sorted((cad / "images").glob("*.png"))[0]
    victim.unlink()
    bad = cli(env, "convert", "validate", str(llava))
    assert bad.returncode == 1
    assert "1 problem(s)" in bad.stdout and f"image {victim.name} is missing" in bad.stdout

    missing = cli(env, "render", "cad", "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c3"),
                  "--no-progress")
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def _files_with_identity(root: Path, rels) -> dict[str, tuple[int, int]]:
    return {rel: ((root / rel).stat().st_ino, (root / rel).stat().st_mtime_ns) for rel in rels}


def test_resume_after_sigkill_keeps_finished_shards_and_publishes(env, tmp_path):
    out = tmp_path / "traj"
    args = ["render", "trajectories", "--out", str(out), "--count", "400", "--shard-size", "10", "--seed", "9",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--workers", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not list((out / "_shards").glob("0*.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard record appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "MANIFEST.json").exists(), "the render finished before it was killed"

    # What the killed run finished: each shard record names its files, written before the record.
    kept = {}
    for record_path in sorted((out / "_shards").glob("0*.json")):
        kept.update(_files_with_identity(out, json.loads(record_path.read_text())["files"]))
    assert kept

    refused = cli(env, *args, "--workers", "1")
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = cli(env, *args, "--workers", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "400 items, 0 failed" in resumed.stdout
    manifest = verified_manifest(str(out))
    assert manifest.meta["num_samples"] == 400 and manifest.meta["num_shards"] == 40
    assert sum(manifest.meta["class_distribution"].values()) == 400
    assert len([f for f in manifest.files if f.startswith("shards/")]) == 80
    assert not (out / "_shards").exists()
    # The shards finished before the kill were kept, not rendered again.
    assert _files_with_identity(out, kept) == kept


@pytest.fixture
def render_server():
    def register(srv):
        render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServiceServicer(default_workers=1), srv)
        return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]

    host = start("render", register, port=0)
    yield f"127.0.0.1:{host.port}"
    host.stop(grace=5)


def test_render_through_the_service(env, tmp_path, render_server):
    out = tmp_path / "logos"
    # --workers 1: this server lives in the test process, and a worker pool forked from a process that
    # runs gRPC threads can deadlock (services.render.shards.pool_context forks unless torch is loaded).
    args = ["render", "logos", "--out", str(out), "--count", "8", "--image-size", "32", "--val-per-class", "1",
            "--workers", "1", "--server", render_server, "--no-progress"]
    run = cli(env, *args)
    assert run.returncode == 0, run.stderr
    assert f"published {out}: 12 items, 0 failed" in run.stdout
    manifest = verified_manifest(str(out))
    assert manifest.meta["kind"] == "logos" and len([f for f in manifest.files if f.endswith(".png")]) == 12

    again = cli(env, *args)
    assert again.returncode == 2
    assert "ALREADY_EXISTS" in again.stderr and "already published" in again.stderr

    # A test split: train and val stay byte for byte what they were.
    with_test = tmp_path / "logos-test"
    run = cli(env, *args[:2], "--out", str(with_test), *args[4:], "--test-per-class", "2")
    assert run.returncode == 0, run.stderr
    tested = verified_manifest(str(with_test))
    pngs = sorted(f for f in tested.files if f.endswith(".png"))
    assert [p.split("/")[0] for p in pngs].count("test") == 8 and len(pngs) == 20
    assert all(tested.files[p].sha256 == manifest.files[p].sha256 for p in manifest.files if p.endswith(".png"))


def test_render_limits_and_failure_budget_set_the_exit_code(env, tmp_path):
    huge = cli(env, "render", "digits", "--out", str(tmp_path / "d"), "--count", str(10**12), "--no-progress")
    assert huge.returncode == 2 and "between 0 and 1,000,000" in huge.stderr
    assert "at most" in cli(env, "render", "--help").stdout + cli(env, "render", "digits", "--help").stdout

    synth, models, cad = tmp_path / "synth", tmp_path / "models", tmp_path / "cad"
    assert cli(env, "render", "cad-synth", "--out", str(synth), "--count", "3", "--workers", "1",
               "--no-progress").returncode == 0
    models.mkdir()
    for src in sorted((synth / "json").glob("*.json")):
        (models / src.name).write_bytes(src.read_bytes())
    (models / "broken.json").write_text("{}")
    args = ["render", "cad", "--input", str(models), "--out", str(cad), "--image-size", "32", "--workers", "1",
            "--no-progress"]
    refused = cli(env, *args)  # 1 of 4 failed: more than the default 10 %
    assert refused.returncode == 2, refused.stdout
    assert "1 of 4 items" in refused.stderr and "--max-failures" in refused.stderr
    assert not (cad / "MANIFEST.json").exists()
    accepted = cli(env, *args, "--max-failures", "25%", "--resume")
    assert accepted.returncode == 0, accepted.stderr
    assert "4 items, 1 failed" in accepted.stdout and "failed broken" in accepted.stdout
