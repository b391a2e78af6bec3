"""A thin MLflow layer every training job uses: one run, explicit tracking URI, metrics that survive outages.

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
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from shared.errors import (
    AlreadyExists,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TrainyardError,
    Unavailable,
)
from shared.logs import get_logger
from shared.settings import load_settings

log = get_logger(__name__)

T = TypeVar("T")

STANDARD_TAGS = ("git_commit", "config_hash", "dataset_version")

# MLflow's own metric-name rule (alphanumerics, _ - . space / :), checked here so that a bad name fails at
# the call that logged it instead of poisoning the retry buffer later.
_METRIC_KEY = re.compile(r"^[\w\-./ :]+$")

# Backoff between flush attempts while the server is down: doubles from the first to the last value.
_BACKOFF_START_S = 0.5
_BACKOFF_MAX_S = 5.0

_env_lock = threading.RLock()


@contextlib.contextmanager
def _fail_fast_http(timeout_s: int) -> Iterator[None]:
    """Make MLflow's HTTP client fail fast for the calls made inside.

    MLflow retries each request 7 times with exponential backoff and a 120 s timeout by default, which
    blocks a training step for minutes when the server restarts (and makes tests hang). This module does
    its own bounded retrying, so inside its calls MLflow gets a single attempt with a short timeout.
    MLflow reads these variables at every request, so setting them around the call is enough; the lock
    keeps two trackers in different threads from restoring each other's values out of order.
    """
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    with _env_lock:
        saved = {k: os.environ.get(k) for k in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _is_retryable(exc: BaseException) -> bool:
    """Connection failures and 5xx answers are worth retrying; a 4xx means the request itself is wrong."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    # Artifact uploads raise requests' own errors rather than MlflowException.
    return isinstance(exc, (ConnectionError, TimeoutError, requests.RequestException))


def _as_domain_error(exc: MlflowException, what: str) -> TrainyardError:
    status = exc.get_http_status_code()
    message = f"{what}: {exc.message}"
    if status == 404:
        return NotFound(message)
    if status == 409 or exc.error_code == "RESOURCE_ALREADY_EXISTS":
        return AlreadyExists(message)
    if status < 500:
        return InvalidArgument(message)
    return Unavailable(message)


def _call(fn: Callable[[], T], what: str, deadline_s: float, request_timeout_s: int) -> T:
    """Run one MLflow client call, retrying outages with backoff until ``deadline_s`` seconds have passed."""
    start = time.monotonic()
    delay = _BACKOFF_START_S
    while True:
        try:
            with _fail_fast_http(request_timeout_s):
                return fn()
        except Exception as exc:
            if not _is_retryable(exc):
                if isinstance(exc, MlflowException):
                    raise _as_domain_error(exc, what) from exc
                raise
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise Unavailable(
                    f"{what}: MLflow tracking server unreachable for {deadline_s:.0f} s ({exc})"
                ) from exc
            log.warning("mlflow call failed, retrying", extra={"what": what, "error": str(exc)[:300]})
            time.sleep(min(delay, left))
            delay = min(delay * 2, _BACKOFF_MAX_S)


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit the code runs from: ``git rev-parse HEAD``, else $TRAINYARD_GIT_COMMIT, else "unknown".

    Container images carry no .git folder, so their build sets TRAINYARD_GIT_COMMIT instead.
    """
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            check=False,
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("TRAINYARD_GIT_COMMIT") or "unknown"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``, values stringified and cut to MLflow's limits."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            log.warning("param value truncated", extra={"param": name, "length": len(text)})
            text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
        if len(name) > MAX_ENTITY_KEY_LENGTH:
            raise InvalidArgument(f"param name longer than {MAX_ENTITY_KEY_LENGTH} characters: {name[:80]}...")
        out[name] = text
    return out


def _tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def _default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For an embedded sqlite/file store, keep artifacts under $TRAINYARD_HOME instead of MLflow's ./mlruns
    relative to whatever the current directory happens to be. A tracking server chooses its own."""
    if not tracking_uri.startswith(("sqlite:", "file:")):
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    return (load_settings().home / "mlartifacts" / safe).as_uri()


def _prepare_local_store(tracking_uri: str) -> None:
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, creating it if needed (and restoring it if it was deleted)."""
    if not name:
        raise InvalidArgument("experiment name must not be empty")
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:
            # Another job created it between our lookup and our create.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_run_by_tag(
    experiment: str, key: str, value: str, tracking_uri: str | None = None
) -> str | None:
    """The id of the newest active run in ``experiment`` tagged ``key=value``, or None.

    A restarted training Job uses this with its job id tag to find the run it must resume.
    """
    if "'" in value or "`" in key:
        raise InvalidArgument(f"tag key/value must not contain quotes: {key}={value}")
    uri = tracking_uri or load_settings().mlflow_uri
    _prepare_local_store(uri)
    client = MlflowClient(tracking_uri=uri)

    def search() -> str | None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{key}` = '{value}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    return _call(search, f"find run with {key}={value}", deadline_s=30, request_timeout_s=10)


def register_model(
    tracking_uri: str | None,
    name: str,
    run_id: str,
    artifact_path_or_source: str,
    tags: Mapping[str, Any] | None = None,
) -> int:
    """Register a model version in the MLflow model registry and return its version number.

    ``artifact_path_or_source`` is either a path inside the run's artifacts ("model") or a full URI
    (``s3://...``, ``runs:/...``, ``models:/...``) used as is.
    """
    uri = tracking_uri or load_settings().mlflow_uri
    _prepare_local_store(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    what = f"register model {name!r} from run {run_id}"

    def create() -> int:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if "://" in artifact_path_or_source or artifact_path_or_source.startswith(("runs:/", "models:/")):
            source = artifact_path_or_source
        else:
            run = client.get_run(run_id)
            source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path_or_source.strip('/')}"
        version = client.create_model_version(
            name,
            source,
            run_id=run_id,
            tags={k: _tag_value(v) for k, v in (tags or {}).items()},
            await_creation_for=0,
        )
        return int(version.version)

    # Not retried after a 5xx that may have created the version already: a duplicate version is worse than
    # an error the caller sees.
    try:
        with _fail_fast_http(30):
            result = create()
    except MlflowException as exc:
        raise _as_domain_error(exc, what) from exc
    except OSError as exc:
        raise Unavailable(f"{what}: {exc}") from exc
    log.info("model registered", extra={"model": name, "version": result, "run_id": run_id})
    return result


class Tracker:
    """One MLflow run. Use as a context manager; ``close()`` by hand works too.

    ``run_id`` resumes an existing run (a restarted training job), replaying any metrics a crashed
    predecessor left in the spool file.
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
    ) -> None:
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri or load_settings().mlflow_uri
        self.close_timeout = close_timeout
        self.call_timeout = call_timeout
        self.request_timeout = request_timeout
        self._requested_run_id = run_id
        self._spool_dir = Path(spool_dir) if spool_dir else load_settings().home / "spool" / "mlflow"
        self._tags: dict[str, str] = {"git_commit": git_commit()}
        if config_hash:
            self._tags["config_hash"] = config_hash
        if dataset_version:
            self._tags["dataset_version"] = dataset_version
        self._tags.update({k: _tag_value(v) for k, v in (tags or {}).items()})
        _prepare_local_store(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self._run_id: str | None = None
        self._closed = False
        self._lock = threading.RLock()
        self._pending: list[Metric] = []
        self._down_since: float | None = None
        self._next_retry = 0.0
        self._backoff = _BACKOFF_START_S

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
        return self

    def _create(self) -> None:
        location = _default_artifact_location(self.tracking_uri, self.experiment)

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
        deadline = time.monotonic() + self.close_timeout
        if not self.flush(timeout=self.close_timeout):
            raise Unavailable(
                f"MLflow tracking server at {self.tracking_uri} unreachable for {self.close_timeout:.0f} s; "
                f"{len(self._pending)} metric values of run {self._run_id} kept in {self.spool_path} "
                "(resume the run with Tracker(run_id=...) to send them)"
            )
        left = max(deadline - time.monotonic(), 1.0)
        _call(
            lambda: self.client.set_terminated(self._run_id, status=status),
            f"mark run {self._run_id} {status}",
            deadline_s=left,
            request_timeout_s=self.request_timeout,
        )
        self._closed = True
        log.info("mlflow run closed", extra={"run_id": self._run_id, "status": status})

    # -- logging -------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return _call(fn, what, deadline_s=self.call_timeout, request_timeout_s=self.request_timeout)

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
        self._log_batch_blocking(tags=[RunTag(str(k), _tag_value(v)) for k, v in tags.items()])

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metric values at ``step``; never blocks long on an MLflow outage (values are buffered)."""
        self._active_run_id()
        now_ms = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            if not isinstance(key, str) or not _METRIC_KEY.match(key) or len(key) > MAX_ENTITY_KEY_LENGTH:
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
                with _fail_fast_http(self.request_timeout):
                    self.client.log_batch(run_id, metrics=chunk)
            except Exception as exc:
                if not _is_retryable(exc):
                    del self._pending[: len(chunk)]
                    self._spool_rewrite()
                    if isinstance(exc, MlflowException):
                        raise _as_domain_error(exc, f"log metrics to run {run_id}") from exc
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
        self._backoff = _BACKOFF_START_S
        self._spool_path_for(run_id).unlink(missing_ok=True)
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._backoff = _BACKOFF_START_S
            log.warning(
                "mlflow unreachable, buffering metrics",
                extra={"run_id": self._run_id, "error": str(exc)[:300], "spool": str(self.spool_path)},
            )
        self._next_retry = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
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
