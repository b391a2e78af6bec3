"""The MLflow run every training job writes through: one run, explicit tracking URI, metrics that survive outages.

Why not the fluent ``mlflow.*`` API: it keeps one global active run and one global tracking URI, so two
trackers (a training job and its evaluation, or tests against two servers) would step on each other.
``MlflowClient`` takes both explicitly.

Outage behaviour: per-step metrics are the one thing a training loop logs continuously, so they are the one
thing that must not stall or crash the loop when the MLflow server restarts. They are kept in memory (and in a
JSONL spool file, so a crash loses nothing), retried with backoff on later calls, and flushed at close, which
waits a bounded time before raising ``Unavailable``. Everything else (params, tags, artifacts, run status) is
retried until ``call_timeout`` and then raises ``Unavailable``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from shared.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TrainyardError,
    Unavailable,
)
from shared.logs import get_logger
from shared.settings import load_settings
from shared.tracking.client import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    METRIC_KEY,
    as_domain_error,
    call_with_retries,
    default_artifact_location,
    fail_fast_http,
    flatten_params,
    get_or_create_experiment,
    git_commit,
    is_retryable,
    prepare_local_store,
    tag_value,
)

log = get_logger(__name__)

T = TypeVar("T")


class Tracker:
    """One MLflow run. Use as a context manager; ``close()`` by hand works too.

    ``run_id`` resumes an existing run (a restarted training job), replaying any metrics a crashed
    predecessor left in the spool file. Every run carries MLflow's ``mlflow.source.*`` tags (the git commit,
    the entry point); ``system_metrics`` samples CPU, memory, disk, network (and GPU where NVML is present)
    into ``system/*`` metrics while the run is open.
    """

    def __init__(
        self,
        experiment: str = "default",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        *,
        config_hash: str | None = None,
        dataset_version: str | None = None,
        spool_dir: str | Path | None = None,
        close_timeout: float = 60.0,
        call_timeout: float = 30.0,
        request_timeout: int = 10,
        system_metrics: bool = False,
        system_metrics_interval_s: float = 5.0,
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri or load_settings().mlflow_uri
        self.close_timeout = close_timeout
        self.call_timeout = call_timeout
        self.request_timeout = request_timeout
        self._requested_run_id = run_id
        self._spool_dir = Path(spool_dir) if spool_dir else load_settings().home / "spool" / "mlflow"
        commit = git_commit()
        self._tags: dict[str, str] = {"git_commit": commit, "mlflow.source.git.commit": commit,
                                      "mlflow.source.name": _entry_point(), "mlflow.source.type": "JOB"}
        if config_hash:
            self._tags["config_hash"] = config_hash
        if dataset_version:
            self._tags["dataset_version"] = dataset_version
        self._tags.update({k: tag_value(v) for k, v in (tags or {}).items()})
        prepare_local_store(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._run_id: str | None = None
        self._closed = False
        self._lock = threading.RLock()
        self._pending: list[Metric] = []
        self._down_since: float | None = None
        self._next_retry = 0.0
        self._backoff = BACKOFF_START_S
        self._system_metrics = system_metrics
        self._system_metrics_interval_s = system_metrics_interval_s
        self._monitor = None

    # -- run lifecycle -------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        self._ensure_started()
        assert self._run_id is not None
        return self._run_id

    @property
    def pending(self) -> int:
        """How many metric values wait for the server."""
        return len(self._pending)

    @property
    def spool_path(self) -> Path:
        return self._spool_dir / f"{self.run_id}.jsonl"

    def start(self) -> Self:
        if self._run_id is not None:
            return self
        if self._requested_run_id:
            self._resume(self._requested_run_id)
        else:
            self._create()
        if self._system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=self._system_metrics_interval_s,
                                                 resume_logging=bool(self._requested_run_id),
                                                 tracking_uri=self.tracking_uri)
            self._monitor.start()
        return self

    def _create(self) -> None:
        location = default_artifact_location(self.tracking_uri, self.experiment)

        def create() -> str:
            exp_id = get_or_create_experiment(self.client, self.experiment, location)
            return self.client.create_run(exp_id, run_name=self.run_name, tags=self._tags).info.run_id

        self._run_id = self._call(create, f"create run in experiment {self.experiment!r}")
        log.info("mlflow run started", extra={"run_id": self._run_id, "experiment": self.experiment})

    def _resume(self, run_id: str) -> None:
        run = self._call(lambda: self.client.get_run(run_id), f"resume run {run_id}")
        if run.info.lifecycle_stage == "deleted":
            raise NotFound(f"MLflow run {run_id} was deleted; cannot resume it")
        self._run_id = run_id
        self._call(
            lambda: self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING)),
            f"mark run {run_id} running",
        )
        self._log_batch_blocking(tags=[RunTag(k, v) for k, v in self._tags.items()])
        self._load_spool()
        log.info("mlflow run resumed", extra={"run_id": run_id, "replayed": len(self._pending)})
        if self._pending:
            self._try_flush()

    def _ensure_started(self) -> None:
        if self._run_id is None:
            self.start()

    def _active_run_id(self) -> str:
        run_id = self.run_id
        if self._closed:
            raise FailedPrecondition(f"tracker for MLflow run {run_id} is closed; nothing more can be logged")
        return run_id

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(RunStatus.to_string(RunStatus.FINISHED))
            return
        # Ctrl-C and a cancelled job are someone's decision, not a failure of the run.
        status = RunStatus.KILLED if issubclass(exc_type, (KeyboardInterrupt, Cancelled)) else RunStatus.FAILED
        if self._run_id is None:
            return
        # The body's exception is the one the caller needs to see; an MLflow outage at this point is logged.
        try:
            with contextlib.suppress(TrainyardError):
                self.set_tags({"error": f"{exc_type.__name__}: {exc}"})
            self.close(RunStatus.to_string(status))
        except TrainyardError as close_exc:
            log.error("could not close mlflow run", extra={"run_id": self._run_id, "error": str(close_exc)})

    def close(self, status: str = "FINISHED") -> None:
        """Flush buffered metrics (waiting up to ``close_timeout``), then mark the run ``status``.

        Raises ``Unavailable`` if the server stays unreachable; buffered metrics then remain in the spool
        file and are replayed by ``Tracker(run_id=...)``.
        """
        if self._closed or self._run_id is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        deadline = time.monotonic() + self.close_timeout
        if not self.flush(timeout=self.close_timeout):
            raise Unavailable(
                f"MLflow tracking server at {self.tracking_uri} unreachable for {self.close_timeout:.0f} s; "
                f"{len(self._pending)} metric values of run {self._run_id} kept in {self.spool_path} "
                "(resume the run with Tracker(run_id=...) to send them)"
            )
        left = max(deadline - time.monotonic(), 1.0)
        call_with_retries(
            lambda: self.client.set_terminated(self._run_id, status=status),
            f"mark run {self._run_id} {status}",
            deadline_s=left,
            request_timeout_s=self.request_timeout,
        )
        self._closed = True
        log.info("mlflow run closed", extra={"run_id": self._run_id, "status": status})

    # -- logging -------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retries(fn, what, deadline_s=self.call_timeout, request_timeout_s=self.request_timeout)

    def _log_batch_blocking(self, params: list[Param] = (), tags: list[RunTag] = ()) -> None:
        run_id = self._active_run_id()
        params, tags = list(params), list(tags)
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = params[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self._call(lambda c=chunk: self.client.log_batch(run_id, params=c), f"log params to run {run_id}")
        for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
            chunk_t = tags[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self._call(lambda c=chunk_t: self.client.log_batch(run_id, tags=c), f"set tags on run {run_id}")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params; nested keys are joined with dots."""
        flat = flatten_params(params)
        self._log_batch_blocking(params=[Param(k, v) for k, v in flat.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log_batch_blocking(tags=[RunTag(str(k), tag_value(v)) for k, v in tags.items()])

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metric values at ``step``; never blocks long on an MLflow outage (values are buffered)."""
        self._active_run_id()
        now_ms = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            if not isinstance(key, str) or not METRIC_KEY.match(key) or len(key) > MAX_ENTITY_KEY_LENGTH:
                raise InvalidArgument(f"invalid metric name {key!r}")
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"metric {key!r} is not a number: {value!r}") from exc
            entries.append(Metric(key, number, now_ms, int(step or 0)))
        if not entries:
            return
        with self._lock:
            self._pending.extend(entries)
            if self._down_since is not None and time.monotonic() < self._next_retry:
                self._spool_append(entries)
                return
            self._try_flush()

    def flush(self, timeout: float = 0.0) -> bool:
        """Send buffered metrics; keep retrying with backoff for up to ``timeout`` s. True when none remain."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._try_flush():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                time.sleep(max(0.0, min(self._next_retry - time.monotonic(), left)))
            return True

    def _try_flush(self) -> bool:
        """One attempt to send everything buffered. On an outage schedule the next attempt and spool."""
        run_id = self.run_id
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            try:
                with fail_fast_http(self.request_timeout):
                    self.client.log_batch(run_id, metrics=chunk)
            except Exception as exc:
                if not is_retryable(exc):
                    del self._pending[: len(chunk)]
                    self._spool_rewrite()
                    if isinstance(exc, MlflowException):
                        raise as_domain_error(exc, f"log metrics to run {run_id}") from exc
                    raise
                self._mark_down(exc)
                return False
            del self._pending[: len(chunk)]
        if self._down_since is not None:
            log.info(
                "mlflow reachable again, buffered metrics sent",
                extra={"run_id": run_id, "down_s": round(time.monotonic() - self._down_since, 1)},
            )
        self._down_since = None
        self._backoff = BACKOFF_START_S
        self._spool_path_for(run_id).unlink(missing_ok=True)
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._backoff = BACKOFF_START_S
            log.warning(
                "mlflow unreachable, buffering metrics",
                extra={"run_id": self._run_id, "error": str(exc)[:300], "spool": str(self.spool_path)},
            )
        self._next_retry = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self._spool_rewrite()

    # -- spool file ----------------------------------------------------------------------------------

    def _spool_path_for(self, run_id: str) -> Path:
        return self._spool_dir / f"{run_id}.jsonl"

    @staticmethod
    def _spool_line(m: Metric) -> str:
        value = None if math.isnan(m.value) else m.value
        return json.dumps({"key": m.key, "value": value, "timestamp": m.timestamp, "step": m.step}) + "\n"

    def _spool_append(self, entries: list[Metric]) -> None:
        path = self.spool_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.writelines(self._spool_line(m) for m in entries)
            fh.flush()
            os.fsync(fh.fileno())

    def _spool_rewrite(self) -> None:
        path = self.spool_path
        if not self._pending:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(self._spool_line(m) for m in self._pending)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _load_spool(self) -> None:
        path = self.spool_path
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # A crash mid-append leaves at most one torn last line.
                log.warning("skipping torn spool line", extra={"spool": str(path)})
                continue
            value = float("nan") if rec["value"] is None else float(rec["value"])
            self._pending.append(Metric(rec["key"], value, int(rec["timestamp"]), int(rec["step"])))

    # -- artifacts -----------------------------------------------------------------------------------

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (or a whole directory) into the run's artifacts, under ``artifact_path``."""
        run_id = self._active_run_id()
        path = Path(local_path)
        if not path.exists():
            raise NotFound(f"artifact to log does not exist: {path}")
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._call(lambda: upload(run_id, str(path), artifact_path), f"upload {path.name} to run {run_id}")

    def log_text(self, text: str, artifact_file: str) -> None:
        run_id = self._active_run_id()
        self._call(lambda: self.client.log_text(run_id, text, artifact_file), f"log {artifact_file}")

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        run_id = self._active_run_id()
        self._call(lambda: self.client.log_dict(run_id, dict(d), artifact_file), f"log {artifact_file}")

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        run_id = self._active_run_id()
        self._call(lambda: self.client.log_figure(run_id, figure, artifact_file), f"log {artifact_file}")

    def log_dataset(self, name: str, digest: str, source: str | None, context: str = "training",
                    profile: Mapping[str, Any] | None = None) -> None:
        """Record the run's data as an MLflow dataset input (the Datasets column and the run's inputs).

        ``source`` is where it was read from (a path or a store URL; None for generated data); ``digest``
        identifies exactly the bytes used, so two runs on the same data show the same dataset.
        """
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import Dataset, DatasetInput, InputTag

        if source:
            with warnings.catch_warnings():
                # Local paths match two equivalent registered source kinds; MLflow picks one and says so.
                warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
                data_source = resolve_dataset_source(source)
        else:
            data_source = CodeDatasetSource({"generator": name})
        entity = Dataset(name=name, digest=digest[:36], source_type=data_source._get_source_type(),
                         source=data_source.to_json(), profile=json.dumps(dict(profile)) if profile else None)
        run_id = self._active_run_id()
        inputs = [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
        what = f"log dataset {name} to run {run_id}"
        for attempt in range(3):
            try:
                self._call(lambda: self.client.log_inputs(run_id, datasets=inputs), what)
                return
            except InvalidArgument as exc:
                # Two runs starting together (study trials on one dataset) both find the dataset missing and
                # both insert it; the server refuses the second insert. Once the first is in, a retry links the
                # existing dataset to this run.
                if "unique constraint" not in str(exc).lower() or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))


def _entry_point() -> str:
    """What started this process, as MLflow's ``mlflow.source.name`` shows it (``-m services.train.worker``)."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return Path(getattr(__main__, "__file__", "python")).name
