"""The `local` backend: each run is a worker subprocess (or a torchrun group), with bounded concurrency.

What it knows survives the service: each run directory holds ``worker.json``, ``{"state": "queued"}`` from
the launch until the worker starts, then ``{"state": "started", "pid": ..., "started": ...}`` (the process's
start time, so a later process given the same pid is not taken for the worker). A restarted service queues
the queued runs again in their order and adopts the workers still running, which count toward
``max_concurrent`` as before. ``worker.pid`` holds the worker's process group for people and tests.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.train.events import read_events
from services.train.runs import BackendStatus, RunRecord
from shared.logs import get_logger
from shared.settings import load_settings
from shared.storage import open_store

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
# psutil derives start times from the boot time, which the kernel moves when the clock is stepped.
START_TIME_TOLERANCE_S = 1.0
ADOPTED_POLL_S = 1.0


def worker_command(record: RunRecord, run_dir: Path) -> list[str]:
    """The command that trains one run; with replicas > 1, torchrun starts one worker per replica (gloo on CPU)."""
    args = ["-m", "services.train.worker", "--run-id", record.run_id, "--config", str(run_dir / "config.yaml"),
            "--events", str(run_dir / "events.jsonl")]
    for item in record.overrides:
        args += ["--set", item]
    if record.replicas > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={record.replicas}", *args]
    return [sys.executable, *args]


def started_at(pid: int) -> float | None:
    """When process ``pid`` started, None when there is no such (live) process."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except psutil.Error:
        return None


@dataclass
class AdoptedWorker:
    """A worker an earlier service process started: not our child, so it is polled, never waited on."""

    pid: int
    started: float

    def alive(self) -> bool:
        now = started_at(self.pid)
        return now is not None and abs(now - self.started) < START_TIME_TOLERANCE_S


def _alive(proc: subprocess.Popen | AdoptedWorker) -> bool:
    return proc.alive() if isinstance(proc, AdoptedWorker) else proc.poll() is None


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "worker.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / "worker.json")


def _read_state(run_dir: Path) -> dict:
    try:
        state = json.loads((run_dir / "worker.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


class LocalBackend:
    name = "local"

    def __init__(self, max_concurrent: int = 1, cancel_grace_s: float = 10.0, env: dict[str, str] | None = None):
        self.max_concurrent = max_concurrent
        self.cancel_grace_s = cancel_grace_s
        self.env = env
        self._queue: collections.deque[tuple[RunRecord, Path]] = collections.deque()
        self._procs: dict[str, subprocess.Popen | AdoptedWorker] = {}
        self._lock = threading.Lock()

    def store(self):
        return open_store(settings=load_settings(self.env))  # the workers' environment names their store

    def launch(self, record: RunRecord, run_dir: Path) -> dict:
        with self._lock:
            (run_dir / "worker.pid").unlink(missing_ok=True)
            _write_state(run_dir, {"state": "queued"})
            self._queue.append((record, run_dir))
            self._schedule()
        return {"run_dir": str(run_dir)}

    def restore(self, runs: list[tuple[RunRecord, Path]]) -> None:
        """Adopt the workers an earlier service process left running (cancelled or not: they hold a slot until
        they exit) and queue its queued runs again, oldest submission first; then fill the free slots."""
        with self._lock:
            for record, run_dir in sorted(runs, key=lambda item: item[0].submitted):
                state = _read_state(run_dir)
                pid, started = state.get("pid"), state.get("started")
                if state.get("state") == "queued" and not record.cancelled:
                    self._queue.append((record, run_dir))
                    log.info("queued run restored", extra={"run_id": record.run_id})
                # pid > 1: signalling process group 0 would hit this service's own group.
                elif state.get("state") == "started" and isinstance(pid, int) and pid > 1 \
                        and isinstance(started, (int, float)):
                    worker = AdoptedWorker(pid, started)
                    if worker.alive():
                        self._procs[record.run_id] = worker
                        threading.Thread(target=self._reap_adopted, args=(worker,), daemon=True).start()
                        log.info("worker adopted", extra={"run_id": record.run_id, "pid": worker.pid})
            self._schedule()

    def _schedule(self) -> None:
        """Start queued runs while slots are free (called with the lock held)."""
        running = sum(1 for p in self._procs.values() if _alive(p))
        while self._queue and running < self.max_concurrent:
            record, run_dir = self._queue.popleft()
            log_file = open(run_dir / "worker.log", "ab")
            proc = subprocess.Popen(
                worker_command(record, run_dir), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=self._worker_env(record), start_new_session=True,
            )
            log_file.close()
            _write_state(run_dir, {"state": "started", "pid": proc.pid, "started": started_at(proc.pid)})
            (run_dir / "worker.pid").write_text(str(proc.pid))
            self._procs[record.run_id] = proc
            running += 1
            threading.Thread(target=self._reap, args=(proc,), daemon=True).start()
            log.info("worker started", extra={"run_id": record.run_id, "pid": proc.pid})

    def _worker_env(self, record: RunRecord) -> dict[str, str]:
        """The worker's environment: unless told otherwise, each process's torch threads are its share of the
        cores, so concurrent runs do not oversubscribe them: OpenMP barriers then wait on descheduled threads
        (the demo's MNIST runs, two at a time on 2 cores with 2 threads each, took 75-117 s per epoch of 2,000
        images). A config's num_threads still wins."""
        env = dict(self.env if self.env is not None else os.environ)
        cores = len(os.sched_getaffinity(0))
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // (self.max_concurrent * max(1, record.replicas)))))
        return env

    def _reap(self, proc: subprocess.Popen) -> None:
        proc.wait()
        with self._lock:
            self._schedule()

    def _reap_adopted(self, worker: AdoptedWorker) -> None:
        while worker.alive():
            time.sleep(ADOPTED_POLL_S)
        with self._lock:
            self._schedule()

    def status(self, record: RunRecord) -> BackendStatus:
        with self._lock:
            if any(r.run_id == record.run_id for r, _ in self._queue):
                return BackendStatus("pending")
            proc = self._procs.get(record.run_id)
        if proc is None:
            return BackendStatus("gone", message="worker is no longer running (server restarted?)")
        if _alive(proc):
            return BackendStatus("running")
        if isinstance(proc, AdoptedWorker):
            return BackendStatus("gone", message="worker is no longer running (started before the service "
                                                 "restarted, so its exit code is unknown)")
        return BackendStatus("exited", proc.returncode)

    def cancel(self, record: RunRecord) -> None:
        with self._lock:
            self._queue = collections.deque((r, d) for r, d in self._queue if r.run_id != record.run_id)
            proc = self._procs.get(record.run_id)
        if proc is None:
            return
        # The whole process group: torchrun's children too; SIGKILL after the grace period.
        for sig, grace in ((signal.SIGTERM, self.cancel_grace_s), (signal.SIGKILL, 10.0)):
            if not _alive(proc):
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + grace
            while _alive(proc) and time.monotonic() < deadline:
                time.sleep(0.1)

    def events(self, record: RunRecord, run_dir: Path) -> list[dict]:
        return read_events(run_dir / "events.jsonl")

    def wait(self, record: RunRecord, timeout_s: float) -> None:
        time.sleep(timeout_s)
