"""gRPC servicer of the inference service (Open Inference Protocol v2)."""
from __future__ import annotations

import grpc

from shared.grpc_server import serve, service_arg_parser
from shared.pb import inference_pb2, inference_pb2_grpc


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    pass


def register(server: grpc.Server) -> list[str]:
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(), server)
    return [inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("inference", register, service_arg_parser("inference").parse_args(argv))
