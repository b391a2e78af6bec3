"""One bootstrap for every trainyard gRPC service.

``serve()`` gives each service the same behaviour: the standard health service reporting
NOT_SERVING until the service's own ``warmup`` has finished and again while draining, server
reflection, explicit message-size limits, one interceptor that turns typed domain errors into
status codes (and counts every call in Prometheus), JSON-lines logs carrying the request id, and
a graceful shutdown on SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import logs
from shared.errors import TrainyardError, client_message
from shared.metrics import ServerMetrics, start_metrics_server
from shared.settings import load_settings

log = logs.get_logger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
REQUEST_ID_HEADER = "x-request-id"
# The file names of a kubernetes.io/tls Secret (cert-manager adds ca.crt), so one can be mounted as the
# TLS folder (TRAINYARD_TLS_DIR) as it is.
TLS_CERT, TLS_KEY, TLS_CA = "tls.crt", "tls.key", "ca.crt"

# The local default ports; `trainyard up` and the README's table use the same.
SERVICE_PORTS: dict[str, tuple[int, int]] = {
    "render": (50051, 9101),
    "convert": (50052, 9102),
    "train": (50053, 9103),
    "benchmark": (50054, 9104),
    "inference": (50055, 9105),
}


# Calls that must answer under any load: a kubelet probe refused for overload would restart a busy pod.
_NEVER_REFUSED = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Threads beyond the admission limit, so refusing a call never waits behind the admitted ones.
_SPARE_THREADS = 4
class Admission:
    """At most ``limit`` calls run at once; one more is refused at once with RESOURCE_EXHAUSTED, and counted.

    Without it, calls beyond the thread pool wait in its unbounded queue until the client's deadline cancels
    them: under 5,000 concurrent calls thousands came back CANCELLED and never reached the metrics.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"admission limit must be >= 1, got {limit}")
        self.limit = limit
        self._running = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self._running >= self.limit:
                return False
            self._running += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._running -= 1


def _wrap(behavior: Callable, method: str, metrics: ServerMetrics, streaming_response: bool,
          admission: Admission | None = None) -> Callable:
    """Run one RPC with admission control, a request id, error mapping and metrics."""
    if method.startswith(_NEVER_REFUSED):
        admission = None

    def _admit(context: grpc.ServicerContext) -> None:
        if admission is not None and not admission.try_enter():
            with metrics.in_flight(method):  # refused calls count as started and handled, like the others
                metrics.observe(method, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server overloaded: {admission.limit} calls already in flight; retry with backoff")

    def _leave() -> None:
        if admission is not None:
            admission.leave()

    def _start(context: grpc.ServicerContext) -> str:
        rid = dict(context.invocation_metadata()).get(REQUEST_ID_HEADER) or uuid.uuid4().hex[:16]
        logs.request_id.set(rid)
        with contextlib.suppress(ValueError):  # metadata already sent by the handler
            context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
        return rid

    def _fail(exc: BaseException, context: grpc.ServicerContext, rid: str) -> None:
        if isinstance(exc, TrainyardError):
            log.info("request rejected", extra={"method": method, "code": exc.code.name, "error": str(exc)})
            context.abort(exc.code, client_message(str(exc)))
        if context.code() not in (None, grpc.StatusCode.OK):
            raise exc  # the handler aborted with its own status
        log.exception("unhandled error", extra={"method": method})
        context.abort(grpc.StatusCode.INTERNAL,
                      f"internal error in {method} (request id {rid}): {client_message(str(exc))}")

    def _code(context: grpc.ServicerContext, exc: BaseException | None) -> str:
        if isinstance(exc, TrainyardError):
            return exc.code.name
        code = context.code()
        if code is not None:
            return code.name if isinstance(code, grpc.StatusCode) else str(code)
        return "INTERNAL" if exc is not None else "OK"

    if streaming_response:

        def stream_handler(request, context):
            _admit(context)
            rid = _start(context)
            start = time.perf_counter()
            error, code = None, None
            with metrics.in_flight(method):
                try:
                    yield from behavior(request, context)
                except GeneratorExit:
                    # The client cancelled or went away: there is nobody to send a status to.
                    code = grpc.StatusCode.CANCELLED.name
                    raise
                except BaseException as exc:  # noqa: BLE001 - mapped to a status below
                    error = exc
                    _fail(exc, context, rid)
                finally:
                    _leave()
                    metrics.observe(method, code or _code(context, error), time.perf_counter() - start)

        return stream_handler

    def unary_handler(request, context):
        _admit(context)
        rid = _start(context)
        start = time.perf_counter()
        error = None
        with metrics.in_flight(method):
            try:
                return behavior(request, context)
            except BaseException as exc:  # noqa: BLE001 - mapped to a status below
                error = exc
                _fail(exc, context, rid)
            finally:
                _leave()
                metrics.observe(method, _code(context, error), time.perf_counter() - start)

    return unary_handler


class DomainErrorInterceptor(grpc.ServerInterceptor):
    """Admits, maps typed domain errors to status codes and records per-method metrics, for every RPC."""

    def __init__(self, metrics: ServerMetrics, admission: Admission | None = None):
        self._metrics = metrics
        self._admission = admission

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap(handler.unary_unary, method, self._metrics, False, self._admission),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(handler.unary_stream, method, self._metrics, True, self._admission),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap(handler.stream_unary, method, self._metrics, False, self._admission),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap(handler.stream_stream, method, self._metrics, True, self._admission),
            handler.request_deserializer,
            handler.response_serializer,
        )


@dataclass
class ServiceHost:
    """A started server: its port, health state and the means to drain and stop it."""

    name: str
    server: grpc.Server
    health: health.HealthServicer
    port: int
    service_names: list[str]
    metrics_port: int | None = None
    _metrics_server: object | None = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    health_port: int | None = None
    _health_server: grpc.Server | None = None

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ["", self.name, *self.service_names]:
            self.health.set(svc, status)

    def stop(self, grace: float = 10.0) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight calls finish within ``grace``."""
        if self._stopped.is_set():
            return
        log.info("draining", extra={"service": self.name, "grace_s": grace})
        self.set_serving(False)
        self.server.stop(grace).wait()
        if self._health_server is not None:
            self._health_server.stop(0).wait()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self._stopped.set()
        log.info("stopped", extra={"service": self.name})

    def wait(self) -> None:
        self._stopped.wait()


def start(
    name: str,
    register: Callable[[grpc.Server], Iterable[str]],
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    metrics_port: int | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_workers: int = 16,
    warmup: Callable[[], None] | None = None,
    tls_dir: Path | None = None,
    health_port: int | None = None,
) -> ServiceHost:
    """Start a server and return once it listens; health turns SERVING when ``warmup`` returns.

    ``register(server)`` adds the servicers and returns their full service names (for health and
    reflection). ``warmup`` (loading models, checking the store) runs in a background thread so the
    health service can report NOT_SERVING meanwhile instead of refusing connections.
    With a TLS folder (``tls_dir``, default the TRAINYARD_TLS_DIR setting) the port speaks TLS only.
    ``health_port`` adds a plaintext port serving the health service alone: kubelet's gRPC probes
    cannot speak TLS, and health answers give nothing away.
    """
    from concurrent import futures

    metrics = ServerMetrics()
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers + _SPARE_THREADS, thread_name_prefix=f"{name}-rpc"),
        interceptors=[DomainErrorInterceptor(metrics, Admission(max_workers))],
        options=options,
    )
    service_names = list(register(server))
    metrics.initialize([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME])
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    tls_dir = tls_dir or load_settings().tls_dir
    if tls_dir is not None:
        bound = server.add_secure_port(f"{host}:{port}", server_credentials(tls_dir))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{name}: cannot bind {host}:{port}")
    health_server, health_bound = None, None
    if health_port is not None:
        health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{name}-health"),
                                    options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_bound = health_server.add_insecure_port(f"{host}:{health_port}")
        if health_bound == 0:
            raise OSError(f"{name}: cannot bind {host}:{health_port}")
    metrics_server = start_metrics_server(metrics_port, addr=host) if metrics_port is not None else None
    svc = ServiceHost(name, server, health_servicer, bound, service_names, metrics_port, metrics_server,
                      health_port=health_bound, _health_server=health_server)
    svc.set_serving(False)
    server.start()
    if health_server is not None:
        health_server.start()
    log.info("listening", extra={"service": name, "port": bound, "metrics_port": metrics_port,
                                 "tls": tls_dir is not None, "health_port": health_bound})

    def _warm() -> None:
        try:
            if warmup is not None:
                warmup()
        except Exception:  # a failed warm-up keeps the service NOT_SERVING, visibly
            log.exception("warm-up failed; staying NOT_SERVING", extra={"service": name})
            return
        if not svc._stopped.is_set():
            svc.set_serving(True)
            log.info("serving", extra={"service": name})

    threading.Thread(target=_warm, name=f"{name}-warmup", daemon=True).start()
    return svc


def server_credentials(tls_dir: Path) -> grpc.ServerCredentials:
    """The certificate chain and private key in ``tls_dir``."""
    cert, key = tls_dir / TLS_CERT, tls_dir / TLS_KEY
    missing = [p.name for p in (cert, key) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"TLS is on (TLS folder {tls_dir}) but {' and '.join(missing)} is missing there")
    return grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])


def service_arg_parser(name: str) -> argparse.ArgumentParser:
    grpc_port, metrics_port = SERVICE_PORTS[name]
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=f"trainyard {name} service")
    parser.add_argument("--port", type=int, default=grpc_port, help="gRPC port (0 picks a free one)")
    parser.add_argument("--metrics-port", type=int, default=metrics_port, help="Prometheus /metrics port")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 in containers")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES // (1024 * 1024))
    parser.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    parser.add_argument("--max-workers", type=int, default=16,
                        help="RPCs handled at once; more are refused with RESOURCE_EXHAUSTED (health checks never)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--tls-dir", type=Path, default=None,
                        help=f"serve TLS only, with {TLS_CERT} and {TLS_KEY} from this folder (default: "
                             "$TRAINYARD_TLS_DIR; unset: plaintext)")
    parser.add_argument("--health-port", type=int, default=None,
                        help="also serve the health service alone, in plaintext, on this port (for kubelet's "
                             "gRPC probes, which cannot speak TLS)")
    return parser


def serve(
    name: str,
    register: Callable[[grpc.Server], Iterable[str]],
    args: argparse.Namespace,
    warmup: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Run a service in the foreground until SIGTERM/SIGINT, then drain and exit."""
    logs.configure(args.log_level)
    svc = start(
        name,
        register,
        port=args.port,
        host=args.host,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_workers=args.max_workers,
        warmup=warmup,
        tls_dir=args.tls_dir,
        health_port=args.health_port,
    )

    def _shutdown(signum, _frame):
        log.info("signal received", extra={"service": name, "signal": signal.Signals(signum).name})
        threading.Thread(target=lambda: (svc.stop(args.grace), on_stop and on_stop()), daemon=True).start()

    signal.signal(signal.SIGTERM, _shutdown)
    signal.signal(signal.SIGINT, _shutdown)
    svc.wait()
