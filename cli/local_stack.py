"""`trainyard up` / `status` / `down`: the five services as local processes on embedded defaults."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli.output import add_output_options, emit
from shared.errors import FailedPrecondition
from shared.grpc_client import health_status, wait_serving
from shared.grpc_server import SERVICE_PORTS
from shared.parallel import process_alive
from shared.settings import REPOSITORY_TOKEN_FILE, load_settings

SERVICES = list(SERVICE_PORTS)
# Two training workers at once locally: a study's parallel trials each get one of the two cores.
EXTRA_ARGS = {"train": ["--max-concurrent", "2"]}


def _state_file() -> Path:
    return load_settings().home / "up.json"


def read_state() -> dict[str, dict]:
    path = _state_file()
    return json.loads(path.read_text()) if path.exists() else {}


def up(services: list[str] | None = None, deadline_s: float = 120.0, host: str = "127.0.0.1",
       ports: dict[str, tuple[int, int]] | None = None, http_port: int | None = None) -> dict[str, dict]:
    """Start each service as a detached process, wait until all report SERVING, record their PIDs.

    ``ports`` maps a service to its (gRPC, metrics) ports; the defaults are SERVICE_PORTS. ``http_port`` also
    serves the inference service's v2 REST API there (``trainyard up`` asks for 8000, KServe's and Triton's port).
    """
    settings = load_settings()
    running = {k: v for k, v in read_state().items() if process_alive(v["pid"])}
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    if settings.repository_token is None:
        _write_repository_token(settings.home / REPOSITORY_TOKEN_FILE)
    state = dict(running)
    for name in services or SERVICES:
        if name in running:
            continue
        port, metrics_port = (ports or SERVICE_PORTS)[name]
        rest = ["--http-port", str(http_port)] if name == "inference" and http_port else []
        log_path = log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}", "--port", str(port),
                 "--metrics-port", str(metrics_port), "--host", host, *EXTRA_ARGS.get(name, []), *rest],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        state[name] = {"pid": proc.pid, "address": f"{host}:{port}", "metrics": f"http://{host}:{metrics_port}/metrics",
                       "log": str(log_path), **({"rest": f"http://{host}:{http_port}/v2"} if rest else {})}
    _state_file().parent.mkdir(parents=True, exist_ok=True)
    _state_file().write_text(json.dumps(state, indent=2))
    for name, info in state.items():
        try:
            wait_serving(info["address"], deadline_s)
        except TimeoutError as exc:
            raise FailedPrecondition(f"{name} did not become ready: {exc}; see {info['log']}") from exc
    return state


def _write_repository_token(path: Path) -> None:
    """A fresh token for the inference service's load/unload, readable by this user only; the services and the
    clients on this machine find it through the settings (same TRAINYARD_HOME)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_urlsafe(32))


def status() -> dict[str, dict]:
    """Each service's health, at the address `up` recorded or at its default port."""
    state = read_state()
    out = {}
    for name in SERVICES:
        info = state.get(name) or {"address": f"127.0.0.1:{SERVICE_PORTS[name][0]}"}
        out[name] = {**info, "health": health_status(info["address"])}
    return out


def down(grace_s: float = 20.0) -> list[str]:
    """SIGTERM every recorded service, SIGKILL any still alive after ``grace_s``; returns the names stopped."""
    state = read_state()
    stopped = []
    for name, info in state.items():
        if process_alive(info["pid"]):
            os.kill(info["pid"], signal.SIGTERM)
            stopped.append(name)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(process_alive(state[n]["pid"]) for n in stopped):
        time.sleep(0.1)
    for name in stopped:
        if process_alive(state[name]["pid"]):
            os.kill(state[name]["pid"], signal.SIGKILL)
    _state_file().unlink(missing_ok=True)
    return stopped


def _rows(services: dict[str, dict], *extra: str) -> list[dict]:
    """One object per service, the same keys whether or not `up` started it (null for what it did not record)."""
    return [{"service": name, **{k: info.get(k) for k in ("address", "metrics", "rest", "pid", "log", *extra)}}
            for name, info in services.items()]


def _cmd_up(args) -> int:
    state = up(args.services or None, deadline_s=args.deadline, http_port=args.http_port or None)
    lines = [f"{'service':<10} {'gRPC':<18} {'metrics':<32} pid"]
    lines += [f"{name:<10} {info['address']:<18} {info['metrics']:<32} {info['pid']}"
              + (f"  REST {info['rest']}" if info.get("rest") else "") for name, info in state.items()]
    emit(args, _rows(state), "\n".join(lines))
    return 0


def _cmd_status(args) -> int:
    rows = status()
    lines = [f"{'service':<10} {'address':<18} health"]
    lines += [f"{name:<10} {info['address']:<18} {info['health']}" for name, info in rows.items()]
    emit(args, _rows(rows, "health"), "\n".join(lines))
    return 0 if all(r["health"] == "SERVING" for r in rows.values()) else 1


def _cmd_down(args) -> int:
    stopped = down(grace_s=args.grace)
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start all five services locally on embedded defaults")
    p.add_argument("services", nargs="*", help="only these services")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds to wait for SERVING")
    p.add_argument("--http-port", type=int, default=8000,
                   help="the inference service's v2 REST port (default %(default)s; 0: gRPC only)")
    add_output_options(p)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("status", help="print each service's health")
    add_output_options(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("down", help="stop the services `up` started")
    p.add_argument("--grace", type=float, default=20.0)
    p.set_defaults(func=_cmd_down)
