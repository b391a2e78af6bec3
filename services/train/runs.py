"""The run registry behind TrainService: submit, inspect, follow and cancel training runs.

A run's record (`run.json`: config, backend, replicas, timestamps) lives in
``$TRAINYARD_HOME/runs/<run_id>/``; its live state is derived, never stored twice: the worker's
events (``events.jsonl``, see ``events.py``) say what training did, and the backend says whether
the process or Job is still alive. A worker that died without writing a final state is FAILED.
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
from shared.config import load_yaml
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.logs import get_logger
from shared.names import slug, validate_run_id
from shared.settings import load_settings

log = get_logger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


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


@dataclass
class BackendStatus:
    """What the backend knows: ``phase`` is pending, running, exited or gone."""

    phase: str
    exit_code: int | None = None
    message: str = ""


class Backend(Protocol):
    name: str

    def launch(self, run: RunRecord, run_dir: Path) -> dict: ...

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


def derive(record: RunRecord, events: list[dict], status: BackendStatus) -> RunView:
    view = RunView(record=record, state="QUEUED")
    for ev in events:
        kind = ev.get("type")
        if kind == "state":
            if ev.get("state") == "RUNNING" and not view.started:
                view.started = ev.get("ts", 0.0)
            # A resumed run writes RUNNING again after an earlier terminal state.
            view.state = ev["state"]
            view.message = ev.get("message", "")
            view.mlflow_run_id = ev.get("mlflow_run_id", view.mlflow_run_id)
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
        self._lock = threading.Lock()

    # -- records -------------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    def _save(self, record: RunRecord) -> None:
        path = self.run_dir(record.run_id) / "run.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record), indent=2))
        tmp.replace(path)

    def exists(self, run_id: str) -> bool:
        return (self.run_dir(validate_run_id(run_id)) / "run.json").exists()

    def load(self, run_id: str) -> RunRecord:
        validate_run_id(run_id)
        path = self.run_dir(run_id) / "run.json"
        if not path.exists():
            raise NotFound(f"run {run_id!r} does not exist")
        return RunRecord(**json.loads(path.read_text()))

    def _backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidArgument(f"unknown backend {name!r}; available: {sorted(self.backends)}") from None

    # -- operations ----------------------------------------------------------------------------
    def submit(self, config_yaml: str, overrides: list[str] = (), backend: str = "", run_id: str = "",
               replicas: int = 0, labels: dict[str, str] | None = None) -> RunView:
        """Validate the config and start it; an existing, ended ``run_id`` resumes from its checkpoint."""
        data = load_yaml(config_yaml, "config_yaml")
        config = parse_train_config(data, list(overrides))
        replicas = replicas or 1
        if replicas < 1 or config.batch_size % replicas:
            raise InvalidArgument(
                f"replicas={replicas} must be >= 1 and divide batch_size={config.batch_size}"
            )
        with self._lock:
            if run_id:
                try:
                    record = self.load(run_id)
                except NotFound:
                    record = None
                if record is not None:
                    view = self.view(record)
                    if view.state not in TERMINAL:
                        raise FailedPrecondition(f"run {run_id!r} is still {view.state}; cancel it first")
                    log.info("resuming run", extra={"run_id": run_id})
                    record.config_yaml, record.overrides = config_yaml, list(overrides)
                    record.cancelled = False
            else:
                run_id = f"{slug(config.experiment)}-{uuid.uuid4().hex[:8]}"
                record = None
            if record is None:
                validate_run_id(run_id)
                record = RunRecord(
                    run_id=run_id, backend=backend or self.default_backend, config_yaml=config_yaml,
                    overrides=list(overrides), replicas=replicas, experiment=config.experiment,
                    model=config.model.name, epochs=config.epochs, created=time.time(),
                )
            record.backend = backend or record.backend
            record.replicas = replicas
            record.labels = dict(labels or record.labels)
            record.submitted = time.time()
            run_dir = self.run_dir(run_id)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_yaml)
            record.handle = self._backend(record.backend).launch(record, run_dir)
            self._save(record)
        log.info("run submitted", extra={"run_id": run_id, "backend": record.backend, "replicas": replicas})
        return self.view(record)

    def view(self, record: RunRecord) -> RunView:
        backend = self._backend(record.backend)
        return derive(record, backend.events(record, self.run_dir(record.run_id)), backend.status(record))

    def get(self, run_id: str) -> RunView:
        return self.view(self.load(run_id))

    def list(self, state: str = "", limit: int = 0) -> list[RunView]:
        records = []
        for path in self.root.glob("*/run.json"):
            try:
                records.append(RunRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("unreadable run record", extra={"path": str(path)})
        records.sort(key=lambda r: r.created, reverse=True)
        views = [self.view(r) for r in records]
        if state:
            views = [v for v in views if v.state == state]
        return views[:limit] if limit else views

    def cancel(self, run_id: str) -> RunView:
        with self._lock:
            record = self.load(run_id)
            view = self.view(record)
            if view.state in TERMINAL:
                raise FailedPrecondition(f"run {run_id!r} already ended: {view.state}")
            record.cancelled = True
            self._save(record)
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
