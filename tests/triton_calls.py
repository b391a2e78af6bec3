"""The client side of the Triton interop tests (tests/test_triton_interop.py): NVIDIA's own `tritonclient.grpc` and
`tritonclient.http`, run in a spawned process.

Why another process: tritonclient's generated protos and trainyard's (`shared.pb.inference_pb2`) both define the
`inference` package, and one protobuf descriptor pool refuses the second definition of `inference.ServerLiveRequest`
("duplicate symbol"). The test process holds trainyard's; this module imports tritonclient only inside its
functions, and answers with plain data (dicts, lists, numpy arrays) and `TritonError`, which pickle across.
"""
from __future__ import annotations

import numpy as np


class TritonError(Exception):
    """tritonclient's InferenceServerException, reduced to what crosses a process boundary."""

    def __init__(self, status: str, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _run(protocol: str, url: str, fn):
    from tritonclient.utils import InferenceServerException

    tc = _module(protocol)
    with tc.InferenceServerClient(url) as client:
        try:
            return fn(tc, client)
        except InferenceServerException as exc:
            raise TritonError(str(exc.status()), exc.message()) from None


def call(protocol: str, url: str, method: str, *args, **kwargs):
    """``client.<method>(*args, **kwargs)``; gRPC answers are asked for as JSON (``as_json``), HTTP ones are JSON."""
    if protocol == "grpc" and method.startswith("get_"):
        kwargs.setdefault("as_json", True)
    return _run(protocol, url, lambda tc, client: getattr(client, method)(*args, **kwargs))


def infer(protocol: str, url: str, model: str, inputs: list[tuple[str, str, np.ndarray]], outputs=(), *,
          version: str = "", binary: bool = True, request_id: str = "interop") -> dict:
    """One infer call with tritonclient's InferInput / InferRequestedOutput. ``inputs``: (name, datatype, array);
    ``binary`` (HTTP): tensors as the binary extension or as JSON. Returns the response's metadata and each
    output as numpy (``as_numpy``), in the order the server sent them."""
    def run(tc, client):
        tensors = []
        for name, datatype, array in inputs:
            tensor = tc.InferInput(name, list(array.shape), datatype)
            if protocol == "http":
                tensor.set_data_from_numpy(array, binary_data=binary)
            else:
                tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [tc.InferRequestedOutput(name, binary_data=binary) if protocol == "http" else
                     tc.InferRequestedOutput(name) for name in outputs] or None
        result = client.infer(model, tensors, model_version=version, outputs=requested, request_id=request_id)
        response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
        names = [o["name"] for o in response["outputs"]]
        return {"model_name": response["model_name"], "model_version": response["model_version"],
                "id": response.get("id", ""), "outputs": {n: result.as_numpy(n) for n in names},
                "order": names,
                "binary": [("binary_data_size" in o.get("parameters", {})) for o in response["outputs"]]}

    return _run(protocol, url, run)
