"""The `local` backend: each run is a worker subprocess (or a torchrun group), with bounded concurrency."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.train.events import read_events
from services.train.runs import BackendStatus, RunRecord
from shared.logs import get_logger
from shared.parallel import process_alive

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


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


class LocalBackend:
    name = "local"

    def __init__(self, max_concurrent: int = 1, cancel_grace_s: float = 10.0, env: dict[str, str] | None = None):
        self.max_concurrent = max_concurrent
        self.cancel_grace_s = cancel_grace_s
        self.env = env
        self._queue: collections.deque[tuple[RunRecord, Path]] = collections.deque()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def launch(self, record: RunRecord, run_dir: Path) -> dict:
        with self._lock:
            (run_dir / "worker.pid").unlink(missing_ok=True)
            self._queue.append((record, run_dir))
            self._schedule()
        return {"run_dir": str(run_dir)}

    def _schedule(self) -> None:
        """Start queued runs while slots are free (called with the lock held)."""
        running = sum(1 for p in self._procs.values() if p.poll() is None)
        while self._queue and running < self.max_concurrent:
            record, run_dir = self._queue.popleft()
            log_file = open(run_dir / "worker.log", "ab")
            proc = subprocess.Popen(
                worker_command(record, run_dir), stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=self._worker_env(record), start_new_session=True,
            )
            log_file.close()
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

    def status(self, record: RunRecord) -> BackendStatus:
        with self._lock:
            if any(r.run_id == record.run_id for r, _ in self._queue):
                return BackendStatus("pending")
            proc = self._procs.get(record.run_id)
        if proc is not None:
            code = proc.poll()
            return BackendStatus("running") if code is None else BackendStatus("exited", code)
        # A run started by an earlier server process: all we have is its PID file.
        if process_alive(_pid_from_file(record)):
            return BackendStatus("running")
        return BackendStatus("gone", message="worker is no longer running (server restarted?)")

    def cancel(self, record: RunRecord) -> None:
        with self._lock:
            self._queue = collections.deque((r, d) for r, d in self._queue if r.run_id != record.run_id)
            proc = self._procs.get(record.run_id)
        if proc is not None:
            if proc.poll() is not None:
                return
            # The whole process group: torchrun's children too.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(self.cancel_grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return
        # Started by an earlier server process: its PID file leads to the process group.
        pid = _pid_from_file(record)
        if process_alive(pid):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.cancel_grace_s
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if process_alive(pid):
                os.killpg(pid, signal.SIGKILL)

    def events(self, record: RunRecord, run_dir: Path) -> list[dict]:
        return read_events(run_dir / "events.jsonl")

    def wait(self, record: RunRecord, timeout_s: float) -> None:
        time.sleep(timeout_s)


def _pid_from_file(record: RunRecord) -> int:
    pid_file = Path(record.handle.get("run_dir", "/nonexistent")) / "worker.pid"
    try:
        return int(pid_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
