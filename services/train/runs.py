"""The run registry behind TrainService: submit, inspect, follow and cancel training runs.

A run's record (`run.json`: config, backend, replicas, timestamps) lives in
``$TRAINYARD_HOME/runs/<run_id>/``; its live state is derived, never stored twice: the worker's
events (``events.jsonl``, see ``events.py``) say what training did, and the backend says whether
the process or Job is still alive. A worker that died without writing a final state is FAILED.

A run id has one launch at a time: it is resubmitted (resumed from its newest checkpoint) only once its
previous launch has ended and its worker is gone, and only with the config its checkpoints were trained
with; ``fork`` starts a new run, under a new id, from scratch instead.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from services.train.config import parse_train_config
from shared.config import config_hash, load_yaml
from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from shared.logs import get_logger
from shared.names import slug, validate_run_id
from shared.settings import load_settings

log = get_logger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
MAX_REPLICAS = 256


@dataclass
class RunRecord:
    run_id: str
    backend: str
    config_yaml: str
    overrides: list[str]
    replicas: int
    experiment: str
    model: str
    epochs: int
    created: float
    submitted: float = 0.0
    cancelled: bool = False
    # Backend-specific handle: a PID for local runs, a Job name for Kubernetes ones.
    handle: dict = field(default_factory=dict)
    # Labels the backend puts on what it launches (a study's trials carry their study and trial ids).
    labels: dict[str, str] = field(default_factory=dict)
    # Events the run had before its current launch: only later state events tell how this launch went (an
    # earlier launch's SUCCEEDED must not make a relaunched run that has not started yet look finished).
    launch_events: int = 0
    # The run this one was forked from (SubmitRun with fork): a new run, started from scratch.
    forked_from: str = ""
    # The split selection sees ("val", or "test" when the config selects on the test split), shown wherever the
    # run is listed; "" in records written before it was recorded.
    selection_split: str = ""


@dataclass
class BackendStatus:
    """What the backend knows: ``phase`` is pending, running, exited or gone."""

    phase: str
    exit_code: int | None = None
    message: str = ""


class Backend(Protocol):
    name: str

    def launch(self, run: RunRecord, run_dir: Path) -> dict: ...

    def restore(self, runs: list[tuple[RunRecord, Path]]) -> None:
        """Take back what an earlier server process launched: queued runs, workers still running."""

    def store(self):
        """The artifact store the backend's workers checkpoint to."""

    def status(self, run: RunRecord) -> BackendStatus: ...

    def cancel(self, run: RunRecord) -> None: ...

    def events(self, run: RunRecord, run_dir: Path) -> list[dict]: ...

    def wait(self, run: RunRecord, timeout_s: float) -> None: ...


class UnavailableBackend:
    """A backend that cannot work here (no cluster credentials): says why instead of pretending."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def launch(self, run: RunRecord, run_dir: Path) -> dict:
        raise FailedPrecondition(f"backend {self.name!r} is unavailable: {self.reason}")

    def restore(self, runs: list[tuple[RunRecord, Path]]) -> None:
        pass

    def store(self):
        raise FailedPrecondition(f"backend {self.name!r} is unavailable: {self.reason}")

    def status(self, run: RunRecord) -> BackendStatus:
        return BackendStatus("gone", message=f"backend {self.name!r} is unavailable: {self.reason}")

    def cancel(self, run: RunRecord) -> None:
        raise FailedPrecondition(f"backend {self.name!r} is unavailable: {self.reason}")

    def events(self, run: RunRecord, run_dir: Path) -> list[dict]:
        return []

    def wait(self, run: RunRecord, timeout_s: float) -> None:
        time.sleep(timeout_s)


@dataclass
class RunView:
    """A run as clients see it: the record joined with its events and the backend's status."""

    record: RunRecord
    state: str
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    mlflow_run_id: str = ""
    model_uri: str = ""
    started: float = 0.0
    finished: float = 0.0
    epoch_events: list[dict] = field(default_factory=list)
    # True when the run itself reported how it ended; False when the backend saw its worker vanish
    # (killed, evicted): such a run can be resumed from its newest checkpoint.
    reported: bool = False
    benchmark_seconds: float = 0.0  # measuring the exported model (benchmark.enabled), part of the run
    # The backend still holds a launch of the run: queued, or a worker that has not exited (it may have
    # reported its end already). No new launch may start until it is gone.
    active: bool = False


def derive(record: RunRecord, events: list[dict], status: BackendStatus) -> RunView:
    view = RunView(record=record, state="QUEUED", active=status.phase in ("pending", "running"))
    for i, ev in enumerate(events):
        kind = ev.get("type")
        if kind == "state":
            if ev.get("state") == "RUNNING" and not view.started:
                view.started = ev.get("ts", 0.0)
            view.mlflow_run_id = ev.get("mlflow_run_id", view.mlflow_run_id)
            if i < record.launch_events:
                continue  # how an earlier launch went; the backend says where this one is until it reports
            view.state = ev["state"]
            view.message = ev.get("message", "")
            view.reported = ev["state"] in TERMINAL
            if view.reported:
                view.finished = ev.get("ts", 0.0)
        elif kind == "epoch":
            view.epoch = int(ev["epoch"])
            view.metrics = {k: float(v) for k, v in ev.get("metrics", {}).items()}
            view.epoch_events.append(ev)
        elif kind == "model":
            view.model_uri = ev.get("uri", "")
        elif kind == "benchmark":
            view.benchmark_seconds = float(ev.get("seconds", 0.0))
    if record.cancelled and view.state not in ("SUCCEEDED",):
        view.state, view.message = "CANCELLED", view.message or "cancelled by request"
    elif view.state not in TERMINAL:
        if status.phase in ("exited", "gone"):
            view.state = "FAILED"
            view.message = status.message or f"worker exited with code {status.exit_code} before finishing"
        elif status.phase == "running" and view.state == "QUEUED":
            view.state = "RUNNING"
    return view


class RunManager:
    """Submits runs to backends and answers questions about them."""

    def __init__(self, backends: dict[str, Backend], default_backend: str = "local", root: Path | None = None):
        if default_backend not in backends:
            raise InvalidArgument(f"default backend {default_backend!r} is not one of {sorted(backends)}")
        self.backends = backends
        self.default_backend = default_backend
        self.root = root or load_settings().home / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        # Guards the records and the launch reservations; never held while waiting on a backend.
        self._lock = threading.Lock()
        self._launching: set[str] = set()
        # An earlier server process may have left queued runs and running workers behind (kill -9, a crash).
        records = []
        for path in self._record_paths():
            record = self._read(path)
            # Only records as this registry wrote them are taken back; a hand-edited one is only ever listed.
            if isinstance(record, RunRecord) and record.run_id == path.parent.name \
                    and isinstance(record.submitted, (int, float)):
                records.append(record)
        for name, backend in backends.items():
            backend.restore([(r, self.run_dir(r.run_id)) for r in records if r.backend == name])

    # -- records -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def _save(self, record: RunRecord) -> None:
        path = self.run_dir(record.run_id) / "run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(path)

    def _record_paths(self) -> list[Path]:
        return list(self.root.glob("*/run.json"))

    @staticmethod
    def _read(path: Path) -> RunRecord | Exception:
        try:
            return RunRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            return exc

    def exists(self, run_id: str) -> bool:
        return (self.run_dir(validate_run_id(run_id)) / "run.json").exists()

    def load(self, run_id: str) -> RunRecord:
        validate_run_id(run_id)
        path = self.run_dir(run_id) / "run.json"
        if not path.exists():
            raise NotFound(f"run {run_id!r} does not exist")
        record = self._read(path)
        if isinstance(record, Exception):
            raise IntegrityError(f"the record of run {run_id!r} is unreadable: {record}")
        return record

    def _backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidArgument(f"unknown backend {name!r}; available: {sorted(self.backends)}") from None

    # -- operations ----------------------------------------------------------------------------
    def submit(self, config_yaml: str, overrides: list[str] = (), backend: str = "", run_id: str = "",
               replicas: int = 0, labels: dict[str, str] | None = None, fork: bool = False) -> RunView:
        """Validate the config and start it. An existing ``run_id`` resumes from its newest checkpoint, with the
        config that checkpoint was trained with; with ``fork`` a new run (``<run_id>-fork-<hex>``) starts from
        scratch instead, the old one left as it is."""
        data = load_yaml(config_yaml, "config_yaml")
        config = parse_train_config(data, list(overrides))
        replicas = replicas or 1
        if not 1 <= replicas <= MAX_REPLICAS or config.batch_size % replicas:
            raise InvalidArgument(
                f"replicas={replicas} must be 1 to {MAX_REPLICAS} and divide batch_size={config.batch_size}"
            )
        forked_from = ""
        if fork:
            if not run_id:
                raise InvalidArgument("fork needs the run_id of the run to fork")
            forked_from = self.load(run_id).run_id
            run_id = f"{forked_from[:29].rstrip('-')}-fork-{uuid.uuid4().hex[:6]}"
        resumable = bool(run_id) and not fork  # a run id of the caller's may have checkpoints to resume
        run_id = validate_run_id(run_id or f"{slug(config.experiment)}-{uuid.uuid4().hex[:8]}")
        with self._lock:
            if run_id in self._launching:
                raise FailedPrecondition(f"run {run_id!r} is being launched right now; a run has one launch at a time")
            record = self.load(run_id) if self.exists(run_id) else None
            if record is not None:
                self._ensure_ended(record)
            self._launching.add(run_id)
        # The launch itself may wait (a previous Job's deletion): other calls go on meanwhile, and this run id
        # stays reserved until its new record is saved.
        try:
            if record is not None:
                log.info("resuming run", extra={"run_id": run_id})
                record.config_yaml, record.overrides = config_yaml, list(overrides)
                record.cancelled = False
            else:
                record = RunRecord(
                    run_id=run_id, backend=backend or self.default_backend, config_yaml=config_yaml,
                    overrides=list(overrides), replicas=replicas, experiment=config.experiment,
                    model=config.model.name, epochs=config.epochs, created=time.time(), forked_from=forked_from,
                )
            record.backend = backend or record.backend
            # A run without checkpoints may be resubmitted with another config: the record follows it.
            record.experiment, record.model, record.epochs = config.experiment, config.model.name, config.epochs
            record.replicas = replicas
            record.selection_split = config.selection_split
            record.labels = dict(labels or record.labels)
            record.submitted = time.time()
            be = self._backend(record.backend)
            if resumable:
                # checkpoint.py brings torch, which nothing else in the service needs.
                from services.train.checkpoint import ensure_resumable

                ensure_resumable(be.store(), run_id, config_hash(config),
                                 "resubmit it with the same config to resume it, or fork it (SubmitRun fork, "
                                 "trainyard train --fork) to start a new run from scratch with this config")
            run_dir = self.run_dir(run_id)
            run_dir.mkdir(parents=True, exist_ok=True)
            record.launch_events = len(be.events(record, run_dir))
            (run_dir / "config.yaml").write_text(config_yaml)
            record.handle = be.launch(record, run_dir)
            self._save(record)
        finally:
            with self._lock:
                self._launching.discard(run_id)
        log.info("run submitted", extra={"run_id": run_id, "backend": record.backend, "replicas": replicas,
                                         "forked_from": forked_from})
        return self.view(record)

    def _ensure_ended(self, record: RunRecord) -> None:
        view = self.view(record)
        if view.state not in TERMINAL:
            raise FailedPrecondition(f"run {record.run_id!r} is still {view.state}: a run has one launch at a time; "
                                     "wait for it to end or cancel it first")
        if view.active:
            raise FailedPrecondition(f"run {record.run_id!r} is {view.state} but its worker has not exited yet: a "
                                     "run has one launch at a time; resubmit it once the worker is gone")

    def view(self, record: RunRecord) -> RunView:
        backend = self._backend(record.backend)
        return derive(record, backend.events(record, self.run_dir(record.run_id)), backend.status(record))

    def get(self, run_id: str) -> RunView:
        return self.view(self.load(run_id))

    def list(self, state: str = "", limit: int = 0) -> list[RunView]:
        views = []
        for path in self._record_paths():
            record = self._read(path)
            try:
                if isinstance(record, Exception):
                    raise IntegrityError(f"unreadable run record: {record}")
                views.append(self.view(record))
            except Exception as exc:  # noqa: BLE001 - one bad record is listed as such, never fails the list
                log.warning("run cannot be listed", extra={"path": str(path), "error": str(exc)})
                views.append(_unknown(path.parent.name, record, exc))
        views.sort(key=lambda v: v.record.created if isinstance(v.record.created, (int, float)) else 0.0,
                   reverse=True)
        if state:
            views = [v for v in views if v.state == state]
        return views[:limit] if limit else views

    def cancel(self, run_id: str) -> RunView:
        with self._lock:
            if run_id in self._launching:
                raise FailedPrecondition(f"run {run_id!r} is being launched right now; cancel it once it is")
            record = self.load(run_id)
            view = self.view(record)
            if view.state in TERMINAL:
                raise FailedPrecondition(f"run {run_id!r} already ended: {view.state}")
            record.cancelled = True
            self._save(record)
        # Stopping a worker waits out its grace period: not while holding the lock every other call needs.
        self._backend(record.backend).cancel(record)
        log.info("run cancelled", extra={"run_id": run_id})
        return self.view(record)

    def watch(self, run_id: str, poll: float = 0.5, is_active=lambda: True) -> Iterator[tuple[str, object]]:
        """Yield ("run", RunView) on every state change and ("epoch", event) per epoch, until the run ends."""
        record = self.load(run_id)
        sent_epochs = 0
        last_state = None
        while is_active():
            record = self.load(run_id)
            view = self.view(record)
            for ev in view.epoch_events[sent_epochs:]:
                yield "epoch", ev
            sent_epochs = len(view.epoch_events)
            if view.state != last_state:
                last_state = view.state
                yield "run", view
            if view.state in TERMINAL:
                return
            self._backend(record.backend).wait(record, poll)


def _unknown(run_id: str, record: RunRecord | Exception, exc: Exception) -> RunView:
    """A run whose state cannot be told (its record unreadable, its backend failing for it): listed with why."""
    if not isinstance(record, RunRecord):
        record = RunRecord(run_id=run_id, backend="", config_yaml="", overrides=[], replicas=0, experiment="",
                           model="", epochs=0, created=0.0)
    return RunView(record=record, state="UNSPECIFIED", message=f"state unavailable: {exc}")
