"""The platform's gRPC services in the test process, on a free loopback port: the real servicers behind the
real interceptors (``shared.grpc_server.start``), for tests that talk to a service as a client does."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import grpc

from services.render.server import RenderServiceServicer
from services.train.runs import RunManager
from services.train.server import TrainServiceServicer
from services.train.studies.manager import StudyManager
from shared.grpc_client import channel
from shared.grpc_server import start
from shared.pb import render_pb2, render_pb2_grpc, train_pb2, train_pb2_grpc


def register_render(server: grpc.Server, default_workers: int = 1) -> list[str]:
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServiceServicer(default_workers), server)
    return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]


def train_registrar(runs: RunManager, studies: StudyManager | None = None) -> Callable[[grpc.Server], list[str]]:
    """Registers the train service over ``runs`` (and ``studies``, when it serves them)."""
    def register(server: grpc.Server) -> list[str]:
        train_pb2_grpc.add_TrainServiceServicer_to_server(TrainServiceServicer(runs, studies), server)
        return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]
    return register


@contextlib.contextmanager
def served(name: str, register: Callable[[grpc.Server], list[str]], grace: float = 5) -> Iterator[str]:
    """The address of service ``name`` (registered by ``register``), stopped when the block ends."""
    host = start(name, register, port=0)
    try:
        yield f"127.0.0.1:{host.port}"
    finally:
        host.stop(grace=grace)


@contextlib.contextmanager
def serving(name: str, register: Callable[[grpc.Server], list[str]]) -> Iterator[grpc.Channel]:
    """A channel to service ``name`` (registered by ``register``), stopped when the block ends."""
    with served(name, register) as address, channel(address) as ch:
        yield ch
