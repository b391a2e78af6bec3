"""gRPC servicer of the render service: thin, it delegates to the domain modules beside it."""
from __future__ import annotations

import grpc

from shared.grpc_server import serve, service_arg_parser
from shared.pb import render_pb2, render_pb2_grpc


class RenderServiceServicer(render_pb2_grpc.RenderServiceServicer):
    pass


def register(server: grpc.Server) -> list[str]:
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServiceServicer(), server)
    return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("render", register, service_arg_parser("render").parse_args(argv))
