"""gRPC servicer of the inference service: the Open Inference Protocol v2 (KServe / Triton)
``inference.GRPCInferenceService``, with the model-repository extension.

Any KServe v2 or Triton gRPC client works unchanged; the wire format (inputs ``images`` / ``tensor`` /
``encoded``, outputs ``probabilities`` / ``labels``) is in ``services.inference.protocol``. ``model_version``
selects a loaded version, empty means the newest loaded one. RepositoryModelLoad/Unload take an optional
``version`` parameter (string or int64); they change what every client is served, so they need the repository
token (``authorization: Bearer <token>`` metadata) and are refused on a server that has none.
"""
from __future__ import annotations

import argparse
import functools
import hmac
import os
import threading
from contextlib import contextmanager
from importlib import metadata

import grpc
import torch

from services.inference import protocol
from services.inference.batcher import families
from services.inference.repository import ModelRepository, default_threads, parse_model_specs, parse_version
from shared.errors import PermissionDenied, TrainyardError, Unauthenticated
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, ServiceHost, serve, service_arg_parser, start
from shared.logs import get_logger
from shared.modelcard import ModelRef, parse_model_ref
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.settings import load_settings
from shared.storage import open_store

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "trainyard-inference"
AUTHORIZATION_HEADER = "authorization"


def _server_version() -> str:
    try:
        return metadata.version("trainyard")
    except metadata.PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "0+unknown"


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, startup_models: list[ModelRef] | str = (),
                 repository_token: str | None = None):
        self.repository = repository
        self._repository_token = repository_token
        self._startup = startup_models
        self._ready = threading.Event()
        self._requests = families().requests

    def warmup(self) -> None:
        """Load the start-up models; the server reports ready (and health SERVING) only after this."""
        if self._startup == "all":
            loaded = self.repository.load_all_newest()
        else:
            loaded = [self.repository.load(ref.name, ref.version, ref.alias) for ref in self._startup]
        log.info("start-up models ready", extra={"models": [f"{m.name}:{m.version}" for m in loaded]})
        self._ready.set()

    # ---- server

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        # Draining is covered too: the bootstrap stops accepting calls when health goes NOT_SERVING.
        return pb.ServerReadyResponse(ready=self._ready.is_set())

    def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(),
                                         extensions=["model_repository"])

    # ---- models

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.repository.is_ready(request.name, request.version))

    def ModelMetadata(self, request, context):
        model = self.repository.get(request.name, request.version)
        versions = [str(model.version)] if request.version else \
            [str(v) for v in self.repository.loaded_versions(model.name)]
        T = pb.ModelMetadataResponse.TensorMetadata
        sig, task = model.signature, model.card.task
        if task == "trajectory":
            inputs = [T(name=protocol.INPUT_VIDEOS, datatype="UINT8", shape=[-1, *sig.clip_shape])]
        else:
            inputs = [T(name=protocol.INPUT_IMAGES, datatype="UINT8", shape=[-1, -1, -1, -1])]
            if task == "classification":
                inputs.append(T(name=protocol.INPUT_TENSOR, datatype="FP32", shape=[-1, *sig.input_shape]))
            inputs.append(T(name=protocol.INPUT_ENCODED, datatype="BYTES", shape=[-1]))
        if task == "captioning":
            outputs = [T(name=protocol.OUTPUT_TEXT, datatype="BYTES", shape=[-1])]
        else:
            outputs = [T(name=protocol.OUTPUT_PROBS, datatype="FP32", shape=[-1, len(model.classes)]),
                       T(name=protocol.OUTPUT_LABELS, datatype="BYTES", shape=[-1])]
        if task == "trajectory":
            outputs.append(T(name=protocol.OUTPUT_POSITION, datatype="FP32", shape=[-1, 3]))
        return pb.ModelMetadataResponse(name=model.name, versions=versions, platform="pytorch", inputs=inputs,
                                        outputs=outputs)

    def ModelInfer(self, request, context):
        with self._counted() as label:
            model = self.repository.get(request.model_name, request.model_version)
            label.update(model=model.name, version=str(model.version))
            x = protocol.decode_input(request, model.signature, model.batcher.max_batch_size)
            outputs = protocol.requested_outputs(request, model.signature)
            return protocol.encode_response(request, model.name, model.version, model.classes, model.infer(x),
                                            outputs)

    @contextmanager
    def _counted(self):
        """Counts the request by model and final status; the body fills in the model once it is known."""
        label = {"model": "unknown", "version": ""}
        try:
            yield label
        except TrainyardError as exc:
            self._requests.labels(status=exc.code.name, **label).inc()
            raise
        except Exception:
            self._requests.labels(status="INTERNAL", **label).inc()
            raise
        self._requests.labels(status="OK", **label).inc()

    # ---- repository extension

    def RepositoryIndex(self, request, context):
        M = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            M(name=e.name, version=str(e.version), state=e.state, reason=e.reason)
            for e in self.repository.index(ready_only=request.ready)
        ])

    def _authorize_repository_control(self, context) -> None:
        """Load/unload change what every client is served: only holders of the repository token may call them."""
        if not self._repository_token:
            raise PermissionDenied("repository control (RepositoryModelLoad/Unload) is disabled on this server: "
                                   "start it with TRAINYARD_REPOSITORY_TOKEN set to enable it")
        sent = dict(context.invocation_metadata()).get(AUTHORIZATION_HEADER)
        if not sent:
            raise Unauthenticated("repository control needs the repository token: send 'authorization: Bearer "
                                  "<token>' metadata (InferenceClient sends TRAINYARD_REPOSITORY_TOKEN)")
        # Constant time: how much of a guess matched must not show in the answer's timing.
        if not hmac.compare_digest(sent.encode(), f"Bearer {self._repository_token}".encode()):
            raise Unauthenticated("repository control: the bearer token is not the repository token")

    def RepositoryModelLoad(self, request, context):
        self._authorize_repository_control(context)
        # The name may be a reference (``models:/name@champion``); a ``version`` or ``alias`` parameter too.
        ref = parse_model_ref(request.model_name)
        version = parse_version(protocol.repository_version(request.parameters))
        alias = protocol.string_param(request.parameters, "alias")
        self.repository.load(ref.name, version or ref.version, alias or ref.alias)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self._authorize_repository_control(context)
        self.repository.unload(request.model_name, parse_version(protocol.repository_version(request.parameters)))
        return pb.RepositoryModelUnloadResponse()


def register(server: grpc.Server, servicer: InferenceServicer | None = None) -> list[str]:
    if servicer is None:
        servicer = InferenceServicer(ModelRepository(open_store()))
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]


def start_server(repository: ModelRepository, models: list[ModelRef] | str = (), *,
                 port: int = 0, metrics_port: int | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 repository_token: str | None = None) -> tuple[ServiceHost, InferenceServicer]:
    """Start the service in this process (tests, benchmarks); health turns SERVING once ``models`` load.
    Without ``repository_token`` load/unload are refused. Stop with ``host.stop()`` then ``repository.close()``."""
    servicer = InferenceServicer(repository, models, repository_token)
    host = start("inference", functools.partial(register, servicer=servicer), port=port,
                 metrics_port=metrics_port, max_message_bytes=max_message_bytes, warmup=servicer.warmup)
    return host, servicer


def build_parser() -> argparse.ArgumentParser:
    parser = service_arg_parser("inference")
    parser.add_argument("--store", default=None, help="artifact store URL (default: $TRAINYARD_STORE)")
    parser.add_argument("--models", default=os.environ.get("TRAINYARD_SERVE_MODELS", ""),
                        help="models to load at start-up: name[:version] or name@alias (an MLflow registry alias, "
                             "e.g. champion),... or 'all' (newest version of every published model); default "
                             "$TRAINYARD_SERVE_MODELS")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="most samples one dynamic batch merges; 1 turns batching off")
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                        help="longest a request waits for others to join its batch")
    parser.add_argument("--quantize", action="store_true", help="int8 dynamic quantization of Linear layers (CPU)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="torch intra-op threads (default: the CPUs this process may use, less one)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # One batch at a time runs per model; its threads share the machine with request handling.
    torch.set_num_threads(max(1, args.threads))
    repository = ModelRepository(open_store(args.store), max_batch_size=args.max_batch_size,
                                 max_queue_delay_ms=args.max_queue_delay_ms, quantize=args.quantize)
    servicer = InferenceServicer(repository, parse_model_specs(args.models), load_settings().repository_token)
    serve("inference", functools.partial(register, servicer=servicer), args, warmup=servicer.warmup,
          on_stop=repository.close)
