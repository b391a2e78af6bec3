"""MLflow's model registry: registering a run's model as a new version of a registered model."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from shared.errors import (
    Unavailable,
)
from shared.logs import get_logger
from shared.settings import load_settings
from shared.tracking.client import as_domain_error, fail_fast_http, prepare_local_store, tag_value

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
