"""gRPC servicer of the convert service: thin, it delegates to the domain modules beside it."""
from __future__ import annotations

import grpc

from shared.grpc_server import serve, service_arg_parser
from shared.pb import convert_pb2, convert_pb2_grpc


class ConvertServiceServicer(convert_pb2_grpc.ConvertServiceServicer):
    pass


def register(server: grpc.Server) -> list[str]:
    convert_pb2_grpc.add_ConvertServiceServicer_to_server(ConvertServiceServicer(), server)
    return [convert_pb2.DESCRIPTOR.services_by_name["ConvertService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("convert", register, service_arg_parser("convert").parse_args(argv))
