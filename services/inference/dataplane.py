"""The inference data plane: what the Open Inference Protocol's calls do, whichever wire they came on.

The gRPC servicer (``server.py``) and the REST app (``rest.py``) are codecs over it: both hand it the protocol's
messages (``shared.pb.inference_pb2``; REST turns its JSON and binary tensors into the same messages) and send
back what it returns, so inputs are decoded in one place (``protocol.decode_input``), every request is counted
and timed the same way, and the repository token is checked the same way.

Beyond the core protocol: the model-repository extension (index, load, unload; load/unload need the repository
token), Triton's model configuration (what is applied: batching per model, inputs and outputs) and statistics
(``services.inference.statistics``).
"""
from __future__ import annotations

import hmac
import json
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager

from pydantic import ValidationError

from services.inference import protocol
from services.inference.metrics import families
from services.inference.repository import LoadedModel, ModelRepository, parse_version
from shared.errors import InvalidArgument, NotFound, PermissionDenied, TrainyardError, Unauthenticated
from shared.logs import get_logger
from shared.modelcard import ModelRef, Serving, parse_model_ref
from shared.pb import inference_pb2 as pb
from shared.versions import trainyard_version

log = get_logger(__name__)

SERVER_NAME = "trainyard-inference"
EXTENSIONS = ["model_repository", "model_configuration", "statistics", "binary_tensor_data"]
PLATFORM = "pytorch"
_CONFIG_TYPES = {"UINT8": pb.TYPE_UINT8, "FP32": pb.TYPE_FP32, "BYTES": pb.TYPE_STRING}
_FORMATS = {protocol.INPUT_IMAGES: pb.ModelInput.FORMAT_NHWC, protocol.INPUT_TENSOR: pb.ModelInput.FORMAT_NCHW}
_LOAD_PARAMS = ("version", "alias", "config")
# Sent by tritonclient on every unload; no model here depends on another, so there is nothing more to unload.
_UNLOAD_PARAMS = ("version", "unload_dependents")


def parse_load_config(text: str, name: str) -> Serving:
    """Triton's load-time config override (``load_model(config=...)``) as far as trainyard applies it:
    ``max_batch_size`` and ``dynamic_batching.max_queue_delay_microseconds``. Anything else is refused, not
    silently ignored: the model's inputs, outputs and platform follow from its published card."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"load parameter 'config' is not JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument("load parameter 'config' must be a JSON object (a Triton model config)")
    unknown = sorted(set(cfg) - {"name", "max_batch_size", "dynamic_batching"})
    if unknown:
        raise InvalidArgument(f"load config: only max_batch_size and dynamic_batching.max_queue_delay_microseconds "
                              f"can be set when loading; {unknown} follow from the published model")
    if cfg.get("name", name) != name:
        raise InvalidArgument(f"load config names model {cfg['name']!r}, the request loads {name!r}")
    batching = cfg.get("dynamic_batching", {})
    if not isinstance(batching, dict):
        raise InvalidArgument("load config: dynamic_batching must be an object")
    unknown = sorted(set(batching) - {"max_queue_delay_microseconds", "preferred_batch_size"})
    if unknown or batching.get("preferred_batch_size"):
        raise InvalidArgument("load config: of dynamic_batching only max_queue_delay_microseconds is supported "
                              "(batches grow up to max_batch_size; there are no preferred sizes)")
    delay_us = batching.get("max_queue_delay_microseconds")
    if isinstance(delay_us, str) and delay_us.isdigit():  # protobuf's JSON writes uint64 as a string
        delay_us = int(delay_us)
    if delay_us is not None and (isinstance(delay_us, bool) or not isinstance(delay_us, int)):
        raise InvalidArgument(f"load config: max_queue_delay_microseconds must be an integer, got {delay_us!r}")
    try:
        return Serving(max_batch_size=cfg.get("max_batch_size"),
                       max_queue_delay_ms=None if delay_us is None else delay_us / 1000)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"load config: {problems}") from None


def _check_params(params: Mapping[str, object], allowed: tuple[str, ...], what: str) -> None:
    files = [k for k in params if k.startswith("file:")]
    if files:
        raise InvalidArgument(f"{what}: model files in the request ({', '.join(files)}) are not supported; "
                              "models are published to the artifact store and loaded from there")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InvalidArgument(f"{what}: unknown parameter(s) {unknown}; accepted: {', '.join(allowed)}")


def _typed_param(params: Mapping[str, object], key: str, types: tuple[type, ...]):
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join("int64" if t is int else t.__name__ for t in types)
        raise InvalidArgument(f"parameter {key!r} must be a {names}, got {value!r}")
    return value


class DataPlane:
    """One server's models and the calls on them. ``warmup`` loads the start-up models; the server reports
    ready only after it. Without ``repository_token`` load/unload are refused."""

    def __init__(self, repository: ModelRepository, startup_models: list[ModelRef] | str = (),
                 repository_token: str | None = None):
        self.repository = repository
        self._startup = startup_models
        self._repository_token = repository_token
        self._ready = threading.Event()
        self._requests = families().requests

    def warmup(self) -> None:
        if self._startup == "all":
            loaded = self.repository.load_all_newest()
        else:
            loaded = [self.repository.load(ref.name, ref.version, ref.alias) for ref in self._startup]
        log.info("start-up models ready", extra={"models": [f"{m.name}:{m.version}" for m in loaded]})
        self._ready.set()

    # ---- server

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._ready.is_set()

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=trainyard_version(), extensions=EXTENSIONS)

    # ---- models

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.repository.is_ready(name, version)

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self.repository.get(name, version)
        versions = [str(model.version)] if version else [str(v) for v in self.repository.loaded_versions(model.name)]
        inputs, outputs = _tensors(model)
        return pb.ModelMetadataResponse(name=model.name, versions=versions, platform=PLATFORM, inputs=inputs,
                                        outputs=outputs)

    def model_config(self, name: str, version: str = "") -> pb.ModelConfigResponse:
        """What is applied to the model: batching (from the load request, the card or the server's flags), its
        inputs and outputs (dims without the batch dimension), the versions loaded."""
        model = self.repository.get(name, version)
        inputs, outputs = _tensors(model)
        batching = model.batching
        config = pb.ModelConfig(
            name=model.name, platform=PLATFORM, max_batch_size=batching.max_batch_size,
            input=[pb.ModelInput(name=t.name, data_type=_CONFIG_TYPES[t.datatype],
                                 format=_FORMATS.get(t.name, pb.ModelInput.FORMAT_NONE), dims=t.shape[1:])
                   for t in inputs],
            output=[pb.ModelOutput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:])
                    for t in outputs],
            # Versions are served as loaded (at start-up or through the repository API), not by a rule.
            version_policy=pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(
                versions=self.repository.loaded_versions(model.name))),
        )
        if batching.max_batch_size > 1:  # at 1 requests run one by one: nothing is batched
            config.dynamic_batching.max_queue_delay_microseconds = round(batching.max_queue_delay_ms * 1000)
        return pb.ModelConfigResponse(config=config)

    def model_statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """Every loaded model's statistics (no name), every loaded version of ``name`` (no version), or one."""
        if version:
            models = [self.repository.get(name, version)]
        else:
            models = self.repository.loaded(name or None)
            if name and not models:
                raise NotFound(f"model {name!r} is not loaded")
        return pb.ModelStatisticsResponse(model_stats=[m.stats.to_pb(m.name, m.version) for m in models])

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        with self._counted() as label:
            model = self.repository.get(request.model_name, request.model_version)
            label.update(model=model.name, version=str(model.version))
            started = time.perf_counter_ns()
            try:
                outputs = protocol.requested_outputs(request, model.signature)
                x = protocol.decode_input(request, model.signature, model.batching.max_batch_size)
                decoded = time.perf_counter_ns()
                results = model.infer(x)
                inferred = time.perf_counter_ns()
                response = protocol.encode_response(request, model.name, model.version, model.classes, results,
                                                    outputs)
            except BaseException:
                model.stats.request_failed(time.perf_counter_ns() - started)
                raise
            done = time.perf_counter_ns()
            model.stats.request_succeeded(samples=x.shape[0], total_ns=done - started, input_ns=decoded - started,
                                          output_ns=done - inferred)
            return response

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

    def repository_index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        M = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            M(name=e.name, version=str(e.version), state=e.state, reason=e.reason)
            for e in self.repository.index(ready_only=ready_only)
        ])

    def authorize(self, authorization: str | None) -> None:
        """Load/unload change what every client is served: only holders of the repository token may call them.
        ``authorization`` is the request's Authorization header (gRPC metadata or HTTP)."""
        if not self._repository_token:
            raise PermissionDenied("repository control (model load/unload) is disabled on this server: start it "
                                   "with TRAINYARD_REPOSITORY_TOKEN set to enable it")
        if not authorization:
            raise Unauthenticated("repository control needs the repository token: send 'authorization: Bearer "
                                  "<token>' (InferenceClient sends TRAINYARD_REPOSITORY_TOKEN)")
        # Constant time: how much of a guess matched must not show in the answer's timing.
        if not hmac.compare_digest(authorization.encode(), f"Bearer {self._repository_token}".encode()):
            raise Unauthenticated("repository control: the bearer token is not the repository token")

    def load(self, model_name: str, params: Mapping[str, object]) -> LoadedModel:
        """Load a model: the name may be a reference (``models:/name@champion``); parameters ``version`` (string
        or int64), ``alias`` and ``config`` (Triton's JSON config override: batching only)."""
        _check_params(params, _LOAD_PARAMS, "load")
        ref = parse_model_ref(model_name)
        version = parse_version(_typed_param(params, "version", (str, int)))
        alias = _typed_param(params, "alias", (str,)) or None
        config = _typed_param(params, "config", (str,))
        serving = parse_load_config(config, ref.name) if config else None
        return self.repository.load(ref.name, version or ref.version, alias or ref.alias, serving)

    def unload(self, model_name: str, params: Mapping[str, object]) -> list[int]:
        _check_params(params, _UNLOAD_PARAMS, "unload")
        _typed_param(params, "unload_dependents", (bool,))
        return self.repository.unload(model_name, parse_version(_typed_param(params, "version", (str, int))))


def _tensors(model: LoadedModel) -> tuple[list, list]:
    """The model's input and output tensors as the protocol describes them (-1: any size)."""
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
    return inputs, outputs
