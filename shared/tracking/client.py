"""MLflow calls that survive a flaky server: bounded retries, fast-failing HTTP, typed errors; and the
small helpers every MLflow writer needs (experiments, run lookup by tag, params flattening, git commit)."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)

from shared.errors import (
    AlreadyExists,
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
METRIC_KEY = re.compile(r"^[\w\-./ :]+$")

# Backoff between flush attempts while the server is down: doubles from the first to the last value.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 5.0

_env_lock = threading.RLock()


@contextlib.contextmanager
def fail_fast_http(timeout_s: int) -> Iterator[None]:
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


def is_retryable(exc: BaseException) -> bool:
    """Connection failures and 5xx answers are worth retrying; a 4xx means the request itself is wrong."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    # Artifact uploads raise requests' own errors rather than MlflowException.
    return isinstance(exc, (ConnectionError, TimeoutError, requests.RequestException))


def as_domain_error(exc: MlflowException, what: str) -> TrainyardError:
    status = exc.get_http_status_code()
    message = f"{what}: {exc.message}"
    if status == 404:
        return NotFound(message)
    if status == 409 or exc.error_code == "RESOURCE_ALREADY_EXISTS":
        return AlreadyExists(message)
    if status < 500:
        return InvalidArgument(message)
    return Unavailable(message)


def call_with_retries(fn: Callable[[], T], what: str, deadline_s: float, request_timeout_s: int) -> T:
    """Run one MLflow client call, retrying outages with backoff until ``deadline_s`` seconds have passed."""
    start = time.monotonic()
    delay = BACKOFF_START_S
    while True:
        try:
            with fail_fast_http(request_timeout_s):
                return fn()
        except Exception as exc:
            if not is_retryable(exc):
                if isinstance(exc, MlflowException):
                    raise as_domain_error(exc, what) from exc
                raise
            left = deadline_s - (time.monotonic() - start)
            if left <= 0:
                raise Unavailable(
                    f"{what}: MLflow tracking server unreachable for {deadline_s:.0f} s ({exc})"
                ) from exc
            log.warning("mlflow call failed, retrying", extra={"what": what, "error": str(exc)[:300]})
            time.sleep(min(delay, left))
            delay = min(delay * 2, BACKOFF_MAX_S)


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


def tag_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For an embedded sqlite/file store, keep artifacts under $TRAINYARD_HOME instead of MLflow's ./mlruns
    relative to whatever the current directory happens to be. A tracking server chooses its own."""
    if not tracking_uri.startswith(("sqlite:", "file:")):
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    return (load_settings().home / "mlartifacts" / safe).as_uri()


_READY_STORES: set[str] = set()


def prepare_local_store(tracking_uri: str) -> None:
    """An embedded sqlite store exists with its schema before this process uses it.

    MLflow creates and migrates the schema on first use; runs started together on a fresh database (the
    demo's three, a study's trials) would migrate it at once and collide ("table _alembic_tmp_experiments
    already exists"). One process at a time does it, under a file lock beside the database.
    """
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return
    import fcntl

    db = Path(tracking_uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri).search_experiments(max_results=1)  # creates or migrates the schema
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(tracking_uri)


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
    prepare_local_store(uri)
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

    return call_with_retries(search, f"find run with {key}={value}", deadline_s=30, request_timeout_s=10)
