"""An in-process inference server over a store's published models, for the tests that call it over gRPC."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.grpc_client import wait_serving
from shared.modelcard import ModelRef


@contextmanager
def serving(store, *models: str, max_batch_size: int = 8, max_queue_delay_ms: float = 2.0) -> Iterator[str]:
    """Serve the newest version of each named model; yields the server's address, stops it on exit."""
    repo = ModelRepository(store, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms)
    host, _ = start_server(repo, [ModelRef(name) for name in models])
    address = f"127.0.0.1:{host.port}"
    try:
        wait_serving(address, deadline_s=120)
        yield address
    finally:
        host.stop(grace=2)
        repo.close()
