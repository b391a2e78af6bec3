"""A real MLflow tracking server for tests: sqlite metadata, artifacts proxied into SeaweedFS S3."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.harness.process import HOST, HarnessServer, ManagedProcess, free_port, http_probe
from tests.harness.seaweed import SeaweedServer


class MlflowServer(HarnessServer):
    """``mlflow server`` on a fixed loopback port; ``restart()`` keeps port, database and artifacts."""

    def __init__(
        self, workdir: str | Path, s3: SeaweedServer, bucket: str = "mlflow", port: int | None = None
    ):
        self.workdir = Path(workdir)
        self.s3 = s3
        self.bucket = bucket
        self.port = port or free_port()
        self.process: ManagedProcess | None = None

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "mlflow.db"

    def _make_process(self) -> ManagedProcess:
        argv = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.db_path}",
            "--serve-artifacts",
            "--artifacts-destination",
            f"s3://{self.bucket}/mlflow",
        ]
        env = dict(os.environ)
        env.update(self.s3.env())
        # The server's own boto3 client reaches SeaweedFS directly; keep proxies out of loopback.
        env["NO_PROXY"] = env["no_proxy"] = HOST
        # Nothing here reaches the internet, and MLflow's telemetry setup failing offline has
        # raised KeyError('_MLFLOW_TELEMETRY_SESSION_ID') out of unrelated API calls.
        env["MLFLOW_DISABLE_TELEMETRY"] = "true"
        # `mlflow server` imports MLflow twice (CLI, then the uvicorn worker): about 15 s on an idle
        # 2-core box but over a minute on a loaded one, hence the generous deadline.
        return ManagedProcess(
            "mlflow",
            argv,
            self.workdir / "mlflow.log",
            http_probe(f"{self.uri}/health"),
            env=env,
            cwd=self.workdir,
            ready_timeout=240,
            stop_grace=5,
        )

    def start(self) -> MlflowServer:
        # One attempt, not HarnessServer's retries on fresh ports: the port is fixed so restart() keeps it.
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3.make_bucket(self.bucket)
        self.process = self._make_process().start()
        return self

    def restart(self) -> MlflowServer:
        """Stop and start again on the same port (the tracking tests kill it mid-run)."""
        self.stop()
        return self.start()

    def running(self) -> bool:
        return self.process is not None and self.process.running()
