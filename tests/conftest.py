"""Fixtures that start real servers, lazily: a server starts only when a test asks for it."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import pytest

from tests.harness import MlflowServer, PrometheusServer, SeaweedServer

# The suite runs offline; MLflow's telemetry client failing to start has surfaced as
# KeyError('_MLFLOW_TELEMETRY_SESSION_ID') from ordinary tracking calls.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS S3 gateway: ``.endpoint`` ("127.0.0.1:port"), ``.access_key``, ``.secret_key``,
    ``.bucket`` (created), ``.env()`` (the variables shared.settings reads)."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_store_url(s3_server, request, monkeypatch) -> str:
    """A fresh ``s3://bucket/prefix`` for this test, with the S3 env vars set for its duration.

    Tests share one bucket (each SeaweedFS bucket reserves volumes of its own) under distinct prefixes.
    """
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60].strip("-")
    return f"s3://{s3_server.bucket}/tests/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """``mlflow server`` with sqlite + S3 artifacts: ``.uri``, ``.restart()`` (same port and data)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3_server).start()
    yield server
    server.stop()


@pytest.fixture
def prometheus_factory(tmp_path_factory):
    """``start(["127.0.0.1:port", ...]) -> PrometheusServer`` (``.url``, ``.query(promql)``,
    ``.wait_for(promql, accept)``); every server started is stopped after the test."""
    started: list[PrometheusServer] = []

    def start(targets, job: str = "trainyard") -> PrometheusServer:
        server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets, job=job)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def pushgateway(tmp_path):
    """host:port of a real Pushgateway, stopped after the test."""
    from tests.harness.prometheus import start_pushgateway

    proc, address = start_pushgateway(tmp_path)
    yield address
    proc.stop()


@pytest.fixture(scope="session")
def kustomized() -> list[dict]:
    """Every object `kubectl kustomize k8s/` builds."""
    from tests.harness.kube import kustomize_build

    return kustomize_build()


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """The Helm chart's objects for the default, gpu and cpu values."""
    from tests.harness.kube import render_variants

    return render_variants()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    faster for tiny tensors, and OpenMP workers stall badly when other processes hold the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private TRAINYARD_HOME for an in-process training run (no progress bars, no Pushgateway)."""
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRAINYARD_PROGRESS", "0")
    monkeypatch.delenv("TRAINYARD_PUSHGATEWAY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def study_env(tmp_path, monkeypatch, mlflow_server, s3_store_url) -> Path:
    """A study's environment: a fresh TRAINYARD_HOME (returned), the S3 store and MLflow server, no progress bars."""
    home = tmp_path / "home"
    for key, value in {"TRAINYARD_HOME": str(home), "TRAINYARD_STORE": s3_store_url, "TRAINYARD_PROGRESS": "0",
                       "MLFLOW_TRACKING_URI": mlflow_server.uri}.items():
        monkeypatch.setenv(key, value)
    return home
