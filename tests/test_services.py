"""Each of the five services starts as `python -m services.<name>`, reports SERVING over the standard
health check, exports Prometheus metrics, and drains cleanly on SIGTERM; `trainyard status` sees them."""
import os
import subprocess
import sys

import pytest

from cli.local_stack import SERVICES, down, up
from shared.grpc_client import health_status
from tests.harness.process import free_ports
from tests.harness.prometheus import scrape


@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    ports = free_ports(2 * len(SERVICES))
    assignment = {name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(SERVICES)}
    state = up(ports=assignment, deadline_s=180)
    yield state
    down(grace_s=20)


def test_all_services_serve_health_and_metrics_and_stop_cleanly(stack, tmp_path):
    assert set(stack) == set(SERVICES)
    for name, info in stack.items():
        assert health_status(info["address"]) == "SERVING", name
        # the health check itself went through the shared interceptor and was counted
        check = (("grpc_code", "OK"), ("grpc_method", "Check"), ("grpc_service", "grpc.health.v1.Health"),
                 ("grpc_type", "unary"))
        assert scrape(info["metrics"])[("grpc_server_handled_total", check)] >= 1, name

    env = {**os.environ, "TRAINYARD_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-m", "cli", "status"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in SERVICES:
        assert f"{name}" in out.stdout
    assert out.stdout.count("SERVING") == len(SERVICES)

    pids = {name: info["pid"] for name, info in stack.items()}
    assert sorted(down(grace_s=30)) == sorted(SERVICES)
    for name, info in stack.items():
        assert health_status(info["address"], timeout=1) == "UNREACHABLE", name
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    # graceful: each service logged its drain and stop
    for name, info in stack.items():
        log = open(info["log"]).read()
        assert '"msg": "stopped"' in log, f"{name} did not stop gracefully:\n{log[-2000:]}"
