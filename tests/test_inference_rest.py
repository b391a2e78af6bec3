"""The REST flavour of the Open Inference Protocol (services/inference/rest.py) with requests written by hand against
the protocol's text: JSON tensors (nested or flat), the binary tensor-data extension byte for byte, JSON errors with
the HTTP status of the gRPC code, the body bound, admission, TLS, and the REST metrics. tritonclient's view of the
same routes is tests/test_triton_interop.py."""
from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from services.inference import rest
from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.bytes_tensor import deserialize_bytes_tensor, serialize_bytes_tensor
from shared.grpc_client import wait_serving
from shared.modelcard import ModelRef
from shared.storage import open_store
from tests.harness import free_ports
from tests.harness.inference import digits_nhwc, metric, png_bytes, publish_random, reference_probs, scrape
from tests.harness.tls import make_tls_dir

TOKEN = "rest-token"
MAX_BODY = 256 * 1024


def call(base: str, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request; (status, headers, body) whatever the status."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("rest-store"))
    publish_random(store, "digits", seed=1)
    publish_random(store, "slow", seed=2, serving={"max_batch_size": 16, "max_queue_delay_ms": 1500})
    publish_random(store, "spare", seed=3)
    repo = ModelRepository(store, max_batch_size=8, max_queue_delay_ms=1.0)
    metrics_port = free_ports(1)[0]
    host, servicer = start_server(repo, [ModelRef("digits"), ModelRef("slow")], metrics_port=metrics_port,
                                  repository_token=TOKEN)
    wait_serving(f"127.0.0.1:{host.port}", deadline_s=60)
    http = rest.start_http(servicer.dataplane, max_body_bytes=MAX_BODY)
    yield {"store": store, "base": f"http://127.0.0.1:{http.port}", "metrics_port": metrics_port,
           "dataplane": servicer.dataplane}
    http.stop(grace=2)
    host.stop(grace=2)
    repo.close()


def test_json_tensors_nested_or_flat(served):
    base = served["base"]
    images, _ = digits_nhwc(2, seed=1)
    expected = reference_probs(served["store"], "digits", 1, torch.from_numpy(images).permute(0, 3, 1, 2))
    for data in (images.tolist(), images.reshape(-1).tolist()):  # nested, and row-major flat
        body = {"id": "j1", "inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28, 1], "data": data}],
                "outputs": [{"name": "probabilities"}, {"name": "labels", "parameters": {"top_k": 2}}]}
        status, headers, raw = call(base, "POST", "/v2/models/digits/infer", body)
        assert status == 200 and headers["content-type"] == "application/json", raw
        doc = json.loads(raw)
        assert (doc["model_name"], doc["model_version"], doc["id"]) == ("digits", "1", "j1")
        probs, labels = doc["outputs"]
        assert (probs["name"], probs["datatype"], probs["shape"]) == ("probabilities", "FP32", [2, 10])
        np.testing.assert_allclose(np.asarray(probs["data"], np.float32).reshape(2, 10), expected, atol=1e-6)
        assert (labels["datatype"], labels["shape"]) == ("BYTES", [2, 2])
        assert labels["data"] == [str(i) for row in np.argsort(-expected, 1)[:, :2] for i in row]
    # The versioned route answers the same.
    status, _, raw = call(base, "POST", "/v2/models/digits/versions/1/infer", body)
    assert status == 200 and json.loads(raw)["model_version"] == "1"


def test_binary_tensor_extension_byte_for_byte(served):
    base = served["base"]
    images, _ = digits_nhwc(3, seed=2)
    expected = reference_probs(served["store"], "digits", 1, torch.from_numpy(images).permute(0, 3, 1, 2))
    encoded = serialize_bytes_tensor([png_bytes(im) for im in images])
    header = json.dumps({
        "inputs": [{"name": "encoded", "datatype": "BYTES", "shape": [3],
                    "parameters": {"binary_data_size": len(encoded)}}],
        # probabilities as binary, labels as JSON: chosen per output
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                    {"name": "labels", "parameters": {"binary_data": False}}],
    }).encode()
    status, headers, raw = call(base, "POST", "/v2/models/digits/infer", header + encoded,
                                {"Inference-Header-Content-Length": str(len(header)),
                                 "Content-Type": "application/octet-stream"})
    assert status == 200, raw
    length = int(headers["inference-header-content-length"])
    doc = json.loads(raw[:length])
    probs, labels = doc["outputs"]
    assert probs["parameters"] == {"binary_data_size": 3 * 10 * 4} and "data" not in probs
    np.testing.assert_allclose(np.frombuffer(raw[length:], "<f4").reshape(3, 10), expected, atol=1e-6)
    assert labels["data"] == [str(i) for i in expected.argmax(1)]

    # binary_data_output: every output binary, BYTES in the protocol's length-prefixed layout.
    images_raw = images.tobytes()
    header = json.dumps({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": list(images.shape),
         "parameters": {"binary_data_size": len(images_raw)}}]}).encode()
    status, headers, raw = call(base, "POST", "/v2/models/digits/infer", header + images_raw,
                                {"Inference-Header-Content-Length": str(len(header))})
    length = int(headers["inference-header-content-length"])
    probs, labels = json.loads(raw[:length])["outputs"]
    labels_raw = raw[length + probs["parameters"]["binary_data_size"]:]
    assert len(labels_raw) == labels["parameters"]["binary_data_size"]
    assert [b.decode() for b in deserialize_bytes_tensor(labels_raw, 3)] == [str(i) for i in expected.argmax(1)]


def test_errors_are_json_with_the_status_of_the_grpc_code(served):
    base = served["base"]
    images, _ = digits_nhwc(1, seed=3)
    good = {"name": "images", "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": images.reshape(-1).tolist()}
    header = json.dumps({"inputs": [{**{k: v for k, v in good.items() if k != "data"},
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    cases = [
        ("unknown model", "POST", "/v2/models/nope/infer", {"inputs": [good]}, {}, 404, "not loaded"),
        ("bad version", "GET", "/v2/models/digits/versions/x", None, {}, 400, "positive integer"),
        ("not JSON", "POST", "/v2/models/digits/infer", b"{nope", {}, 400, "not JSON"),
        ("UINT8 out of range", "POST", "/v2/models/digits/infer",
         {"inputs": [{**good, "data": [300] * 784}]}, {}, 400, "above 255"),
        ("negative UINT8", "POST", "/v2/models/digits/infer",
         {"inputs": [{**good, "data": [-1] * 784}]}, {}, 400, "out of range"),
        ("strings for numbers", "POST", "/v2/models/digits/infer",
         {"inputs": [{**good, "data": ["a"] * 784}]}, {}, 400, "must be integers"),
        ("too few values", "POST", "/v2/models/digits/infer",
         {"inputs": [{**good, "data": [1, 2]}]}, {}, 400, "needs 784"),
        ("binary shorter than declared", "POST", "/v2/models/digits/infer", header + b"x" * 10,
         {"Inference-Header-Content-Length": str(len(header))}, 400, "binary_data_size"),
        ("header length past the body", "POST", "/v2/models/digits/infer", header,
         {"Inference-Header-Content-Length": "99999"}, 400, "Inference-Header-Content-Length"),
        ("unknown output", "POST", "/v2/models/digits/infer",
         {"inputs": [good], "outputs": [{"name": "logits"}]}, {}, 400, "unknown output"),
        ("body over the bound", "POST", "/v2/models/digits/infer", b"x" * (MAX_BODY + 1), {}, 413, "limit"),
        ("compressed body", "POST", "/v2/models/digits/infer", b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415,
         "uncompressed"),
        ("no route", "GET", "/v2/nothing", None, {}, 404, "no such route"),
        ("wrong method", "GET", "/v2/models/digits/infer", None, {}, 405, "method not allowed"),
        ("load without the token", "POST", "/v2/repository/models/spare/load", {}, {}, 401, "token"),
        ("load with a wrong token", "POST", "/v2/repository/models/spare/load", {},
         {"Authorization": "Bearer nope"}, 401, "not the repository token"),
        ("load of a file", "POST", "/v2/repository/models/spare/load",
         {"parameters": {"file:1/model.pt": "AAAA"}}, {"Authorization": f"Bearer {TOKEN}"}, 400, "not supported"),
        ("unknown load parameter", "POST", "/v2/repository/models/spare/load", {"parameters": {"x": 1}},
         {"Authorization": f"Bearer {TOKEN}"}, 400, "unknown parameter"),
        ("load of nothing published", "POST", "/v2/repository/models/absent/load", {},
         {"Authorization": f"Bearer {TOKEN}"}, 404, "not published"),
        ("stats of a model not loaded", "GET", "/v2/models/spare/stats", None, {}, 404, "not loaded"),
    ]
    for what, method, path, body, headers, status, text in cases:
        got, got_headers, raw = call(base, method, path, body, headers)
        assert got == status, f"{what}: {got} {raw[:300]!r}"
        assert got_headers["content-type"] == "application/json", what
        assert text in json.loads(raw)["error"], f"{what}: {raw[:300]!r}"
    assert not served["dataplane"].model_ready("spare")  # no refused load loaded it
    # ...and the server keeps serving.
    assert call(base, "POST", "/v2/models/digits/infer", {"inputs": [good]})[0] == 200


def test_health_metadata_and_repository_routes(served):
    base = served["base"]
    assert call(base, "GET", "/v2/health/live")[:1] == (200,)
    status, _, raw = call(base, "GET", "/v2/health/ready")
    assert status == 200 and json.loads(raw) == {"ready": True}
    assert json.loads(call(base, "GET", "/v2")[2])["name"] == "trainyard-inference"
    assert call(base, "GET", "/v2/models/digits/ready")[0] == 200
    assert call(base, "GET", "/v2/models/spare/ready")[0] == 503
    status, _, raw = call(base, "POST", "/v2/repository/index", {"ready": True})
    assert status == 200 and {(m["name"], m["state"]) for m in json.loads(raw)} == {("digits", "READY"),
                                                                                     ("slow", "READY")}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert call(base, "POST", "/v2/repository/models/spare/load", {"parameters": {"version": 1}}, auth)[0] == 200
    assert call(base, "GET", "/v2/models/spare/versions/1/ready")[0] == 200
    assert call(base, "POST", "/v2/repository/models/spare/unload", {"parameters": {"unload_dependents": False}},
                auth)[0] == 200
    assert call(base, "GET", "/v2/models/spare/ready")[0] == 503


def test_overload_is_refused_at_once_and_health_still_answers(served):
    """One request in flight allowed: while a 'slow' request waits out its model's queue delay, another call is
    refused with 429 at once, and the health routes still answer."""
    http = rest.start_http(served["dataplane"], max_in_flight=1)
    base = f"http://127.0.0.1:{http.port}"
    images, _ = digits_nhwc(1, seed=5)
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                        "data": images.reshape(-1).tolist()}]}
    first: list[int] = []
    try:
        worker = threading.Thread(target=lambda: first.append(call(base, "POST", "/v2/models/slow/infer", body)[0]))
        worker.start()
        deadline = time.monotonic() + 10
        while (REGISTRY.get_sample_value("trainyard_inference_http_requests_in_flight") or 0) < 1 and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        status, _, raw = call(base, "GET", "/v2/models/digits/config")
        assert status == 429 and "overloaded" in json.loads(raw)["error"]
        assert time.monotonic() - started < 1.0  # refused at once, not queued behind the slow request
        assert call(base, "GET", "/v2/health/ready")[0] == 200
        worker.join(30)
        assert first == [200]
    finally:
        http.stop(grace=2)


def test_rest_speaks_tls_with_the_tls_folder(served, tmp_path):
    tls = make_tls_dir(tmp_path / "tls")
    http = rest.start_http(served["dataplane"], tls_dir=tls)
    try:
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        status, _, raw = call(f"https://127.0.0.1:{http.port}", "GET", "/v2/health/ready", context=context)
        assert status == 200 and json.loads(raw)["ready"]
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext on a TLS port
            call(f"http://127.0.0.1:{http.port}", "GET", "/v2/health/ready")
    finally:
        http.stop(grace=1)


def test_rest_requests_are_in_the_metrics(served):
    base = served["base"]
    images, _ = digits_nhwc(1, seed=7)
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28, 1],
                        "data": images.reshape(-1).tolist()}]}
    before = scrape(served["metrics_port"])
    for _ in range(3):
        assert call(base, "POST", "/v2/models/digits/infer", body)[0] == 200
    assert call(base, "GET", "/v2/models/nope/config")[0] == 404
    after = scrape(served["metrics_port"])

    def delta(name: str, **labels) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    infer = {"route": "/v2/models/{name}/infer", "method": "POST"}
    assert delta("trainyard_inference_http_requests_total", code="200", **infer) == 3
    assert delta("trainyard_inference_http_request_duration_seconds_count", **infer) == 3
    assert delta("trainyard_inference_http_requests_total", route="/v2/models/{name}/config", code="404") == 1
    # The same per-model counter as gRPC's: one data plane.
    assert delta("trainyard_inference_requests_total", model="digits", status="OK") == 3
    assert "trainyard_inference_http_requests_in_flight" in after


def test_bytes_json_input_is_utf8_text(served):
    """BYTES JSON data are strings (UTF-8 on the wire): a PNG cannot travel that way, and the answer says how."""
    status, _, raw = call(served["base"], "POST", "/v2/models/digits/infer", {
        "inputs": [{"name": "encoded", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]})
    assert status == 400 and "not a decodable image" in json.loads(raw)["error"]
    status, _, raw = call(served["base"], "POST", "/v2/models/digits/infer", {
        "inputs": [{"name": "encoded", "datatype": "BYTES", "shape": [1], "data": [[1, 2]]}]})
    assert status == 400 and "binary data" in json.loads(raw)["error"]
