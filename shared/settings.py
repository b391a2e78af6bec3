"""Where things live: endpoints and credentials come from the environment, never from code.

Every default is an embedded one (a local directory, a local MLflow store) so a laptop with no
cluster runs the same code; the Kubernetes manifests set the variables to the cluster's MinIO,
MLflow and Pushgateway.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

REPOSITORY_TOKEN_FILE = "repository-token"


class Settings(BaseModel):
    home: Path
    store_url: str
    mlflow_uri: str
    s3_endpoint: str | None
    s3_access_key: str | None
    s3_secret_key: str | None
    s3_secure: bool
    s3_region: str | None
    pushgateway: str | None
    # A folder laid out like a kubernetes.io/tls Secret: tls.crt + tls.key turn TLS on for every server,
    # ca.crt (or tls.crt when self-signed) is what every client trusts.
    tls_dir: Path | None
    # Bearer token for the inference service's repository control (load/unload); None disables it.
    repository_token: str | None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (``os.environ`` by default) each call, so tests can vary them."""
    env = dict(os.environ if env is None else env)
    home = Path(env.get("TRAINYARD_HOME", Path.home() / ".trainyard")).expanduser().resolve()
    return Settings(
        home=home,
        store_url=env.get("TRAINYARD_STORE", f"file://{home / 'artifacts'}"),
        mlflow_uri=env.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
        s3_endpoint=env.get("TRAINYARD_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL"),
        s3_access_key=env.get("AWS_ACCESS_KEY_ID"),
        s3_secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
        s3_secure=env.get("TRAINYARD_S3_SECURE", "false").lower() in ("1", "true", "yes"),
        s3_region=env.get("AWS_REGION"),
        pushgateway=env.get("TRAINYARD_PUSHGATEWAY"),
        tls_dir=Path(env["TRAINYARD_TLS_DIR"]).expanduser() if env.get("TRAINYARD_TLS_DIR") else None,
        repository_token=env.get("TRAINYARD_REPOSITORY_TOKEN") or _read_token(home / REPOSITORY_TOKEN_FILE),
    )


def _read_token(path: Path) -> str | None:
    # `trainyard up` writes one here, so the local stack and the clients on this machine share it.
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
