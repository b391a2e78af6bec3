"""Run a server as a subprocess for a test: free ports, readiness with a deadline, log to a file,
stop by PID at teardown."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"


class ServerFailed(RuntimeError):
    """A managed server exited or did not become ready in time; the message carries its log tail."""


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, with_offset: int | None = None, low: int = 20000, high: int = 45000) -> list[int]:
    """``n`` distinct free ports; with ``with_offset``, port+offset is free too for each one.

    Random picks from a band below the kernel's ephemeral range make a clash with a port the OS
    hands out meanwhile unlikely; callers still retry a start that fails to bind.
    """
    picked: list[int] = []
    taken: set[int] = set()
    for _ in range(5000):
        if len(picked) == n:
            return picked
        port = random.randint(low, high)
        group = {port} if with_offset is None else {port, port + with_offset}
        if group & taken or not all(port_is_free(p) for p in group):
            continue
        picked.append(port)
        taken |= group
    raise ServerFailed(f"could not find {n} free ports on {HOST}")


def tcp_probe(port: int, host: str = HOST) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            return False

    return probe


def http_probe(url: str, expect: int = 200) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == expect
        except (urllib.error.URLError, OSError):
            return False

    return probe


class ManagedProcess:
    """One server subprocess. ``start()`` blocks until ``probe()`` is true or raises ServerFailed."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str | os.PathLike,
        probe: Callable[[], bool],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        ready_timeout: float = 60.0,
        stop_grace: float = 10.0,
    ):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.probe = probe
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ManagedProcess:
        if self.running():
            raise ServerFailed(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Its own session, so teardown can signal the server and any workers it forked,
            # and a Ctrl-C on pytest does not hit the server first.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"{self.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            if self.probe():
                return self
            time.sleep(0.2)
        self.stop()
        raise ServerFailed(f"{self.name} not ready within {self.ready_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the process group we started, then SIGKILL whatever is left after ``grace``."""
        grace = self.stop_grace if grace is None else grace
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session made the child its group leader
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(pgid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        _signal_group(pgid, signal.SIGKILL)  # workers that outlived their parent
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def __enter__(self) -> ManagedProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def start_with_retries(make: Callable[[], ManagedProcess], attempts: int = 3) -> ManagedProcess:
    """Start a fresh ManagedProcess from ``make`` (which picks new ports) until one comes up.

    A free port can be taken between the check and the server's bind; a retry picks again.
    """
    last: ServerFailed | None = None
    for _ in range(attempts):
        proc = make()
        try:
            return proc.start()
        except ServerFailed as exc:
            proc.stop()
            last = exc
    raise last  # type: ignore[misc]


class HarnessServer:
    """A real server the suite runs as one ManagedProcess in ``workdir``. Subclasses build the process
    in ``_make_process``, picking fresh ports each call, so that ``start`` can retry a lost port race."""

    workdir: Path
    process: ManagedProcess | None = None

    def _make_process(self) -> ManagedProcess:
        raise NotImplementedError

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = start_with_retries(self._make_process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
