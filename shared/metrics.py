"""Prometheus helpers: a /metrics endpoint per service, gRPC server metrics, and Pushgateway pushes.

Long-running services are scraped; batch jobs (a training Job, a render run) may end before any scrape,
so they collect into a job-scoped registry and push it to the Pushgateway when they finish.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from http.server import HTTPServer
from typing import Any, Self

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
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


# The metric names and labels of go-grpc-prometheus (and py-grpc-prometheus), so the gRPC dashboards and alerts
# people already run work unchanged. grpc_code takes grpc-go's spelling of each code ("NotFound", "Canceled"),
# which those dashboards and alert mixins match on. Our own interceptor records them, rather than another
# library's, because it is the one place that knows a call's final status (typed domain errors, admission
# refusals, streams the client cancelled).
_GO_CODE_NAMES = {
    code.name: {"OK": "OK", "CANCELLED": "Canceled"}.get(code.name) or code.name.title().replace("_", "")
    for code in grpc.StatusCode
}


class _GrpcFamilies:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
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


def _rpc_type(method: MethodDescriptor) -> str:
    if method.client_streaming:
        return "bidi_stream" if method.server_streaming else "client_stream"
    return "server_stream" if method.server_streaming else "unary"


@functools.lru_cache(maxsize=4096)
def _method_labels(full_method: str) -> tuple[str, str, str]:
    """(grpc_type, grpc_service, grpc_method) of "/package.Service/Method". The type comes from the method's
    descriptor, which every generated stub registers in protobuf's default pool; "unknown" where none is."""
    service, sep, method = full_method.lstrip("/").partition("/")
    if not sep:
        return "unknown", "unknown", "unknown"
    try:
        descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return "unknown", service, method
    return _rpc_type(descriptor), service, method


class ServerMetrics:
    """Started and handled calls and their latency, per gRPC method (used by the bootstrap's interceptor).

    What is in flight is ``grpc_server_started_total - grpc_server_handled_total``, as with go-grpc-prometheus.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or REGISTRY
        self._f = _grpc_families(self.registry)

    def initialize(self, service_names: Iterable[str]) -> None:
        """Create every method's series at zero, every code included (go-grpc-prometheus's InitializeMetrics):
        rate() and increase() see a series' first increment only if it existed before, and an idle service
        still shows which APIs it serves."""
        pool = descriptor_pool.Default()
        for name in service_names:
            try:
                service = pool.FindServiceByName(name)
            except KeyError:
                log.debug("no descriptor for service, its metrics start at its first call", extra={"service": name})
                continue
            for method in service.methods:
                labels = (_rpc_type(method), service.full_name, method.name)
                self._f.started.labels(*labels)
                self._f.handling.labels(*labels)
                for code in _GO_CODE_NAMES.values():
                    self._f.handled.labels(*labels, code)

    def observe(self, method: str, code: Any, seconds: float) -> None:
        """Count one finished call of ``method`` ("/package.Service/Method"). ``code`` is a ``grpc.StatusCode``
        or its name ("OK", "NOT_FOUND")."""
        code_name = getattr(code, "name", None) or str(code)
        labels = _method_labels(method)
        self._f.handled.labels(*labels, _GO_CODE_NAMES.get(code_name, code_name)).inc()
        self._f.handling.labels(*labels).observe(seconds)

    @contextlib.contextmanager
    def in_flight(self, method: str) -> Iterator[None]:
        """Count ``method`` as started; the call is in flight until ``observe`` counts it handled. (A context
        manager around the handler, as the interceptor calls it.)"""
        self._f.started.labels(*_method_labels(method)).inc()
        yield


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
