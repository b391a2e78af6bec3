"""Client-side helpers: channels with the same message limits and TLS setting as the servers, and health
checks."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, TLS_CA, TLS_CERT
from shared.settings import load_settings


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.Channel:
    """A channel to a trainyard server: TLS when the TLS folder is set (TRAINYARD_TLS_DIR), as the servers do."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    tls_dir = load_settings().tls_dir
    if tls_dir is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, channel_credentials(tls_dir), options=options)


def channel_credentials(tls_dir: Path) -> grpc.ChannelCredentials:
    """Trust the CA in ``tls_dir``: its ca.crt, or its tls.crt when that certificate is self-signed."""
    for name in (TLS_CA, TLS_CERT):
        if (tls_dir / name).is_file():
            return grpc.ssl_channel_credentials(root_certificates=(tls_dir / name).read_bytes())
    raise FileNotFoundError(f"TLS is on (TLS folder {tls_dir}) but neither {TLS_CA} nor {TLS_CERT} is there to "
                            "trust")


def health_status(address: str, service: str = "", timeout: float = 2.0) -> str:
    """The standard health check's answer: SERVING, NOT_SERVING, or UNREACHABLE."""
    with channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "UNKNOWN_SERVICE"
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_serving(address: str, deadline_s: float = 60.0, service: str = "") -> None:
    """Block until the server at ``address`` reports SERVING, or raise TimeoutError."""
    end = time.monotonic() + deadline_s
    status = "UNREACHABLE"
    while time.monotonic() < end:
        status = health_status(address, service, timeout=1.0)
        if status == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {deadline_s:.0f}s (last status {status})")
