"""gRPC servicer of the benchmark service: thin, it delegates to the domain modules beside it."""
from __future__ import annotations

import grpc

from shared.grpc_server import serve, service_arg_parser
from shared.pb import benchmark_pb2, benchmark_pb2_grpc


class BenchmarkServiceServicer(benchmark_pb2_grpc.BenchmarkServiceServicer):
    pass


def register(server: grpc.Server) -> list[str]:
    benchmark_pb2_grpc.add_BenchmarkServiceServicer_to_server(BenchmarkServiceServicer(), server)
    return [benchmark_pb2.DESCRIPTOR.services_by_name["BenchmarkService"].full_name]


def main(argv: list[str] | None = None) -> None:
    serve("benchmark", register, service_arg_parser("benchmark").parse_args(argv))
