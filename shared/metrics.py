"""Prometheus helpers: a /metrics endpoint per service, gRPC server metrics, and Pushgateway pushes.

Long-running services are scraped; batch jobs (a training Job, a render run) may end before any scrape,
so they collect into a job-scoped registry and push it to the Pushgateway when they finish.
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from http.server import HTTPServer
from typing import Any, Self

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import push_to_gateway, pushadd_to_gateway

from shared.logs import get_logger
from shared.settings import load_settings

log = get_logger(__name__)

# gRPC calls here range from sub-millisecond health checks to multi-minute renders.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class MetricsServer:
    """The /metrics HTTP endpoint; ``close()`` stops it (tests and graceful shutdown need that)."""

    def __init__(self, httpd: HTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(port: int, registry: CollectorRegistry | None = None, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` (the process default when None) on ``addr:port``; port 0 picks a free one."""
    httpd, thread = start_http_server(port, addr=addr, registry=registry or REGISTRY)
    server = MetricsServer(httpd, thread)
    log.info("metrics server listening", extra={"port": server.port})
    return server


class _GrpcFamilies:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "trainyard_grpc_requests",
            "gRPC requests handled, by final status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "trainyard_grpc_request_duration_seconds",
            "Time from receiving a gRPC request to sending its response.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "trainyard_grpc_requests_in_flight",
            "gRPC requests being handled right now.",
            ["service"],
            registry=registry,
        )


# A registry accepts each metric name once, so every ServerMetrics on one registry shares the families
# (tests and a process hosting two services create several).
_families: weakref.WeakKeyDictionary[CollectorRegistry, _GrpcFamilies] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _grpc_families(registry: CollectorRegistry) -> _GrpcFamilies:
    with _families_lock:
        fams = _families.get(registry)
        if fams is None:
            fams = _families[registry] = _GrpcFamilies(registry)
        return fams


class ServerMetrics:
    """Request count, latency and in-flight gauge for one gRPC service (used by the bootstrap's interceptor)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry or REGISTRY
        self._f = _grpc_families(self.registry)
        self._in_flight = self._f.in_flight.labels(service=service)

    def observe(self, method: str, code: Any, seconds: float) -> None:
        """Count one finished call. ``code`` is a ``grpc.StatusCode`` or its name ("OK", "NOT_FOUND")."""
        code_name = getattr(code, "name", None) or str(code)
        self._f.requests.labels(service=self.service, method=method, code=code_name).inc()
        self._f.latency.labels(service=self.service, method=method).observe(seconds)

    @contextlib.contextmanager
    def in_flight(self, method: str) -> Iterator[None]:
        """Hold the in-flight gauge up while the body runs. ``method`` is accepted for symmetry with
        ``observe``; the gauge is per service, since per-method in-flight series are almost always 0."""
        self._in_flight.inc()
        try:
            yield
        finally:
            self._in_flight.dec()


def job_registry() -> CollectorRegistry:
    """A fresh registry for one batch job, so a push carries only that job's metrics."""
    return CollectorRegistry(auto_describe=True)


def push_metrics(
    job: str,
    registry: CollectorRegistry,
    grouping_key: Mapping[str, str] | None = None,
    *,
    gateway: str | None = None,
    replace: bool = True,
    timeout: float = 5.0,
) -> bool:
    """Push ``registry`` to the Pushgateway at $TRAINYARD_PUSHGATEWAY (or ``gateway``). True when pushed.

    Without a gateway configured this is a no-op (the embedded, single-machine mode). A failed push is
    logged and swallowed: losing a metric must never fail a training job. ``replace`` PUTs (drops the
    group's earlier metrics); otherwise POST adds to them.
    """
    address = gateway or load_settings().pushgateway
    if not address:
        log.debug("no pushgateway configured, metrics not pushed", extra={"job": job})
        return False
    push = push_to_gateway if replace else pushadd_to_gateway
    try:
        push(address, job=job, registry=registry, grouping_key=dict(grouping_key or {}), timeout=timeout)
    except Exception as exc:  # any failure here must not reach the job
        log.warning("pushing metrics failed", extra={"job": job, "gateway": address, "error": str(exc)})
        return False
    log.debug("metrics pushed", extra={"job": job, "gateway": address})
    return True


class JobMetrics:
    """Metrics of one batch job in their own registry, pushed when the job ends.

    ``with JobMetrics("train", {"run": run_id}) as jm:`` times the job and, on exit, sets
    ``trainyard_job_duration_seconds`` and ``trainyard_job_last_success_timestamp_seconds`` (or
    ``..._last_failure_...``) and pushes. ``jm.gauge(...)``/``jm.counter(...)`` add job-specific metrics.
    """

    def __init__(self, job: str, grouping_key: Mapping[str, str] | None = None, gateway: str | None = None):
        self.job = job
        self.grouping_key = dict(grouping_key or {})
        self.gateway = gateway
        self.registry = job_registry()
        self._duration = Gauge("trainyard_job_duration_seconds", "Wall time of the job.", registry=self.registry)
        self._success = Gauge(
            "trainyard_job_last_success_timestamp_seconds", "When the job last succeeded.", registry=self.registry
        )
        self._failure = Gauge(
            "trainyard_job_last_failure_timestamp_seconds", "When the job last failed.", registry=self.registry
        )
        self._started = time.monotonic()

    def gauge(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, documentation, labelnames, registry=self.registry)

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return Counter(name, documentation, labelnames, registry=self.registry)

    def push(self) -> bool:
        return push_metrics(self.job, self.registry, self.grouping_key, gateway=self.gateway)

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._duration.set(time.monotonic() - self._started)
        (self._success if exc_type is None else self._failure).set_to_current_time()
        self.push()
