"""gRPC servicer of the inference service: the Open Inference Protocol v2 (KServe / Triton)
``inference.GRPCInferenceService``, with the model-repository extension.

Any KServe v2 or Triton gRPC client works unchanged:
- inputs (exactly one per request): ``images`` UINT8 [N, H, W, C] (any size; resized and normalised here),
  ``tensor`` FP32 [N, C, H, W] (already preprocessed, used as is), ``encoded`` BYTES [N] (PNG/JPEG files,
  decoded here). Tensors travel in ``raw_input_contents``; typed ``contents`` are accepted too.
- outputs: ``probabilities`` FP32 [N, classes] and ``labels`` BYTES [N] (top-1 class name), or [N, k]
  when the requested ``labels`` output carries the parameter ``top_k``; always in ``raw_output_contents``.
- versions: ``model_version`` selects a loaded version, empty means the newest loaded one.
- RepositoryModelLoad/Unload take an optional ``version`` parameter (string or int64).
"""
from __future__ import annotations

import argparse
import functools
import os
import threading
from importlib import metadata

import grpc
import numpy as np
import torch

from services.inference.batcher import families
from services.inference.preprocess import (
    INPUT_DATATYPES,
    INPUT_ENCODED,
    INPUT_IMAGES,
    INPUT_TENSOR,
    tensor_from_raw,
)
from services.inference.repository import (
    ModelRepository,
    default_threads,
    parse_model_specs,
    parse_version,
)
from shared.bytes_tensor import deserialize_bytes_tensor, serialize_bytes_tensor
from shared.errors import InvalidArgument, TrainyardError
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, ServiceHost, serve, service_arg_parser, start
from shared.logs import get_logger
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.storage import open_store

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "trainyard-inference"
OUTPUT_PROBS = "probabilities"
OUTPUT_LABELS = "labels"
_OUTPUTS = (OUTPUT_PROBS, OUTPUT_LABELS)


def _server_version() -> str:
    try:
        return metadata.version("trainyard")
    except metadata.PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "0+unknown"


def _int_param(p: pb.InferParameter, what: str) -> int:
    kind = p.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(p, kind))
    if kind == "string_param" and p.string_param.strip().isdigit():
        return int(p.string_param)
    raise InvalidArgument(f"{what} must be an integer parameter")


def _repo_version(params) -> int | None:
    """The ``version`` parameter of a repository load/unload request (string or int64), if any."""
    if "version" not in params:
        return None
    p = params["version"]
    kind = p.WhichOneof("parameter_choice")
    if kind == "string_param":
        return parse_version(p.string_param)
    if kind == "int64_param":
        return parse_version(p.int64_param)
    raise InvalidArgument("parameter 'version' must be a string or int64")


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: ModelRepository, startup_models: list[tuple[str, int | None]] | str = ()):
        self.repository = repository
        self._startup = startup_models
        self._ready = threading.Event()
        self._requests = families().requests

    def warmup(self) -> None:
        """Load the start-up models; the server reports ready (and health SERVING) only after this."""
        if self._startup == "all":
            loaded = self.repository.load_all_newest()
        else:
            loaded = [self.repository.load(name, version) for name, version in self._startup]
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
        c, h, w = model.input_size
        T = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=versions,
            platform="pytorch",
            inputs=[T(name=INPUT_IMAGES, datatype="UINT8", shape=[-1, -1, -1, -1]),
                    T(name=INPUT_TENSOR, datatype="FP32", shape=[-1, c, h, w]),
                    T(name=INPUT_ENCODED, datatype="BYTES", shape=[-1])],
            outputs=[T(name=OUTPUT_PROBS, datatype="FP32", shape=[-1, len(model.classes)]),
                     T(name=OUTPUT_LABELS, datatype="BYTES", shape=[-1])],
        )

    def ModelInfer(self, request, context):
        label = {"model": "unknown", "version": ""}
        try:
            model = self.repository.get(request.model_name, request.model_version)
            label = {"model": model.name, "version": str(model.version)}
            x = self._input(request, model)
            outputs = self._requested_outputs(request, len(model.classes))
            probs = model.infer(x)
            response = self._response(request, model, probs, outputs)
        except TrainyardError as exc:
            self._requests.labels(status=exc.code.name, **label).inc()
            raise
        except Exception:
            self._requests.labels(status="INTERNAL", **label).inc()
            raise
        self._requests.labels(status="OK", **label).inc()
        return response

    def _input(self, request: pb.ModelInferRequest, model) -> torch.Tensor:
        if len(request.inputs) != 1:
            raise InvalidArgument(f"send exactly one input ({INPUT_IMAGES} UINT8 NHWC, {INPUT_TENSOR} FP32 NCHW "
                                  f"or {INPUT_ENCODED} BYTES), got {len(request.inputs)}")
        inp = request.inputs[0]
        expected = INPUT_DATATYPES.get(inp.name)
        if expected is None:
            raise InvalidArgument(f"unknown input {inp.name!r}: use {', '.join(INPUT_DATATYPES)}")
        if inp.datatype != expected:
            raise InvalidArgument(f"input {inp.name!r} must be {expected}, got datatype {inp.datatype!r}")
        shape = list(inp.shape)
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
            if inp.HasField("contents"):
                raise InvalidArgument(f"input {inp.name!r} has both contents and raw_input_contents")
            raw = request.raw_input_contents[0]
            if inp.name == INPUT_ENCODED:
                return model.preprocessor.from_encoded(deserialize_bytes_tensor(raw, self._batch_of_blobs(shape)))
            arr = tensor_from_raw(inp.name, expected, shape, raw)
        else:
            arr = self._from_contents(inp, shape)
            if inp.name == INPUT_ENCODED:
                return model.preprocessor.from_encoded(arr)
        if inp.name == INPUT_TENSOR:
            return model.preprocessor.from_tensor(arr)
        return model.preprocessor.from_images(arr)

    @staticmethod
    def _batch_of_blobs(shape: list[int]) -> int:
        if len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
            if shape[0] < 1:
                raise InvalidArgument(f"input {INPUT_ENCODED!r} has an empty batch")
            return shape[0]
        raise InvalidArgument(f"input {INPUT_ENCODED!r} must have shape [N] or [N, 1], got {shape}")

    def _from_contents(self, inp, shape: list[int]):
        """Typed ``contents`` (the non-raw form): UINT8 travels in uint_contents, FP32 in fp32_contents."""
        c = inp.contents
        if inp.name == INPUT_ENCODED:
            blobs = list(c.bytes_contents)
            if len(blobs) != self._batch_of_blobs(shape):
                raise InvalidArgument(f"input {inp.name!r}: {len(blobs)} bytes_contents for shape {shape}")
            return blobs
        if inp.name == INPUT_IMAGES:
            values = np.asarray(c.uint_contents, dtype=np.uint32)
            if values.size and values.max() > 255:
                raise InvalidArgument(f"input {inp.name!r}: UINT8 contents hold values above 255")
            values = values.astype(np.uint8)
        else:
            values = np.asarray(c.fp32_contents, dtype=np.float32)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(d < 0 for d in shape) or values.size != count:
            raise InvalidArgument(f"input {inp.name!r}: {values.size} values in contents, "
                                  f"shape {shape} needs {count}")
        return values.reshape(shape)

    @staticmethod
    def _requested_outputs(request: pb.ModelInferRequest, num_classes: int) -> dict[str, int]:
        """Output name -> top_k (labels only; 0 = top-1 as [N]). All outputs when none are named."""
        if not request.outputs:
            return {OUTPUT_PROBS: 0, OUTPUT_LABELS: 0}
        out: dict[str, int] = {}
        for o in request.outputs:
            if o.name not in _OUTPUTS:
                raise InvalidArgument(f"unknown output {o.name!r}: this model has {', '.join(_OUTPUTS)}")
            top_k = 0
            if o.name == OUTPUT_LABELS and "top_k" in o.parameters:
                top_k = _int_param(o.parameters["top_k"], "output 'labels' parameter top_k")
                if top_k < 1:
                    raise InvalidArgument(f"top_k must be >= 1, got {top_k}")
                top_k = min(top_k, num_classes)
            out[o.name] = top_k
        return out

    @staticmethod
    def _response(request, model, probs: torch.Tensor, outputs: dict[str, int]) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
        n, k = probs.shape
        for name, top_k in outputs.items():
            if name == OUTPUT_PROBS:
                response.outputs.add(name=name, datatype="FP32", shape=[n, k])
                response.raw_output_contents.append(probs.numpy().tobytes())
            else:
                classes = model.classes
                if top_k:
                    idx = torch.topk(probs, top_k, dim=1).indices
                    shape = [n, top_k]
                else:
                    idx = probs.argmax(dim=1)
                    shape = [n]
                names = [classes[i].encode() for i in idx.reshape(-1).tolist()]
                response.outputs.add(name=name, datatype="BYTES", shape=shape)
                response.raw_output_contents.append(serialize_bytes_tensor(names))
        return response

    # ---- repository extension

    def RepositoryIndex(self, request, context):
        M = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            M(name=e.name, version=str(e.version), state=e.state, reason=e.reason)
            for e in self.repository.index(ready_only=request.ready)
        ])

    def RepositoryModelLoad(self, request, context):
        self.repository.load(request.model_name, _repo_version(request.parameters))
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request, context):
        self.repository.unload(request.model_name, _repo_version(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def register(server: grpc.Server, servicer: InferenceServicer | None = None) -> list[str]:
    if servicer is None:
        servicer = InferenceServicer(ModelRepository(open_store()))
    inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return [SERVICE_NAME]


def start_server(repository: ModelRepository, models: list[tuple[str, int | None]] | str = (), *,
                 port: int = 0, metrics_port: int | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[ServiceHost, InferenceServicer]:
    """Start the service in this process (tests, benchmarks); health turns SERVING once ``models`` load.
    Stop with ``host.stop()`` then ``repository.close()``."""
    servicer = InferenceServicer(repository, models)
    host = start("inference", functools.partial(register, servicer=servicer), port=port,
                 metrics_port=metrics_port, max_message_bytes=max_message_bytes, warmup=servicer.warmup)
    return host, servicer


def build_parser() -> argparse.ArgumentParser:
    parser = service_arg_parser("inference")
    parser.add_argument("--store", default=None, help="artifact store URL (default: $TRAINYARD_STORE)")
    parser.add_argument("--models", default=os.environ.get("TRAINYARD_SERVE_MODELS", ""),
                        help="models to load at start-up: name[:version],... or 'all' (newest version of "
                             "every published model); default $TRAINYARD_SERVE_MODELS")
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
    servicer = InferenceServicer(repository, parse_model_specs(args.models))
    serve("inference", functools.partial(register, servicer=servicer), args, warmup=servicer.warmup,
          on_stop=repository.close)
