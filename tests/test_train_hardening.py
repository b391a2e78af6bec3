"""The train service against hostile and careless input and faults (issue 14): config documents bounded
before anything expands them, every config field within the range its proto and meaning allow, one bad record
never breaking everyone's answers, one launch per run id, resumes only with the config the checkpoints were
trained with, and queued runs and running workers surviving a kill -9 of the service."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest

from services.train.local_backend import LocalBackend, started_at
from services.train.runs import RunManager, RunRecord
from services.train.server import build_manager
from shared.grpc_client import channel
from shared.pb import train_pb2, train_pb2_grpc
from tests.harness import ManagedProcess, free_ports, tcp_probe
from tests.harness.services import served, train_registrar

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
experiment: hardening
model: {name: mnist_ultralight}
data: {kind: synthetic, train_size: 256, val_size: 64, test_size: 64, train_eval_size: 64}
epochs: 1
batch_size: 64
num_threads: 1
deterministic: true
"""


def alias_bomb(levels: int = 9) -> str:
    """About 400 bytes of YAML that stand for 9**levels strings once its aliases are expanded."""
    names = "abcdefghijklmnopq"[:levels]
    lines = [f"{names[0]}: &{names[0]} [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip(names, names[1:], strict=False):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _state(run) -> str:
    return train_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "TRAINYARD_HOME": str(tmp_path / "home"), "TRAINYARD_PROGRESS": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    for key in ("TRAINYARD_STORE", "TRAINYARD_PUSHGATEWAY"):
        env.pop(key, None)
    return env


def _kill_workers(home: Path) -> None:
    """The workers run in sessions of their own: stopping the service leaves them, so the test ends them."""
    for state_file in (home / "runs").glob("*/worker.json"):
        state = json.loads(state_file.read_text())
        worker_started = started_at(state.get("pid", 0))
        if state.get("state") == "started" and worker_started and abs(worker_started - state["started"]) < 1:
            os.killpg(state["pid"], signal.SIGKILL)


class TrainService:
    """``python -m services.train`` as a real process on free ports, restartable over the same home."""

    def __init__(self, tmp_path: Path, max_concurrent: int):
        self.tmp_path, self.max_concurrent = tmp_path, max_concurrent
        self.home = tmp_path / "home"
        self.process: ManagedProcess | None = None
        self.stub = None

    def start(self) -> TrainService:
        port, metrics_port = free_ports(2)
        self.process = ManagedProcess(
            "train", [sys.executable, "-m", "services.train", "--port", port, "--metrics-port", metrics_port,
                      "--max-concurrent", self.max_concurrent],
            self.tmp_path / "train.log", tcp_probe(port), env=_env(self.tmp_path), cwd=ROOT, ready_timeout=60)
        self.process.start()
        self.stub = train_pb2_grpc.TrainServiceStub(channel(f"127.0.0.1:{port}"))
        return self

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024

    def kill9(self) -> None:
        """SIGKILL the service process alone, as the kernel or an operator would: its workers live on."""
        proc = self.process.proc
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.process.proc = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        _kill_workers(self.home)


@pytest.fixture
def service(tmp_path):
    started: list[TrainService] = []

    def make(max_concurrent: int = 1) -> TrainService:
        svc = TrainService(tmp_path, max_concurrent)
        started.append(svc)
        return svc.start()

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """The servicer on a real gRPC server in this process; ``max_concurrent=0`` keeps every run queued."""
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    with contextlib.ExitStack() as hosts:
        def make(max_concurrent: int = 0):
            register = train_registrar(build_manager(max_concurrent=max_concurrent))
            address = hosts.enter_context(served("train", register, grace=1))
            return train_pb2_grpc.TrainServiceStub(channel(address))

        yield make
    _kill_workers(tmp_path / "home")


def wait_state(stub, run_id: str, want: set[str], timeout: float = 180) -> train_pb2.Run:
    deadline = time.monotonic() + timeout
    while True:
        run = stub.GetRun(train_pb2.GetRunRequest(run_id=run_id), timeout=30)
        if _state(run) in want:
            return run
        assert time.monotonic() < deadline, f"{run_id} stayed {_state(run)}: {run.message}"
        time.sleep(0.2)


def submit_once_settled(stub, request: train_pb2.SubmitRunRequest, timeout: float = 60) -> train_pb2.Run:
    """SubmitRun, retried while the run's last worker, which has reported how it ended, is still exiting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return stub.SubmitRun(request, timeout=30)
        except grpc.RpcError as exc:
            if "worker has not exited yet" not in exc.details() or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


# ---------------------------------------------------------------- item 2: config documents are bounded

def test_yaml_alias_bomb_is_refused_at_once_with_bounded_memory(service):
    svc = service()
    peak_before = svc.peak_rss_mb()
    for request in (train_pb2.SubmitRunRequest(config_yaml=alias_bomb()),
                    train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=[f"tags={alias_bomb()}"])):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            svc.stub.SubmitRun(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "aliases are expanded" in info.value.details()
        assert time.monotonic() - started < 2
    assert svc.peak_rss_mb() - peak_before < 50
    # A recursive alias and an over-long document are refused as well, and the service still answers.
    for text, why in (("a: &a [*a]\n", "refers to a collection that contains it"),
                      ("experiment: x\n" + "#" * 300_000 + "\n", "longer than 256 KiB")):
        with pytest.raises(grpc.RpcError) as info:
            svc.stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=text), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in info.value.details()
    assert svc.stub.ListRuns(train_pb2.ListRunsRequest(), timeout=10).runs == []


# ---------------------------------------------------------------- item 11: fields in range, bad records isolated

@pytest.mark.parametrize("overrides, replicas, field", [
    (["epochs=1000000000000"], 1, "epochs"),
    (["optimizer.lr=.nan"], 1, "optimizer.lr"),
    (["optimizer.lr=.inf"], 1, "optimizer.lr"),
    (["optimizer.lr=1000"], 1, "optimizer.lr"),
    (["batch_size=100000000"], 1, "batch_size"),
    (["data.image_size=1000000"], 1, "data.image_size"),
    (["data.subset=1000000000000"], 1, "data.subset"),
    (["data.train_size=1000000000"], 1, "data.train_size"),
    (["data.workers=1000"], 1, "data.workers"),
    (["num_threads=100000"], 1, "num_threads"),
    (["seed=-1"], 1, "seed"),
    (["benchmark.batch_sizes=[1, 10000000]"], 1, "benchmark.batch_sizes"),
    (["batch_size=1024"], 512, "replicas"),
])
def test_out_of_range_fields_are_invalid_argument(in_process, overrides, replicas, field):
    stub = in_process()
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=overrides, replicas=replicas),
                       timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def test_one_bad_record_never_breaks_the_answers_for_everyone(in_process, tmp_path):
    stub = in_process()
    good = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG), timeout=30)
    runs = tmp_path / "home" / "runs"
    # A run recorded before its fields were bounded (epochs does not fit the proto's int32), and a torn record.
    record = json.loads((runs / good.run_id / "run.json").read_text())
    (runs / "huge-epochs").mkdir()
    (runs / "huge-epochs" / "run.json").write_text(json.dumps({**record, "run_id": "huge-epochs",
                                                               "epochs": 10**12, "cancelled": True}))
    (runs / "torn").mkdir()
    (runs / "torn" / "run.json").write_text('{"run_id": "torn", "backe')

    listed = {r.run_id: r for r in stub.ListRuns(train_pb2.ListRunsRequest(), timeout=30).runs}
    assert set(listed) == {good.run_id, "huge-epochs", "torn"}
    assert _state(listed[good.run_id]) == "QUEUED" and listed[good.run_id].epochs == 1
    assert _state(listed["huge-epochs"]) == "UNSPECIFIED"
    assert "cannot be reported" in listed["huge-epochs"].message and "out of range" in listed["huge-epochs"].message
    assert _state(listed["torn"]) == "UNSPECIFIED" and "unreadable" in listed["torn"].message

    assert "cannot be reported" in stub.GetRun(train_pb2.GetRunRequest(run_id="huge-epochs"), timeout=30).message
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRun(train_pb2.GetRunRequest(run_id="torn"), timeout=30)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS and "unreadable" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelRun(train_pb2.CancelRunRequest(run_id="huge-epochs"), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _state(stub.CancelRun(train_pb2.CancelRunRequest(run_id=good.run_id), timeout=30)) == "CANCELLED"


# ---------------------------------------------------------------- item 10: one launch per run id, same config

def test_a_queued_run_cannot_be_launched_again(in_process):
    stub = in_process()
    run = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, run_id="twice"), timeout=30)
    assert _state(run) == "QUEUED"
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, run_id="twice"), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "one launch at a time" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, run_id="nothing-here", fork=True), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_resubmission_is_one_launch_with_the_trained_config_or_an_explicit_fork(in_process, tmp_path):
    stub = in_process(max_concurrent=1)
    events = tmp_path / "home" / "runs" / "resub" / "events.jsonl"
    stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, run_id="resub"), timeout=30)
    done = wait_state(stub, "resub", {"SUCCEEDED", "FAILED"})
    assert _state(done) == "SUCCEEDED", done.message
    first_model = done.model_uri

    # Another config would continue the epoch-1 weights under other settings (and export them as its model).
    with pytest.raises(grpc.RpcError) as info:
        submit_once_settled(stub, train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=["epochs=3"],
                                                             run_id="resub"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another config" in info.value.details() and "fork" in info.value.details()
    # A worker started by hand (or a Job applied by hand) with another config refuses to resume as well.
    changed = tmp_path / "changed.yaml"
    changed.write_text(CONFIG.replace("epochs: 1", "epochs: 3"))
    by_hand = subprocess.run([sys.executable, "-m", "services.train.worker", "--run-id", "resub", "--config",
                              str(changed), "--no-tracking"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                             text=True, timeout=120)
    assert by_hand.returncode == 2 and "another config" in by_hand.stderr, by_hand.stderr[-2000:]

    # The same config resumes; while that launch settles the run is not reported as its old SUCCEEDED, and a
    # second launch of it is refused.
    resumed = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, run_id="resub"), timeout=30)
    assert _state(resumed) in ("QUEUED", "RUNNING")
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, run_id="resub"), timeout=30)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert _state(stub.GetRun(train_pb2.GetRunRequest(run_id="resub"), timeout=30)) in ("QUEUED", "RUNNING")
    again = wait_state(stub, "resub", {"SUCCEEDED", "FAILED"})
    assert _state(again) == "SUCCEEDED", again.message
    states = [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "state"]
    assert [(s["state"], s["message"]) for s in states] == [("RUNNING", "started"), ("SUCCEEDED", ""),
                                                             ("RUNNING", "resumed"), ("SUCCEEDED", "")]
    assert again.model_uri == first_model and again.epochs == 1

    # Forking starts a new run from scratch under a new id; the old one is left as it is.
    fork = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=["epochs=3"], run_id="resub",
                                                     fork=True), timeout=30)
    assert fork.run_id.startswith("resub-fork-") and fork.forked_from == "resub" and fork.epochs == 3
    fork_events = tmp_path / "home" / "runs" / fork.run_id / "events.jsonl"
    first = wait_for(lambda: fork_events.exists() and fork_events.read_text().splitlines(), 120, "the fork starting")
    assert json.loads(first[0])["message"] == "started"
    assert _state(stub.CancelRun(train_pb2.CancelRunRequest(run_id=fork.run_id), timeout=60)) == "CANCELLED"
    assert _state(stub.GetRun(train_pb2.GetRunRequest(run_id="resub"), timeout=30)) == "SUCCEEDED"


# ---------------------------------------------------------------- item 9: kill -9 loses nothing

def _worker_state(home: Path, run_id: str) -> dict:
    """What the local backend keeps on disk about a run's worker (queued, or started with its pid)."""
    path = home / "runs" / run_id / "worker.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _leave_behind(root: Path, run_id: str, worker: dict) -> None:
    """A run directory as an earlier service process left it: its record and its worker's state."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    record = RunRecord(run_id=run_id, backend="local", config_yaml=CONFIG, overrides=[], replicas=1,
                       experiment="hardening", model="mnist_ultralight", epochs=1, created=time.time(),
                       submitted=time.time(), handle={"run_dir": str(run_dir)})
    (run_dir / "run.json").write_text(json.dumps(asdict(record)))
    (run_dir / "worker.json").write_text(json.dumps(worker))


def test_restart_adopts_a_live_worker_by_identity_and_not_a_recycled_pid(tmp_path):
    root = tmp_path / "runs"
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        _leave_behind(root, "live", {"state": "started", "pid": sleeper.pid, "started": started_at(sleeper.pid)})
        # This pid runs, but it is another process than the one that was started (it began an hour later).
        _leave_behind(root, "recycled", {"state": "started", "pid": os.getpid(),
                                         "started": started_at(os.getpid()) - 3600})
        _leave_behind(root, "waiting", {"state": "queued"})
        manager = RunManager({"local": LocalBackend(max_concurrent=1)}, default_backend="local", root=root)
        assert manager.get("live").state == "RUNNING"
        recycled = manager.get("recycled")
        assert recycled.state == "FAILED" and "no longer running" in recycled.message
        # The adopted worker holds the only slot: the queued run waits for it.
        time.sleep(0.5)
        assert manager.get("waiting").state == "QUEUED" and _worker_state(tmp_path, "waiting")["state"] == "queued"
        assert manager.cancel("waiting").state == "CANCELLED"
        assert manager.cancel("live").state == "CANCELLED"
        assert sleeper.wait(10) == -signal.SIGTERM
    finally:
        sleeper.kill()


@pytest.mark.slow
def test_kill9_of_the_service_loses_no_queued_run_and_adopts_the_running_worker(service):
    svc = service(max_concurrent=1)
    long = ["epochs=1000"]
    for run_id in ("orphan", "second", "third"):
        svc.stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=long, run_id=run_id), timeout=30)
    wait_state(svc.stub, "orphan", {"RUNNING"})
    orphan = _worker_state(svc.home, "orphan")["pid"]

    svc.kill9()
    assert started_at(orphan) is not None, "the worker died with the service"
    svc.start()
    assert _state(svc.stub.GetRun(train_pb2.GetRunRequest(run_id="orphan"), timeout=30)) == "RUNNING"
    for run_id in ("second", "third"):
        run = svc.stub.GetRun(train_pb2.GetRunRequest(run_id=run_id), timeout=30)
        assert _state(run) == "QUEUED", run.message
    # max_concurrent=1 holds across the restart: nothing starts beside the adopted worker.
    time.sleep(3)
    assert [_worker_state(svc.home, r)["state"] for r in ("second", "third")] == ["queued", "queued"]

    assert _state(svc.stub.CancelRun(train_pb2.CancelRunRequest(run_id="orphan"), timeout=60)) == "CANCELLED"
    wait_for(lambda: started_at(orphan) is None, 30, "the adopted worker to end")
    # The queued runs keep their order: the second one starts in the freed slot, the third still waits.
    wait_state(svc.stub, "second", {"RUNNING"}, timeout=60)
    assert _worker_state(svc.home, "second")["state"] == "started"
    assert _state(svc.stub.GetRun(train_pb2.GetRunRequest(run_id="third"), timeout=30)) == "QUEUED"
    for run_id in ("second", "third"):
        assert _state(svc.stub.CancelRun(train_pb2.CancelRunRequest(run_id=run_id), timeout=60)) == "CANCELLED"
