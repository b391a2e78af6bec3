"""MLflow's model registry: a run's model registered as a version of a registered model, and aliases.

Aliases name versions for their role: ``champion`` (serve this) and ``challenger`` (the runner-up under
evaluation). ``promote`` applies the engine's rule: among the versions selected on the same validation
metric, the best one is the champion; a new version that does not beat it becomes the challenger.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.logs import get_logger
from shared.settings import load_settings
from shared.tracking.client import (
    as_domain_error,
    call_with_retries,
    fail_fast_http,
    prepare_local_store,
    tag_value,
)

log = get_logger(__name__)


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
    prepare_local_store(uri)
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
            tags={k: tag_value(v) for k, v in (tags or {}).items()},
            await_creation_for=0,
        )
        return int(version.version)

    # Not retried after a 5xx that may have created the version already: a duplicate version is worse than
    # an error the caller sees.
    try:
        with fail_fast_http(30):
            result = create()
    except MlflowException as exc:
        raise as_domain_error(exc, what) from exc
    except OSError as exc:
        raise Unavailable(f"{what}: {exc}") from exc
    log.info("model registered", extra={"model": name, "version": result, "run_id": run_id})
    return result


ALIASES = ("champion", "challenger")


def _client(tracking_uri: str | None) -> MlflowClient:
    uri = tracking_uri or load_settings().mlflow_uri
    prepare_local_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _call(fn, what: str):
    return call_with_retries(fn, what, deadline_s=30, request_timeout_s=10)


def version_of_run(tracking_uri: str | None, name: str, run_id: str) -> int | None:
    """The version of ``name`` registered from ``run_id`` already (a restart after registering), if any."""
    client = _client(tracking_uri)
    found = _call(lambda: client.search_model_versions(f"name='{name}' and run_id='{run_id}'"),
                  f"search versions of model {name!r}")
    return min((int(v.version) for v in found), default=None)


def alias_version(tracking_uri: str | None, name: str, alias: str) -> int:
    """The version ``name@alias`` points at; NotFound when the model or the alias does not exist."""
    client = _client(tracking_uri)
    try:
        return int(_call(lambda: client.get_model_version_by_alias(name, alias), f"resolve {name}@{alias}").version)
    except NotFound as exc:
        raise NotFound(f"model {name!r} has no version with alias {alias!r}") from exc


def set_alias(tracking_uri: str | None, name: str, alias: str, version: int) -> None:
    if alias not in ALIASES and not alias.isidentifier():
        raise InvalidArgument(f"alias {alias!r} must be a word, e.g. one of {', '.join(ALIASES)}")
    client = _client(tracking_uri)
    _call(lambda: client.set_registered_model_alias(name, alias, str(version)), f"set {name}@{alias}")
    log.info("model alias set", extra={"model": name, "alias": alias, "version": version})


def promote(tracking_uri: str | None, name: str, version: int, metric: str, mode: str, value: float,
            eligible: bool = True) -> str:
    """Give the new ``version`` its alias by the selection rule; returns the alias it got.

    ``metric``/``mode``/``value`` are the version's selection figure (tags ``selection_metric``,
    ``selection_mode``, ``selection_value`` on the versions). A version that is not ``eligible`` (it was
    selected on the test split) is never made champion automatically.
    """
    client = _client(tracking_uri)
    try:
        current = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        current = None
    best = None
    if current is not None and current.tags.get("selection_metric") == metric:
        best = float(current.tags.get("selection_value", "nan"))
    beats = best is None or (value > best if mode == "max" else value < best)
    if eligible and (current is None or beats):
        if current is not None and int(current.version) != version:
            set_alias(tracking_uri, name, "challenger", int(current.version))
        set_alias(tracking_uri, name, "champion", version)
        return "champion"
    set_alias(tracking_uri, name, "challenger", version)
    return "challenger"
