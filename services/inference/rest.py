"""The Open Inference Protocol's REST flavour (KServe v2 / Triton HTTP) over the same data plane as gRPC.

Routes: ``GET /v2`` (server metadata), ``/v2/health/live|ready``, ``/v2/models/{name}[/versions/{v}]``
(metadata) with ``/ready``, ``/config`` and ``/stats`` (and ``/v2/models/stats`` for every model), ``POST
.../infer``, ``POST /v2/repository/index`` and ``/v2/repository/models/{name}/load|unload`` (the repository token
in the ``Authorization`` header, as over gRPC).

This module is a codec only: JSON (and the binary tensor-data extension) in, the protocol's messages to
``DataPlane``, its messages back out as JSON. Inputs: JSON ``data`` becomes the message's typed ``contents``;
binary data (``binary_data_size`` parameters, the JSON header's length in ``Inference-Header-Content-Length``)
becomes ``raw_input_contents``; ``protocol.decode_input`` decodes both. Outputs go back as binary when the
output's ``binary_data`` parameter (or the request's ``binary_data_output``) asks for it, else as JSON ``data``
(BYTES as UTF-8 strings). Failures are ``{"error": message}`` with the HTTP status of the gRPC code.

Stack: Starlette on uvicorn. Starlette is the maintained ASGI toolkit under FastAPI; the routes read raw bodies
(the binary extension) and write the protocol's own JSON, so FastAPI's request models and OpenAPI would add a
layer and no checks. uvicorn serves it from a thread of the gRPC process, on its own event loop; blocking work
(decoding, the batcher's wait) runs in worker threads, at most ``--max-workers`` at once (more are refused with
429 at once, health exempt, like gRPC's admission).
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.inference.dataplane import DataPlane
from services.inference.metrics import families
from shared import logs
from shared.bytes_tensor import deserialize_bytes_tensor
from shared.errors import InvalidArgument, TrainyardError, client_message
from shared.grpc_server import DEFAULT_MAX_MESSAGE_BYTES, REQUEST_ID_HEADER, TLS_CERT, TLS_KEY, Admission
from shared.pb import inference_pb2 as pb

log = logs.get_logger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
# google.rpc's mapping of status codes to HTTP (the one gRPC-JSON gateways use).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# The typed ``contents`` field each datatype's JSON values go into (as the gRPC protocol defines them).
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
             "BYTES": "bytes_contents"}
_JSON_OUTPUT_DTYPES = {"FP32": "<f4"}  # the numeric outputs the models give (the rest are BYTES)


# ---------------------------------------------------------------------------------------------- JSON codec

def to_json(msg) -> dict:
    """A protocol message as the REST API writes it: the proto's field names, 64-bit integers as numbers
    (protobuf's JSON mapping writes them as strings, Triton's REST API does not), enums by name, unset message
    fields left out."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if f.message_type is not None:
            if f.is_repeated:
                out[f.name] = [to_json(v) for v in value]
            elif msg.HasField(f.name):
                out[f.name] = to_json(value)
        elif f.enum_type is not None:
            out[f.name] = f.enum_type.values_by_number[value].name
        else:
            out[f.name] = list(value) if f.is_repeated else value
    return out


def _set_param(p: pb.InferParameter, key: str, value) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if not -2**63 <= value < 2**64:
            raise InvalidArgument(f"parameter {key!r}: {value} does not fit 64 bits")
        if value < 2**63:
            p.int64_param = value
        else:
            p.uint64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise InvalidArgument(f"parameter {key!r} must be a boolean, number or string, got {type(value).__name__}")


def _params(obj: dict, where: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where}: parameters must be an object")
    return dict(params)


def _flatten(data) -> list:
    """Row-major values of a JSON tensor, nested or already flat (iteratively: no recursion limit to hit)."""
    if not isinstance(data, list):
        return [data]
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _fill_contents(tensor, datatype: str, data) -> None:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidArgument(f"input {tensor.name!r}: datatype {datatype!r} cannot travel as JSON data; send it as "
                              "binary data")
    values = _flatten(data)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise InvalidArgument(f"input {tensor.name!r}: BYTES JSON data must be strings; send binary content "
                                  "(encoded images) as binary data")
        values = [v.encode() for v in values]
    elif datatype == "BOOL":
        if not all(isinstance(v, bool) for v in values):
            raise InvalidArgument(f"input {tensor.name!r}: BOOL data must be true/false")
    elif datatype.startswith("FP"):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise InvalidArgument(f"input {tensor.name!r}: {datatype} data must be numbers")
    elif not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InvalidArgument(f"input {tensor.name!r}: {datatype} data must be integers")
    try:
        getattr(tensor.contents, field).extend(values)
    except (ValueError, TypeError) as exc:  # out of the field's range, e.g. a negative UINT8
        raise InvalidArgument(f"input {tensor.name!r}: {datatype} data out of range: {exc}") from None


def _json_object(header: bytes, what: str) -> dict:
    try:
        doc = json.loads(header) if header.strip() else {}
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"{what}: the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what}: the body must be a JSON object")
    return doc


@dataclass
class InferCall:
    """An infer request as the protocol's message, and how each output goes back (binary or JSON)."""

    request: pb.ModelInferRequest
    binary: dict[str, bool]
    binary_default: bool

    def wants_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_default)


def decode_infer(body: bytes, header_length: str | None, model: str, version: str) -> InferCall:
    """A REST infer body (JSON, or a JSON header followed by binary tensors) -> a ModelInferRequest."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidArgument(f"{HEADER_LENGTH} must be the JSON header's byte length (at most the body's "
                                  f"{len(body)} bytes), got {header_length!r}")
        header, binary = body[:int(header_length)], body[int(header_length):]
    doc = _json_object(header, "infer")
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id", "")))
    params = _params(doc, "infer")
    binary_default = params.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be true or false")
    for key, value in params.items():
        _set_param(request.parameters[key], key, value)
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("infer: 'inputs' must be a non-empty list of tensors")
    offset, raw = 0, []
    for i, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise InvalidArgument(f"infer: input {i} must be an object")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) or \
                not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"infer: input {i} needs a name, a datatype and a shape (a list of integers)")
        tensor = request.inputs.add(name=name, datatype=datatype)
        try:
            tensor.shape.extend(shape)
        except ValueError:
            raise InvalidArgument(f"input {name!r}: shape {shape} does not fit int64") from None
        input_params = _params(spec, f"input {name!r}")
        size = input_params.pop("binary_data_size", None)
        for key, value in input_params.items():
            _set_param(tensor.parameters[key], key, value)
        if size is None:
            if "data" not in spec:
                raise InvalidArgument(f"input {name!r} has neither 'data' nor a binary_data_size parameter")
            _fill_contents(tensor, datatype, spec["data"])
            continue
        if "data" in spec:
            raise InvalidArgument(f"input {name!r} has both 'data' and a binary_data_size parameter")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidArgument(f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary) - offset} "
                                  "binary bytes left after the JSON header")
        raw.append(binary[offset:offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary)} binary bytes follow the JSON header, the inputs' binary_data_size "
                              f"account for {offset}")
    if raw:
        if len(raw) != len(inputs):
            raise InvalidArgument("send every input as binary data or every input as JSON data, not a mix")
        request.raw_input_contents.extend(raw)
    binary: dict[str, bool] = {}
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list):
        raise InvalidArgument("infer: 'outputs' must be a list")
    for spec in outputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidArgument("infer: each requested output must be an object with a name")
        out = request.outputs.add(name=spec["name"])
        output_params = _params(spec, f"output {out.name!r}")
        wanted = output_params.pop("binary_data", binary_default)
        if not isinstance(wanted, bool):
            raise InvalidArgument(f"output {out.name!r}: parameter 'binary_data' must be true or false")
        binary[out.name] = wanted
        for key, value in output_params.items():
            _set_param(out.parameters[key], key, value)
    return InferCall(request, binary, binary_default)


def encode_infer(call: InferCall, response: pb.ModelInferResponse) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it."""
    doc = {"model_name": response.model_name, "model_version": response.model_version, "outputs": []}
    if response.id:
        doc["id"] = response.id
    chunks = []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        tensor = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if call.wants_binary(out.name):
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif out.datatype == "BYTES":
            tensor["data"] = [b.decode() for b in deserialize_bytes_tensor(raw)]  # labels and text: UTF-8
        else:
            tensor["data"] = np.frombuffer(raw, dtype=_JSON_OUTPUT_DTYPES[out.datatype]).tolist()
        doc["outputs"].append(tensor)
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


# ---------------------------------------------------------------------------------------------- the app

@dataclass
class Call:
    """What a route's handler gets: path parameters, headers and the (bounded) body."""

    params: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self, what: str) -> dict:
        return _json_object(self.body, what)


def _json(doc, status: int = 200, headers: dict | None = None) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), status_code=status, media_type="application/json",
                    headers=headers)


def _error(message: str, status: int, headers: dict | None = None) -> Response:
    return _json({"error": client_message(message)}, status, headers)


class _Routes:
    """The handlers: each one decodes its call, asks the data plane, encodes the answer (in a worker thread)."""

    def __init__(self, dataplane: DataPlane):
        self.dp = dataplane

    def server_metadata(self, call: Call) -> Response:
        return _json(to_json(self.dp.server_metadata()))

    def live(self, call: Call) -> Response:
        return _json({"live": self.dp.live()})

    def ready(self, call: Call) -> Response:
        ready = self.dp.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    def model_metadata(self, call: Call) -> Response:
        return _json(to_json(self.dp.model_metadata(call.params["name"], call.params.get("version", ""))))

    def model_ready(self, call: Call) -> Response:
        ready = self.dp.model_ready(call.params["name"], call.params.get("version", ""))
        return _json({"name": call.params["name"], "ready": ready}, 200 if ready else 503)

    def model_config(self, call: Call) -> Response:
        # Triton's REST API answers the config itself, not gRPC's {"config": ...} wrapper.
        return _json(to_json(self.dp.model_config(call.params["name"], call.params.get("version", "")).config))

    def model_statistics(self, call: Call) -> Response:
        return _json(to_json(self.dp.model_statistics(call.params.get("name", ""), call.params.get("version", ""))))

    def infer(self, call: Call) -> Response:
        infer = decode_infer(call.body, call.headers.get(HEADER_LENGTH.lower()), call.params["name"],
                             call.params.get("version", ""))
        body, header_length = encode_infer(infer, self.dp.infer(infer.request))
        if header_length is None:
            return Response(body, media_type="application/json")
        return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})

    def repository_index(self, call: Call) -> Response:
        ready = call.json("repository index").get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("repository index: 'ready' must be true or false")
        return _json([to_json(m) for m in self.dp.repository_index(ready).models])

    def load(self, call: Call) -> Response:
        self.dp.authorize(call.headers.get("authorization"))
        self.dp.load(call.params["name"], _params(call.json("load"), "load"))
        return _json({})

    def unload(self, call: Call) -> Response:
        self.dp.authorize(call.headers.get("authorization"))
        self.dp.unload(call.params["name"], _params(call.json("unload"), "unload"))
        return _json({})


def create_app(dataplane: DataPlane, *, max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
               max_in_flight: int = 16) -> Starlette:
    routes = _Routes(dataplane)
    admission = Admission(max_in_flight)
    fam = families()

    def endpoint(path: str, method: str, handler: Callable[[Call], Response], exempt: bool = False):
        async def run(request: Request) -> Response:
            started = time.perf_counter()
            rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex[:16]
            headers = {REQUEST_ID_HEADER: rid}
            admitted = exempt or admission.try_enter()
            fam.http_in_flight.inc()
            try:
                if not admitted:
                    response = _error(f"server overloaded: {admission.limit} requests already in flight; retry with "
                                      "backoff", 429, headers)
                else:
                    response = await _handle(request, path, handler, rid, headers, max_body_bytes)
            finally:
                fam.http_in_flight.dec()
                if admitted and not exempt:
                    admission.leave()
            fam.http_requests.labels(route=path, method=method, code=str(response.status_code)).inc()
            fam.http_latency.labels(route=path, method=method).observe(time.perf_counter() - started)
            return response

        return Route(path, run, methods=[method])

    table = [
        endpoint("/v2", "GET", routes.server_metadata),
        endpoint("/v2/health/live", "GET", routes.live, exempt=True),
        endpoint("/v2/health/ready", "GET", routes.ready, exempt=True),
        # Before /v2/models/{name}, which "stats" would match as a model name.
        endpoint("/v2/models/stats", "GET", routes.model_statistics),
        endpoint("/v2/repository/index", "POST", routes.repository_index),
        endpoint("/v2/repository/models/{name}/load", "POST", routes.load),
        endpoint("/v2/repository/models/{name}/unload", "POST", routes.unload),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        table += [
            endpoint(base, "GET", routes.model_metadata),
            endpoint(f"{base}/ready", "GET", routes.model_ready, exempt=True),
            endpoint(f"{base}/config", "GET", routes.model_config),
            endpoint(f"{base}/stats", "GET", routes.model_statistics),
            endpoint(f"{base}/infer", "POST", routes.infer),
        ]

    async def not_found(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        fam.http_requests.labels(route="unmatched", method=request.method, code=str(status)).inc()
        what = "method not allowed" if status == 405 else "no such route"
        return _error(f"{what}: {request.method} {request.url.path} (the API is the Open Inference Protocol's "
                      "/v2/...)", status)

    return Starlette(routes=table, exception_handlers={404: not_found, 405: not_found})


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)


class _TooLarge(Exception):
    def __init__(self, size: int):
        self.size = size


async def _handle(request: Request, path: str, handler: Callable[[Call], Response], rid: str, headers: dict,
                  max_body_bytes: int) -> Response:
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        return _error(f"Content-Encoding {encoding!r} is not accepted: send the body uncompressed", 415, headers)
    try:
        body = await _read_body(request, max_body_bytes)
    except _TooLarge as exc:
        return _error(f"request body of {exc.size:,}+ bytes exceeds the server's limit of {max_body_bytes:,} bytes",
                      413, headers)
    call = Call(dict(request.path_params), dict(request.headers), body)

    def work() -> Response:
        logs.request_id.set(rid)
        try:
            response = handler(call)
        except TrainyardError as exc:
            log.info("request rejected", extra={"route": path, "code": exc.code.name, "error": str(exc)})
            return _error(str(exc), HTTP_STATUS.get(exc.code, 500), headers)
        except Exception as exc:
            log.exception("unhandled error", extra={"route": path})
            return _error(f"internal error in {path} (request id {rid}): {exc}", 500, headers)
        response.headers[REQUEST_ID_HEADER] = rid
        return response

    return await anyio.to_thread.run_sync(work)


# ---------------------------------------------------------------------------------------------- the server

class HttpServer:
    """uvicorn serving the REST app from a background thread of this process; ``stop`` drains it."""

    def __init__(self, app: Starlette, sock: socket.socket, tls_dir: Path | None):
        self.port = sock.getsockname()[1]
        self._sock = sock
        tls = {} if tls_dir is None else {"ssl_certfile": str(tls_dir / TLS_CERT),
                                          "ssl_keyfile": str(tls_dir / TLS_KEY)}
        # log_config=None: uvicorn's records go through the process's JSON logging like everything else.
        config = uvicorn.Config(app, http="h11", lifespan="off", log_config=None, access_log=False, **tls)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="inference-http",
                                        daemon=True)

    def start(self, deadline_s: float = 30.0) -> None:
        self._thread.start()
        end = time.monotonic() + deadline_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise OSError(f"the REST server on port {self.port} did not start (see the log above)")
            time.sleep(0.01)

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish within ``grace`` seconds, then stop."""
        self._server.config.timeout_graceful_shutdown = max(1, round(grace))
        self._server.should_exit = True
        self._thread.join(grace + 5)
        self._sock.close()


def start_http(dataplane: DataPlane, *, port: int = 0, host: str = "127.0.0.1",
               max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_in_flight: int = 16,
               tls_dir: Path | None = None) -> HttpServer:
    """Serve the REST API on ``host:port`` (0 picks a free port) until ``stop()``; TLS with a TLS folder."""
    sock = socket.create_server((host, port), reuse_port=False)
    try:
        server = HttpServer(create_app(dataplane, max_body_bytes=max_body_bytes, max_in_flight=max_in_flight),
                            sock, tls_dir)
        server.start()
    except BaseException:
        sock.close()
        raise
    log.info("REST listening", extra={"port": server.port, "tls": tls_dir is not None})
    return server
