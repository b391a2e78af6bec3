"""gRPC servicer of the train service: thin, it delegates to the domain modules beside it."""
from __future__ import annotations

import grpc

from shared.grpc_server import serve, service_arg_parser
from shared.pb import train_pb2, train_pb2_grpc


class TrainServiceServicer(train_pb2_grpc.TrainServiceServicer):
    pass


def register(server: grpc.Server) -> list[str]:
    train_pb2_grpc.add_TrainServiceServicer_to_server(TrainServiceServicer(), server)
    return [train_pb2.DESCRIPTOR.services_by_name["TrainService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("train", register, service_arg_parser("train").parse_args(argv))
