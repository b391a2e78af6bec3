"""gRPC servicer of the inference service: the Open Inference Protocol v2 (KServe / Triton)
``inference.GRPCInferenceService``, with the model-repository extension and Triton's ModelConfig and
ModelStatistics; ``--http-port`` serves the same data plane over the protocol's REST flavour (``rest.py``).

Any KServe v2 or Triton gRPC client works unchanged; the wire format (inputs ``images`` / ``tensor`` /
``encoded``, outputs ``probabilities`` / ``labels``) is in ``services.inference.protocol``, what the calls do in
``services.inference.dataplane``. ``model_version`` selects a loaded version, empty means the newest loaded one.
RepositoryModelLoad/Unload take an optional ``version`` parameter (string or int64); they change what every
client is served, so they need the repository token (``authorization: Bearer <token>`` metadata) and are refused
on a server that has none.
"""
from __future__ import annotations

import argparse
import functools
import os

import grpc
import torch

from services.inference import protocol, rest
from services.inference.dataplane import DataPlane
from services.inference.repository import ModelRepository, default_threads, parse_model_specs
from shared import logs
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, ServiceHost, serve, service_arg_parser, start
from shared.modelcard import ModelRef
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.settings import load_settings
from shared.storage import open_store

log = logs.get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
AUTHORIZATION_HEADER = "authorization"


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    """The gRPC codec over the data plane: every call hands its request to ``DataPlane`` as it came."""

    def __init__(self, dataplane: DataPlane):
        self.dataplane = dataplane

    # ---- server

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dataplane.live())

    def ServerReady(self, request, context):
        # Draining is covered too: the bootstrap stops accepting calls when health goes NOT_SERVING.
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    def ServerMetadata(self, request, context):
        return self.dataplane.server_metadata()

    # ---- models

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    def ModelMetadata(self, request, context):
        return self.dataplane.model_metadata(request.name, request.version)

    def ModelConfig(self, request, context):
        return self.dataplane.model_config(request.name, request.version)

    def ModelStatistics(self, request, context):
        return self.dataplane.model_statistics(request.name, request.version)

    def ModelInfer(self, request, context):
        return self.dataplane.infer(request)

    # ---- repository extension

    def RepositoryIndex(self, request, context):
        return self.dataplane.repository_index(request.ready)

    def RepositoryModelLoad(self, request, context):
        self.dataplane.authorize(dict(context.invocation_metadata()).get(AUTHORIZATION_HEADER))
        self.dataplane.load(request.model_name, protocol.repository_params(request.parameters))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self.dataplane.authorize(dict(context.invocation_metadata()).get(AUTHORIZATION_HEADER))
        self.dataplane.unload(request.model_name, protocol.repository_params(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def register(server: grpc.Server, servicer: InferenceServicer | None = None) -> list[str]:
    if servicer is None:
        servicer = InferenceServicer(DataPlane(ModelRepository(open_store())))
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]


def start_server(repository: ModelRepository, models: list[ModelRef] | str = (), *,
                 port: int = 0, metrics_port: int | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 repository_token: str | None = None) -> tuple[ServiceHost, InferenceServicer]:
    """Start the service in this process (tests, benchmarks); health turns SERVING once ``models`` load.
    Without ``repository_token`` load/unload are refused. Stop with ``host.stop()`` then ``repository.close()``;
    ``rest.start_http(servicer.dataplane)`` adds the REST API."""
    servicer = InferenceServicer(DataPlane(repository, models, repository_token))
    host = start("inference", functools.partial(register, servicer=servicer), port=port,
                 metrics_port=metrics_port, max_message_bytes=max_message_bytes, warmup=servicer.dataplane.warmup)
    return host, servicer


def build_parser() -> argparse.ArgumentParser:
    parser = service_arg_parser("inference")
    parser.add_argument("--store", default=None, help="artifact store URL (default: $TRAINYARD_STORE)")
    parser.add_argument("--models", default=os.environ.get("TRAINYARD_SERVE_MODELS", ""),
                        help="models to load at start-up: name[:version] or name@alias (an MLflow registry alias, "
                             "e.g. champion),... or 'all' (newest version of every published model); default "
                             "$TRAINYARD_SERVE_MODELS")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="most samples one dynamic batch merges, for models whose card sets none; 1 turns "
                             "batching off")
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                        help="longest a request waits for others to join its batch, for models whose card sets none")
    parser.add_argument("--http-port", type=int, default=None,
                        help="also serve the protocol's REST API (/v2/...) on this port, same models (default: off)")
    parser.add_argument("--quantize", action="store_true", help="int8 dynamic quantization of Linear layers (CPU)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch intra-op threads (default: the CPUs this process may use, less one)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    # One batch at a time runs per model; its threads share the machine with request handling.
    torch.set_num_threads(max(1, args.threads))
    settings = load_settings()
    repository = ModelRepository(open_store(args.store), max_batch_size=args.max_batch_size,
                                 max_queue_delay_ms=args.max_queue_delay_ms, quantize=args.quantize)
    dataplane = DataPlane(repository, parse_model_specs(args.models), settings.repository_token)
    http = None
    if args.http_port is not None:
        http = rest.start_http(dataplane, port=args.http_port, host=args.host,
                               max_body_bytes=args.max_message_mb * 1024 * 1024, max_in_flight=args.max_workers,
                               tls_dir=args.tls_dir or settings.tls_dir)

    def stop() -> None:
        # After gRPC has drained: REST requests in flight finish, then the models go.
        if http is not None:
            http.stop(args.grace)
        repository.close()

    serve("inference", functools.partial(register, servicer=InferenceServicer(dataplane)), args,
          warmup=dataplane.warmup, on_stop=stop)
