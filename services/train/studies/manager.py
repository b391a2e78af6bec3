"""Running studies: each study is a controller thread that submits its trials to the run registry (the same
backends as any run: local processes or one Kubernetes Job per trial), at most ``parallelism`` at once,
watches them, feeds a search its results, and writes the report when the last trial ends.

What survives a restart of the train service: the study record (``studies/<id>/study.json`` in the artifact
store: the spec, the trials, the parent MLflow run, the outcome), the runs (the registry's own records and
the runs' events), the Optuna journal of a search (``$TRAINYARD_HOME/studies/<id>/``) and MLflow itself. A
restarted service rebuilds every unfinished study from these and carries on; nothing lives only in memory.

Trial outcomes: a trial whose run reported its own end keeps it (SUCCEEDED, or FAILED with the run's reason,
which counts against the failure budget). A trial whose worker vanished without reporting (``kill -9``, an
evicted pod) is resubmitted under the same run id, which resumes it from its newest checkpoint, up to
``RESUMES`` times. A trial recorded RUNNING whose run never reached the registry (the service died between the
two) is queued again.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field

from services.train.runs import TERMINAL, RunManager, RunView
from services.train.studies import report as study_report
from services.train.studies import results as study_results
from services.train.studies.spec import StudySpec, Trial, expand_grid, load_spec, study_id, trial_config
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.logs import get_logger
from shared.settings import load_settings
from shared.storage import ArtifactStore
from shared.tracking import Tracker

log = get_logger(__name__)

STUDY_STATES = ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
RESUMES = 2
LABEL_STUDY, LABEL_TRIAL = "trainyard.dev/study", "trainyard.dev/trial"


class TrialOutcome(BaseModel):
    state: str = "QUEUED"  # QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, PRUNED
    reason: str = ""
    resumes: int = 0
    submitted: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    benchmark_s: float = 0.0


class StudyRecord(BaseModel):
    study_id: str
    spec: StudySpec
    backend: str = ""
    created: float = Field(default_factory=time.time)
    finished: float = 0.0
    state: str = "RUNNING"
    message: str = ""
    cancelled: bool = False
    parent_run_id: str = ""
    trials: list[Trial] = Field(default_factory=list)
    outcomes: dict[str, TrialOutcome] = Field(default_factory=dict)
    report_uri: str = ""
    # Wall time from submission to the report, and what the study spent outside its trials' own work.
    timing: dict[str, float] = Field(default_factory=dict)

    def outcome(self, trial_id: str) -> TrialOutcome:
        return self.outcomes.setdefault(trial_id, TrialOutcome())


def _key(sid: str) -> str:
    return f"studies/{sid}/study.json"


class StudyController:
    """One study's loop (a thread). All record changes are persisted before they take effect outside."""

    def __init__(self, manager: StudyManager, record: StudyRecord, poll_s: float):
        self.manager, self.record, self.poll_s = manager, record, poll_s
        self.changed = threading.Condition()
        self.events: list[dict[str, Any]] = []  # trial events for watchers, in order
        self._search = None
        if record.spec.search:
            from services.train.studies.search import Search

            self._search = Search(record, manager.home / "studies" / record.study_id)
        self.thread = threading.Thread(target=self._loop, name=f"study-{record.study_id}", daemon=True)

    # -- persistence and events -----------------------------------------------------------------

    def save(self) -> None:
        self.manager.store.put_bytes(_key(self.record.study_id), self.record.model_dump_json(indent=1).encode())

    def _emit(self, trial: Trial | None, **fields: Any) -> None:
        with self.changed:
            self.events.append({"trial_id": trial.trial_id if trial else "", "ts": time.time(), **fields})
            self.changed.notify_all()

    # -- the loop -------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._step():
                time.sleep(self.poll_s)
        except Exception as exc:  # noqa: BLE001 - the study ends FAILED with the reason, the service lives on
            log.error("study failed", extra={"study": self.record.study_id, "error": repr(exc)}, exc_info=True)
            self._finish("FAILED", f"the study controller failed: {type(exc).__name__}: {exc}")

    def _step(self) -> bool:
        """One pass; True when the study has ended."""
        rec = self.record
        views = self._refresh()
        if rec.cancelled:
            self._cancel_trials(views)
            self._finish("CANCELLED", "cancelled by request")
            return True
        failed = sum(1 for o in rec.outcomes.values() if o.state == "FAILED")
        if failed > rec.spec.failure_budget:
            self._cancel_trials(views)
            self._finish("FAILED", f"{failed} trials failed, more than the failure budget of "
                                   f"{rec.spec.failure_budget}")
            return True
        if self._search is not None:
            self._search.report(rec, views, self._prune)
            for trial in self._search.new_trials(rec, self._running(), self._slots()):
                rec.trials.append(trial)
                self.save()
                self.manager.log_trials(rec)
        for trial in rec.trials:
            if self._slots() <= 0:
                break
            if rec.outcome(trial.trial_id).state == "QUEUED":
                self._submit(trial)
        if all(rec.outcome(t.trial_id).state not in ("QUEUED", "RUNNING") for t in rec.trials) and (
                self._search is None or self._search.exhausted(rec)):
            self._finish("SUCCEEDED" if any(o.state == "SUCCEEDED" for o in rec.outcomes.values()) else "FAILED",
                         "")
            return True
        return False

    def _running(self) -> int:
        return sum(1 for o in self.record.outcomes.values() if o.state == "RUNNING")

    def _slots(self) -> int:
        return self.record.spec.parallelism - self._running()

    def _refresh(self) -> dict[str, RunView]:
        """Fold the runs' states into the trial outcomes; returns the views of the trials that have runs."""
        rec, runs = self.record, self.manager.runs
        views = {}
        for trial in rec.trials:
            outcome = rec.outcome(trial.trial_id)
            if outcome.state != "RUNNING":
                continue
            if not runs.exists(trial.run_id):
                # _submit saves RUNNING before the registry has the run: a service that died in between left
                # the trial without one, so it is submitted again.
                log.warning("trial has no run; queueing it again", extra={"study": rec.study_id,
                                                                          "run_id": trial.run_id})
                outcome.state = "QUEUED"
                continue
            view = views[trial.trial_id] = runs.get(trial.run_id)
            if view.state not in TERMINAL:
                continue
            if view.state == "FAILED" and not view.reported and outcome.resumes < RESUMES and not rec.cancelled:
                # The worker vanished without a word (killed, evicted): resume from its newest checkpoint.
                outcome.resumes += 1
                log.warning("trial worker vanished; resuming", extra={"study": rec.study_id, "run_id": trial.run_id,
                                                                      "reason": view.message})
                self._submit(trial, resume=True)
                continue
            outcome.state, outcome.reason = view.state, view.message if view.state != "SUCCEEDED" else ""
            outcome.started, outcome.finished = view.started, view.finished
            outcome.benchmark_s = view.benchmark_seconds
            self.save()
            if view.state == "FAILED":
                self.manager.mark_trial(rec, trial, view, failure=outcome.reason)
            self._emit(trial, state=view.state, message=outcome.reason, metrics=view.metrics)
        return views

    def _submit(self, trial: Trial, resume: bool = False) -> None:
        rec = self.record
        outcome = rec.outcome(trial.trial_id)
        outcome.state, outcome.submitted = "RUNNING", outcome.submitted or time.time()
        self.save()
        cfg = trial_config(rec.spec, trial, self.manager.trial_settings(rec, trial))
        self.manager.runs.submit(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), backend=rec.backend,
                                 run_id=trial.run_id, labels={LABEL_STUDY: rec.study_id, LABEL_TRIAL: trial.trial_id})
        self._emit(trial, state="RUNNING", message="resumed" if resume else "submitted")

    def _prune(self, trial: Trial, reason: str) -> None:
        rec = self.record
        outcome = rec.outcome(trial.trial_id)
        outcome.state, outcome.reason, outcome.finished = "PRUNED", reason, time.time()
        self.save()
        with contextlib.suppress(FailedPrecondition):  # it ended by itself meanwhile
            self.manager.runs.cancel(trial.run_id)
        self.manager.mark_trial(rec, trial, None, pruned=reason)
        self._emit(trial, state="PRUNED", message=reason)

    def _cancel_trials(self, views: dict[str, RunView]) -> None:
        for trial in self.record.trials:
            outcome = self.record.outcome(trial.trial_id)
            if outcome.state in ("QUEUED", "RUNNING"):
                if outcome.state == "RUNNING":
                    # It may have ended meanwhile, or never reached the registry.
                    with contextlib.suppress(FailedPrecondition, NotFound):
                        self.manager.runs.cancel(trial.run_id)
                outcome.state, outcome.reason = "CANCELLED", "the study stopped"
                self._emit(trial, state="CANCELLED", message=outcome.reason)
        self.save()

    def _finish(self, state: str, message: str) -> None:
        rec = self.record
        rec.state, rec.message, rec.finished = state, message, time.time()
        started = time.perf_counter()
        if rec.spec.wants_extras and state == "SUCCEEDED":
            try:
                self.manager.write_extras(rec)
            except Exception as exc:  # noqa: BLE001 - the trials' table is still worth a report
                log.error("study extras failed", extra={"study": rec.study_id, "error": repr(exc)}, exc_info=True)
                message = (message + "; " if message else "") + f"extra rows failed: {type(exc).__name__}: {exc}"
                rec.message = message
        try:
            rec.report_uri = self.manager.write_report(rec)
        except Exception as exc:  # noqa: BLE001 - a report that cannot be built must not hide the outcome
            log.error("study report failed", extra={"study": rec.study_id, "error": repr(exc)}, exc_info=True)
            rec.message = (message + "; " if message else "") + f"report failed: {type(exc).__name__}: {exc}"
        rec.timing = self.manager.timing(rec, report_s=time.perf_counter() - started)
        self.save()
        self.manager.close_parent(rec)
        self._emit(None, state=state, message=rec.message)
        log.info("study ended", extra={"study": rec.study_id, "state": state, "reason": rec.message})


class StudyManager:
    """Submits studies, answers questions about them, and resumes unfinished ones after a restart."""

    def __init__(self, runs: RunManager, store: ArtifactStore, *, tracking_uri: str | None = None,
                 poll_s: float = 1.0, cores: int | None = None):
        self.runs, self.store, self.tracking_uri, self.poll_s = runs, store, tracking_uri, poll_s
        self.home = load_settings().home
        self.cores = cores or len(os.sched_getaffinity(0))
        self._controllers: dict[str, StudyController] = {}
        self._lock = threading.Lock()
        for key in store.list("studies/"):
            if key.endswith("/study.json"):
                record = StudyRecord.model_validate_json(store.get_bytes(key))
                if record.state == "RUNNING":
                    log.info("resuming study", extra={"study": record.study_id})
                    self._start(record)

    # -- operations -----------------------------------------------------------------------------

    def submit(self, spec_yaml: str, backend: str = "") -> StudyRecord:
        if backend and backend not in self.runs.backends:
            raise InvalidArgument(f"unknown backend {backend!r}; available: {sorted(self.runs.backends)}")
        spec = load_spec(spec_yaml)
        sid = study_id(spec)
        with self._lock:
            if self.store.exists(_key(sid)):
                return self.get(sid)  # the same spec: the same study, no new run
            record = StudyRecord(study_id=sid, spec=spec, backend=backend, trials=expand_grid(spec, sid))
            for trial in record.trials:
                record.outcome(trial.trial_id)
            record.parent_run_id = self._open_parent(record)
            self.store.put_bytes(_key(sid), record.model_dump_json(indent=1).encode())
            self.log_trials(record)
            self._start(record)
        log.info("study submitted", extra={"study": sid, "trials": len(record.trials)})
        return record

    def get(self, sid: str) -> StudyRecord:
        controller = self._controllers.get(sid)
        if controller is not None:
            return controller.record
        if not self.store.exists(_key(sid)):
            raise NotFound(f"study {sid!r} does not exist")
        return StudyRecord.model_validate_json(self.store.get_bytes(_key(sid)))

    def list(self) -> list[StudyRecord]:
        records = [self.get(k.split("/")[1]) for k in self.store.list("studies/") if k.endswith("/study.json")]
        return sorted(records, key=lambda r: r.created, reverse=True)

    def cancel(self, sid: str) -> StudyRecord:
        record = self.get(sid)
        if record.state != "RUNNING":
            raise FailedPrecondition(f"study {sid!r} already ended: {record.state}")
        record.cancelled = True
        controller = self._controllers.get(sid)
        if controller is not None:
            controller.save()
            controller.thread.join(timeout=60)
        return self.get(sid)

    def watch(self, sid: str, is_active=lambda: True) -> Iterator[tuple[str, Any]]:
        """("study", record) first and at the end, ("trial", event) for every trial event in between."""
        record = self.get(sid)
        yield "study", record
        controller = self._controllers.get(sid)
        if controller is None:
            return
        sent = 0
        while is_active():
            with controller.changed:
                controller.changed.wait_for(functools.partial(_news, controller, sent), timeout=1.0)
                new = controller.events[sent:]
            sent += len(new)
            for event in new:
                if event["trial_id"]:
                    yield "trial", event
            if not controller.thread.is_alive() and sent == len(controller.events):
                yield "study", controller.record
                return

    def join(self, sid: str, timeout: float | None = None) -> StudyRecord:
        controller = self._controllers.get(sid)
        if controller is not None:
            controller.thread.join(timeout)
        return self.get(sid)

    # -- what a controller asks of the manager ------------------------------------------------

    def _start(self, record: StudyRecord) -> None:
        controller = StudyController(self, record, self.poll_s)
        self._controllers[record.study_id] = controller
        controller.thread.start()

    def trial_settings(self, record: StudyRecord, trial: Trial) -> dict[str, Any]:
        """What the study sets in every trial's config beside the trial's own overrides."""
        spec = record.spec
        tags = {**(spec.base_config or {}).get("tags", {}), "trainyard.study": record.study_id,
                "trainyard.trial": trial.trial_id, "mlflow.parentRunId": record.parent_run_id}
        settings: dict[str, Any] = {"experiment": spec.name, "export.name": spec.name, "run_name": _run_name(trial),
                                    "tags": tags, "benchmark": spec.benchmark.model_dump(mode="json")}
        if record.backend in ("", "local"):
            # Parallel trials share this machine's cores: each gets its share, so none oversubscribes them.
            settings["num_threads"] = max(1, self.cores // spec.parallelism)
        return settings

    def _open_parent(self, record: StudyRecord) -> str:
        spec = record.spec
        tracker = Tracker(experiment=spec.name, run_name=f"study {spec.name}", tracking_uri=self.tracking_uri,
                          tags={"trainyard.study": record.study_id, "trainyard.kind": "study"}).start()
        tracker.log_params({"grid": spec.grid, "objective": spec.objective.model_dump(),
                            "parallelism": spec.parallelism, "failure_budget": spec.failure_budget,
                            "search": spec.search.model_dump() if spec.search else {}})
        # Left RUNNING (not closed) until the study ends: close_parent gives it the study's outcome.
        return tracker.run_id

    def _parent(self, record: StudyRecord) -> Tracker:
        return Tracker(experiment=record.spec.name, run_id=record.parent_run_id, tracking_uri=self.tracking_uri)

    def log_trials(self, record: StudyRecord) -> None:
        """The parent run's ``study.json``: what the report is rebuilt from (with the child runs)."""
        doc = {"study_id": record.study_id, "parent_run_id": record.parent_run_id,
               "spec": record.spec.model_dump(mode="json"),
               "trials": [t.model_dump(mode="json") for t in record.trials]}
        self._parent(record).start().log_dict(doc, "study.json")

    def mark_trial(self, record: StudyRecord, trial: Trial, view: RunView | None, *, failure: str = "",
                   pruned: str = "") -> None:
        """Record a failed or pruned trial on its child run (creating one when the trial never reached MLflow)."""
        from shared.tracking import find_run_by_tag

        run_id = (view.mlflow_run_id if view else "") or find_run_by_tag(
            record.spec.name, "trainyard_run_id", trial.run_id, tracking_uri=self.tracking_uri)
        tags = {"trainyard.failure": failure[:4000]} if failure else {"trainyard.pruned": pruned}
        if run_id is None:
            tags.update({"mlflow.parentRunId": record.parent_run_id, "trainyard.trial": trial.trial_id,
                         "trainyard.study": record.study_id, "trainyard_run_id": trial.run_id})
        tracker = Tracker(experiment=record.spec.name, run_name=_run_name(trial), run_id=run_id,
                          tracking_uri=self.tracking_uri, tags=tags).start()
        tracker.set_tags(tags)
        tracker.close("FAILED" if failure else "KILLED")

    def write_extras(self, record: StudyRecord) -> None:
        """The baseline and ensemble rows, the selected model's int8 scores and error gallery, once per study
        (a restarted study whose parent run already holds them skips this)."""
        from mlflow import MlflowClient

        from services.train.studies import extras

        client = MlflowClient(self.tracking_uri or load_settings().mlflow_uri)
        if extras.extras_done(client, record.parent_run_id):
            return
        data = study_results.collect(client, record.parent_run_id)
        started = time.perf_counter()
        doc, gallery = extras.compute_extras(record.spec, data, self.store, self.home / "cache" / "datasets")
        doc["seconds"] = time.perf_counter() - started
        extras.log_extras(self._parent(record).start(), doc, gallery)
        log.info("study extras written", extra={"study": record.study_id, "rows": len(doc["rows"]),
                                                "seconds": round(doc["seconds"], 1)})

    def write_report(self, record: StudyRecord) -> str:
        """Build the report from MLflow, publish it under ``studies/<id>/report`` and log it to the parent."""
        report = study_report.report_from_mlflow(self.tracking_uri, record.parent_run_id)
        prefix = f"studies/{record.study_id}/report"
        self.store.publish(prefix, report.files(), overwrite=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in report.files().items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            self._parent(record).start().log_artifact(tmp, "report")
        return f"{self.store.url.rstrip('/')}/{prefix}"

    def close_parent(self, record: StudyRecord) -> None:
        tracker = self._parent(record).start()
        tracker.set_tags({"trainyard.study_state": record.state, "trainyard.study_message": record.message[:4000]})
        tracker.log_metrics(dict(record.timing), step=0)
        tracker.close({"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED"}.get(record.state, "FAILED"))

    def timing(self, record: StudyRecord, report_s: float) -> dict[str, float]:
        """Study wall time beside the summed trial time. A trial's time runs from its submission (its worker's
        start) to its end, less its model's benchmark (counted apart); what the study itself cost (expansion,
        scheduling, aggregation) is the wall time beyond the trials' own at this parallelism, report included."""
        done = [o for o in record.outcomes.values() if o.submitted and o.finished]
        trials_s = sum(o.finished - o.submitted - o.benchmark_s for o in done)
        bench_s = sum(o.benchmark_s for o in done)
        wall = record.finished - record.created + report_s
        overhead = max(0.0, wall - (trials_s + bench_s) / record.spec.parallelism)
        return {"study_wall_s": wall, "trials_sum_s": trials_s, "benchmark_sum_s": bench_s, "report_s": report_s,
                "study_overhead_s": overhead, "study_overhead_pct": 100 * overhead / trials_s if trials_s else 0.0}


def _news(controller: StudyController, sent: int) -> bool:
    return len(controller.events) > sent or not controller.thread.is_alive()


def _run_name(trial: Trial) -> str:
    return "-".join(str(v) for v in trial.axes.values()) or trial.trial_id


def spec_for_submit(text: str, source: str) -> str:
    """A spec as the service takes it: YAML with its base config inline (the CLI reads ``base:`` paths,
    relative to the spec file, since the service cannot see the client's files)."""
    from pathlib import Path

    path = Path(source)
    spec = load_spec(text, source, base_dir=path.parent if path.is_file() else Path.cwd())
    return yaml.safe_dump(spec.model_dump(mode="json", exclude={"base"}), sort_keys=False)
