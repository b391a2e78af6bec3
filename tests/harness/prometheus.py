"""A real Prometheus for tests: Debian's /usr/bin/prometheus scraping given targets every second."""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from tests.harness.process import HOST, HarnessServer, ManagedProcess, free_port, http_probe, start_with_retries

SCRAPE_INTERVAL = "1s"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None
    )
    if not found:
        raise FileNotFoundError("no prometheus binary: apt-get install prometheus")
    return found


class PrometheusServer(HarnessServer):
    """Scrapes ``targets`` as ``job``; with ``pushgateway`` (host:port) also that Pushgateway, keeping the pushed
    job labels as the chart's Prometheus does; evaluates the alerting rules in ``rule_files``."""

    def __init__(self, workdir: str | Path, targets: Iterable[str], job: str = "trainyard", *,
                 pushgateway: str | None = None, rule_files: Iterable[Path] = ()):
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.job = job
        self.pushgateway = pushgateway
        self.rule_files = [str(Path(f).resolve()) for f in rule_files]
        self.port: int | None = None
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _write_config(self) -> Path:
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "scrape_timeout": SCRAPE_INTERVAL,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        if self.pushgateway:
            config["scrape_configs"].append({"job_name": "pushgateway", "honor_labels": True,
                                             "scrape_timeout": SCRAPE_INTERVAL,
                                             "static_configs": [{"targets": [self.pushgateway]}]})
        if self.rule_files:
            config["rule_files"] = self.rule_files
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _make_process(self) -> ManagedProcess:
        self.port = free_port()
        argv = [
            prometheus_binary(),
            f"--config.file={self._write_config()}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
        ]
        return ManagedProcess(
            "prometheus",
            argv,
            self.workdir / "prometheus.log",
            http_probe(f"{self.url}/-/ready"),
            cwd=self.workdir,
            ready_timeout=60,
            stop_grace=5,
        )

    def query(self, promql: str) -> list[dict]:
        """Instant query through the HTTP API; returns ``data.result`` (one dict per series)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(
        self, promql: str, accept: Callable[[list[dict]], bool] = bool, timeout: float = 30.0
    ) -> list[dict]:
        """Poll ``query(promql)`` until ``accept(result)`` or the deadline; returns the last result."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if accept(result):
                return result
            time.sleep(0.5)
        raise TimeoutError(
            f"{promql!r} did not satisfy the condition within {timeout:.0f}s; last result: {result}"
        )

    def targets_health(self) -> list[dict]:
        return self._get("targets")["activeTargets"]

    def rule_groups(self) -> list[dict]:
        """The loaded rule groups, each rule with its ``health`` and ``lastError`` from its last evaluation."""
        return self._get("rules")["groups"]

    def label_values(self, label: str, match: str) -> list[str]:
        """Values of ``label`` on the series ``match`` selects (what Grafana's label_values() asks)."""
        return self._get(f"label/{urllib.parse.quote(label)}/values", {"match[]": match})

    def _get(self, path: str, params: dict[str, str] | None = None):
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
            return json.load(resp)["data"]


def start_pushgateway(log_dir: Path) -> tuple[ManagedProcess, str]:
    """A real Pushgateway (Debian's prometheus-pushgateway) on a free loopback port: (process, host:port)."""
    binary = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"

    def make() -> ManagedProcess:
        port = free_port()
        # In memory only: Debian's build persists to /var/lib/prometheus/pushgateway.data by default, which
        # would carry one test's pushes into the next.
        return ManagedProcess("pushgateway", [binary, f"--web.listen-address={HOST}:{port}", "--persistence.file="],
                              Path(log_dir) / "pushgateway.log", http_probe(f"http://{HOST}:{port}/-/ready"),
                              ready_timeout=30, stop_grace=5)

    proc = start_with_retries(make)
    return proc, proc.argv[1].split("=", 1)[1]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url`` as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
