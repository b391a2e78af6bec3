"""Real servers for the test suite (SeaweedFS S3, MLflow, Prometheus), each a subprocess on a free
loopback port, waited for with a deadline and stopped by PID; see tests/conftest.py for fixtures."""

from tests.harness.mlflow_server import MlflowServer
from tests.harness.process import ManagedProcess, ServerFailed, free_port, free_ports, http_probe, tcp_probe
from tests.harness.prometheus import PrometheusServer
from tests.harness.seaweed import SeaweedServer

__all__ = [
    "ManagedProcess",
    "MlflowServer",
    "PrometheusServer",
    "SeaweedServer",
    "ServerFailed",
    "free_port",
    "free_ports",
    "http_probe",
    "tcp_probe",
]
