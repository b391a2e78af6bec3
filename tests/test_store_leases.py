"""One writer per output, across processes and replicas: the store's write leases on a local directory and on
a real S3 endpoint (SeaweedFS), and two real `trainyard render` processes aimed at one output."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.render.shards import run_sharded
from shared.storage import LeaseConflict, open_store
from shared.storage.lease import LEASE_NAME
from tests.test_render_shards import NoiseJob

ROOT = Path(__file__).resolve().parent.parent

# A process that takes the lease of argv[2] in the store argv[1], says so, and holds it for argv[3] seconds.
HOLDER = """
import sys, time
from shared.storage import open_store
with open_store(sys.argv[1]).lease(sys.argv[2], purpose="test holder"):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def start_holder(store_url: str, prefix: str, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, store_url, prefix, str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def lease_doc(store, prefix: str) -> dict:
    return json.loads(store._lease_read(f"{prefix}/{LEASE_NAME}")[0])


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_store_url")


def test_a_live_holder_in_another_process_keeps_the_prefix(store_url):
    holder = start_holder(store_url, "ds")
    try:
        store = open_store(store_url)
        with pytest.raises(LeaseConflict) as err:
            run_sharded(NoiseJob(total=10), store, "ds")
        message = str(err.value)
        assert f"is being written by test holder (pid {holder.pid} on host {socket.gethostname()}" in message
        # The advice names the CLI's real flags.
        assert "--out" in message and "--resume" in message
        assert store.list("ds") == []  # nothing of the refused writer's landed
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lease_is_taken_over(store_url):
    holder = start_holder(store_url, "ds")
    holder.send_signal(signal.SIGKILL)  # dies holding it: the lease object stays behind
    holder.wait()
    store = open_store(store_url)
    assert lease_doc(store, "ds")["pid"] == holder.pid
    manifest = run_sharded(NoiseJob(total=10), store, "ds")
    assert store.verify("ds").files == manifest.files
    assert store._lease_read(f"ds/{LEASE_NAME}") is None  # released after the publish


def test_a_recycled_pid_does_not_keep_a_lease(store_url):
    """The pid now belongs to another process (here: this one), which started at another time."""
    store = open_store(store_url)
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "started": 12345.0, "token": "x" * 32}
    store._lease_write(f"ds/{LEASE_NAME}", json.dumps(doc).encode(), None)
    run_sharded(NoiseJob(total=10), store, "ds")
    assert store.is_published("ds")


def test_one_writer_among_threads_of_one_process(tmp_path):
    store = open_store(tmp_path)
    held, release = threading.Event(), threading.Event()

    def hold():
        with store.lease("ds", purpose="first"):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(LeaseConflict, match=f"first \\(pid {os.getpid()}"):
            store.publish("ds", {"a.txt": b"a"})
    finally:
        release.set()
        thread.join()
    # The holder's own thread re-enters its lease: a render publishing its own prefix is one writer.
    with store.lease("ds"):
        store.publish("ds", {"a.txt": b"a"})
    assert store.list("ds") == ["ds/MANIFEST.json", "ds/a.txt"]  # the lease is never listed


def test_a_writer_that_lost_its_lease_does_not_publish(store_url):
    store = open_store(store_url)
    with pytest.raises(LeaseConflict, match="lost its write lease"), store.lease("ds") as lease:
        # Another writer takes the lease over (as after this one stalled past its expiry).
        store._lease_write(lease.key, b'{"purpose": "successor"}', lease.version)
        store.publish("ds", {"a.txt": b"a"})
    assert not store.is_published("ds") and not store.exists("ds/a.txt")
    assert json.loads(store._lease_read(f"ds/{LEASE_NAME}")[0]) == {"purpose": "successor"}


def test_s3_leases_expire_unless_renewed(s3_store_url):
    store = open_store(s3_store_url)
    key = f"ds/{LEASE_NAME}"
    # A holder on another host cannot be checked: its lease stands until it lapses...
    elsewhere = {"host": "replica-2", "pid": 7, "started": 1.0, "token": "t" * 32, "purpose": "render logos",
                 "acquired": "then", "expires": time.time() + 600}
    version = store._lease_write(key, json.dumps(elsewhere).encode(), None)
    with pytest.raises(LeaseConflict, match=r"render logos \(pid 7 on host replica-2.*lapses at"):
        store.publish("ds", {"a.txt": b"a"})
    # ...and once it has, it is taken over.
    store._lease_write(key, json.dumps({**elsewhere, "expires": time.time() - 1}).encode(), version)
    store.publish("ds", {"a.txt": b"a"})
    assert store.verify("ds").files.keys() == {"a.txt"}

    # A live holder renews its lease every ttl/3, so it never lapses under it.
    store.lease_ttl = 1.5
    with store.lease("renewed") as lease:
        first = lease_doc(store, "renewed")["expires"]
        time.sleep(2.5)
        assert lease_doc(store, "renewed")["expires"] > time.time() > first
        lease.ensure()


def _render_cli(kind: str, out: str, seed: int, count: int, env: dict) -> subprocess.Popen:
    extra = ["--shard-size", "8"] if kind == "trajectories" else []
    return subprocess.Popen([sys.executable, "-m", "cli", "render", kind, "--out", out, "--count", str(count),
                             "--seed", str(seed), "--workers", "1", "--no-progress", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def two_renders_of_one_output(kind: str, out: str, store, prefix: str, count: int, env: dict):
    """Render ``out`` from two CLI processes, the second started while the first holds the output (the first
    is paused there, so the overlap is certain): exactly one publishes, and its manifest matches every file."""
    first = _render_cli(kind, out, 1, count, env)
    try:
        deadline = time.monotonic() + 60
        while store._lease_read(f"{prefix}/{LEASE_NAME}") is None:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.01)
        os.killpg(first.pid, signal.SIGSTOP)
        second = _render_cli(kind, out, 2, count, env)
        _, err = second.communicate(timeout=60)
        os.killpg(first.pid, signal.SIGCONT)
        out_first, err_first = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 0 and out_first.startswith("published"), err_first[-2000:]
    assert second.returncode == 2
    assert f"being written by render {kind} (pid {first.pid} on host {socket.gethostname()}" in err
    assert "render to another --out" in err
    manifest = store.verify(prefix)
    assert manifest.meta["seed"] == 1
    assert store.list(prefix) == sorted([f"{prefix}/{rel}" for rel in manifest.files] + [f"{prefix}/MANIFEST.json"])


@pytest.mark.parametrize("kind,count", [("trajectories", 32), ("digits", 1000)])
def test_two_cli_renders_of_one_local_output(kind, count, tmp_path):
    env = {**os.environ, "TRAINYARD_HOME": str(tmp_path / "home")}
    two_renders_of_one_output(kind, str(tmp_path / "ds"), open_store(tmp_path), "ds", count, env)


def test_two_cli_renders_of_one_s3_output(s3_server, s3_store_url, tmp_path):
    env = {**os.environ, **s3_server.env(), "TRAINYARD_HOME": str(tmp_path / "home"), "TRAINYARD_STORE": s3_store_url}
    two_renders_of_one_output("trajectories", f"{s3_store_url}/datasets/traj", open_store(s3_store_url),
                              "datasets/traj", 32, env)
