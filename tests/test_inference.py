"""The inference service over real gRPC: Open Inference Protocol v2 calls made with the generated stubs
only (as a KServe/Triton client would), real models from a real artifact store, real /metrics scrapes.

Here: one server shared by the module (protocol, versions, bad inputs, the repository extension);
tests/test_inference_lifecycle.py starts a server per test (start-up, batching, quantisation)."""
from __future__ import annotations

import struct
import zlib

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.bytes_tensor import deserialize_bytes_tensor, serialize_bytes_tensor
from shared.errors import InvalidArgument
from shared.grpc_client import channel, wait_serving
from shared.modelcard import ModelRef
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.preprocess import Normalizer
from shared.storage import open_store
from tests.harness import free_ports
from tests.harness.inference import (
    AUTHORIZED,
    MNIST_MEAN,
    MNIST_STD,
    RGB_CLASSES,
    TOKEN,
    digits_nhwc,
    infer_request,
    metric,
    outputs_of,
    png_bytes,
    publish_random,
    reference_probs,
    scrape,
)

MAX_MESSAGE = 1024 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One in-process server: digits v1+v2 and a 3-channel model loaded, 'spare' published but not loaded."""
    store = open_store(tmp_path_factory.mktemp("store"))
    assert publish_random(store, "digits", seed=1) == 1
    assert publish_random(store, "digits", seed=2) == 2
    publish_random(store, "rgb", seed=3, in_chans=3, size=32, classes=RGB_CLASSES,
                   mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    publish_random(store, "spare", seed=4)
    repo = ModelRepository(store, max_batch_size=16, max_queue_delay_ms=1.0)
    metrics_port = free_ports(1)[0]
    host, _ = start_server(repo, [ModelRef("digits", 1), ModelRef("digits"), ModelRef("rgb")],
                           metrics_port=metrics_port, max_message_bytes=MAX_MESSAGE, repository_token=TOKEN)
    address = f"127.0.0.1:{host.port}"
    wait_serving(address, deadline_s=60)
    ch = channel(address, max_message_bytes=8 * MAX_MESSAGE)  # lets an oversized request reach the server
    yield {"store": store, "address": address, "metrics_port": metrics_port,
           "stub": inference_pb2_grpc.GRPCInferenceServiceStub(ch)}
    ch.close()
    host.stop(grace=2)
    repo.close()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels in its header and holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_bytes_tensor_wire_format():
    # Spelled out byte for byte: server and client share this codec, so only a literal catches a
    # change that both sides would agree on but KServe and Triton clients would not.
    raw = serialize_bytes_tensor([b"ab", b""])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    assert deserialize_bytes_tensor(raw, 2) == [b"ab", b""]
    for bad, message in ((raw[:-1], "truncated"), (raw[:5], "truncated"), (raw, "shape says 3")):
        with pytest.raises(InvalidArgument, match=message):
            deserialize_bytes_tensor(bad, 3 if bad is raw else None)


def test_server_calls_and_metadata(served):
    stub = served["stub"]
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "trainyard-inference" and "model_repository" in meta.extensions
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="rgb"))
    assert md.name == "rgb" and list(md.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in md.inputs}
    assert inputs == {"images": ("UINT8", [-1, -1, -1, -1]), "tensor": ("FP32", [-1, 3, 32, 32]),
                      "encoded": ("BYTES", [-1])}
    outputs = {t.name: (t.datatype, list(t.shape)) for t in md.outputs}
    assert outputs == {"probabilities": ("FP32", [-1, 4]), "labels": ("BYTES", [-1])}
    assert list(stub.ModelMetadata(pb.ModelMetadataRequest(name="digits")).versions) == ["1", "2"]


def test_raw_protocol_uint8_and_fp32_match_in_process(served):
    stub, store = served["stub"], served["store"]
    images, _ = digits_nhwc(12, seed=7)
    expected = reference_probs(store, "digits", 2, torch.from_numpy(images).permute(0, 3, 1, 2))

    resp = stub.ModelInfer(infer_request("digits", images))
    assert resp.model_name == "digits" and resp.model_version == "2" and resp.id == "req-1"
    outs = outputs_of(resp)
    shape, raw = outs["probabilities"]
    assert shape == [12, 10]
    probs = np.frombuffer(raw, dtype="<f4").reshape(shape)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    assert outs["labels"][0] == [12]
    assert [b.decode() for b in deserialize_bytes_tensor(outs["labels"][1])] == [str(i) for i in expected.argmax(1)]

    # FP32 NCHW, already preprocessed: the server must use it untouched.
    norm = Normalizer(MNIST_MEAN, MNIST_STD, torch.device("cpu"))
    tensor = norm(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    resp = stub.ModelInfer(infer_request("digits", tensor, outputs=["probabilities"]))
    assert [o.name for o in resp.outputs] == ["probabilities"]
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(12, 10), expected,
                               atol=1e-6)


def test_typed_contents_and_encoded_png_and_resizing(served):
    stub, store = served["stub"], served["store"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = reference_probs(store, "rgb", 1, torch.from_numpy(images).permute(0, 3, 1, 2))

    # typed contents instead of raw bytes: UINT8 travels in uint_contents
    req = pb.ModelInferRequest(model_name="rgb")
    inp = req.inputs.add(name="images", datatype="UINT8", shape=[3, 32, 32, 3])
    inp.contents.uint_contents.extend(images.reshape(-1).tolist())
    probs = np.frombuffer(stub.ModelInfer(req).raw_output_contents[0], "<f4").reshape(3, 4)
    np.testing.assert_allclose(probs, expected, atol=1e-6)

    # encoded PNG files as a BYTES tensor, decoded server-side
    req = pb.ModelInferRequest(model_name="rgb")
    req.inputs.add(name="encoded", datatype="BYTES", shape=[3])
    req.raw_input_contents.append(serialize_bytes_tensor([png_bytes(im) for im in images]))
    outs = outputs_of(stub.ModelInfer(req))
    np.testing.assert_allclose(np.frombuffer(outs["probabilities"][1], "<f4").reshape(3, 4), expected, atol=1e-6)
    labels = [b.decode() for b in deserialize_bytes_tensor(outs["labels"][1])]
    assert labels == [RGB_CLASSES[i] for i in expected.argmax(1)]

    # a larger grayscale image: resized and expanded to 3 channels like PIL would do on the training side
    big = rng.integers(0, 256, (1, 96, 64, 1), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(big[0, :, :, 0]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    ref = reference_probs(store, "rgb", 1, torch.from_numpy(pil.copy()).permute(2, 0, 1)[None])
    got = np.frombuffer(stub.ModelInfer(infer_request("rgb", big)).raw_output_contents[0], "<f4").reshape(1, 4)
    np.testing.assert_allclose(got, ref, atol=2e-3)  # PIL and torch antialiasing round a few pixels differently


def test_top_k_labels(served):
    stub = served["stub"]
    images, _ = digits_nhwc(4, seed=9)
    outs = outputs_of(stub.ModelInfer(infer_request("digits", images, outputs=["probabilities", "labels"],
                                                    top_k=3)))
    probs = np.frombuffer(outs["probabilities"][1], "<f4").reshape(4, 10)
    assert outs["labels"][0] == [4, 3]
    labels = [b.decode() for b in deserialize_bytes_tensor(outs["labels"][1])]
    for row in range(4):
        assert labels[row * 3:row * 3 + 3] == [str(i) for i in np.argsort(-probs[row], kind="stable")[:3]]


def test_version_selection(served):
    stub, store = served["stub"], served["store"]
    images, _ = digits_nhwc(6, seed=11)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    v1, v2 = (reference_probs(store, "digits", v, nchw) for v in (1, 2))
    assert not np.allclose(v1, v2)  # the two versions really differ

    for version, expected in (("", v2), ("2", v2), ("1", v1)):
        resp = stub.ModelInfer(infer_request("digits", images, version=version))
        assert resp.model_version == (version or "2")
        np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(6, 10), expected,
                                   atol=1e-6)
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="digits", version="3")).ready
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits", version="1"))
    assert list(md.versions) == ["1"]


def test_bad_inputs_get_clear_status_and_server_keeps_serving(served):
    stub = served["stub"]
    images, _ = digits_nhwc(2, seed=5)
    truncated = pb.ModelInferRequest(model_name="digits")
    truncated.inputs.add(name="encoded", datatype="BYTES", shape=[2])
    truncated.raw_input_contents.append(struct.pack("<I", 100) + b"short")
    not_an_image = pb.ModelInferRequest(model_name="digits")
    not_an_image.inputs.add(name="encoded", datatype="BYTES", shape=[1])
    not_an_image.raw_input_contents.append(struct.pack("<I", 12) + b"hello world!")
    wrong_length = infer_request("digits", images)
    wrong_length.raw_input_contents[0] = images.tobytes()[:-3]
    two_inputs = infer_request("digits", images)
    two_inputs.inputs.add(name="tensor", datatype="FP32", shape=[1])
    oversized = infer_request("digits", np.zeros((1, 1024, 1100, 1), np.uint8))  # > 1 MiB message limit
    # 20 KB on the wire that once drove the server to gigabytes: refused from its shape.
    huge_batch = infer_request("digits", np.zeros((20000, 1, 1, 1), np.uint8))
    # 2**32 * 2**32 elements wrap to 0 in int64: the shape must be refused, not crash the reshape.
    overflowing = infer_request("digits", np.zeros((1, 1, 1, 1), np.uint8))
    overflowing.inputs[0].shape[:] = [1, 2**32, 2**32, 1]
    overflowing.raw_input_contents[0] = b""
    nan = np.zeros((1, 1, 28, 28), np.float32)
    nan[0, 0, 3, 4] = np.nan
    bomb = pb.ModelInferRequest(model_name="digits")  # a 13,000 x 13,000 PNG header: tiny, huge decoded
    bomb.inputs.add(name="encoded", datatype="BYTES", shape=[1])
    bomb.raw_input_contents.append(serialize_bytes_tensor([png_header(13_000, 13_000)]))

    cases = [
        ("wrong datatype", infer_request("digits", images, datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT,
         "must be UINT8"),
        ("wrong rank", infer_request("digits", images[0]), grpc.StatusCode.INVALID_ARGUMENT, "[N, H, W, C]"),
        ("wrong channels", infer_request("digits", np.zeros((1, 28, 28, 2), np.uint8)),
         grpc.StatusCode.INVALID_ARGUMENT, "C in 1, 3, 4"),
        ("fp32 of the wrong size", infer_request("digits", np.zeros((1, 1, 32, 32), np.float32)),
         grpc.StatusCode.INVALID_ARGUMENT, "already preprocessed"),
        ("raw bytes of the wrong length", wrong_length, grpc.StatusCode.INVALID_ARGUMENT, "raw bytes"),
        ("undecodable image bytes", not_an_image, grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image"),
        ("truncated BYTES tensor", truncated, grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("unknown input name", infer_request("digits", images, name="pixels"), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown input"),
        ("two inputs", two_inputs, grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
        ("unknown output", infer_request("digits", images, outputs=["logits"]), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown output"),
        ("unknown model", infer_request("nope", images), grpc.StatusCode.NOT_FOUND, "not loaded"),
        ("unknown version", infer_request("digits", images, version="7"), grpc.StatusCode.NOT_FOUND,
         "version 7 is not loaded"),
        ("bad version string", infer_request("digits", images, version="latest"), grpc.StatusCode.INVALID_ARGUMENT,
         "positive integer"),
        ("message over the size limit", oversized, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ("batch over max_batch_size", huge_batch, grpc.StatusCode.INVALID_ARGUMENT, "at most 16 per request"),
        ("element count past int64", overflowing, grpc.StatusCode.INVALID_ARGUMENT, "raw bytes"),
        ("non-finite tensor", infer_request("digits", nan), grpc.StatusCode.INVALID_ARGUMENT, "1 non-finite value"),
        ("image too large to decode", bomb, grpc.StatusCode.INVALID_ARGUMENT, "13000x13000 pixels"),
    ]
    for what, req, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=30)
        assert err.value.code() == code, f"{what}: {err.value.code()} {err.value.details()}"
        assert text in (err.value.details() or ""), f"{what}: {err.value.details()}"
        # ...and the very next valid request succeeds
        ok = stub.ModelInfer(infer_request("digits", images), timeout=30)
        assert outputs_of(ok)["probabilities"][0] == [2, 10], what

    body = scrape(served["metrics_port"])
    assert metric(body, "trainyard_inference_requests_total", model="digits", status="INVALID_ARGUMENT") >= 10
    assert metric(body, "trainyard_inference_requests_total", model="unknown", status="NOT_FOUND") >= 1


def test_repository_index_load_unload(served):
    stub = served["stub"]
    index = {(m.name, m.version): (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[("digits", "1")] == ("READY", "") and index[("digits", "2")] == ("READY", "")
    assert index[("spare", "1")] == ("UNAVAILABLE", "unloaded")
    ready_only = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
    assert {(m.name, m.version) for m in ready_only} == {("digits", "1"), ("digits", "2"), ("rgb", "1")}

    images, _ = digits_nhwc(1, seed=3)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="spare")).ready
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(infer_request("spare", images))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    load = pb.RepositoryModelLoadRequest(model_name="spare")
    load.parameters["version"].string_param = "1"
    stub.RepositoryModelLoad(load, metadata=AUTHORIZED)
    assert stub.ModelReady(pb.ModelReadyRequest(name="spare")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="spare", version="1")).ready
    assert stub.ModelInfer(infer_request("spare", images)).model_version == "1"

    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="spare"), metadata=AUTHORIZED)
    assert not stub.ModelReady(pb.ModelReadyRequest(name="spare")).ready
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(infer_request("spare", images))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    states = {(m.name, m.version): m.state for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert states[("spare", "1")] == "UNAVAILABLE"

    for bad, code in (("missing", grpc.StatusCode.NOT_FOUND), ("../x", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=bad), metadata=AUTHORIZED)
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="spare"), metadata=AUTHORIZED)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_junk_loads_leave_no_trace_and_a_damaged_version_is_data_loss(served):
    stub = served["stub"]
    # 20,000 junk loads once grew the index to 6 MB: a name with nothing published is not a failed load.
    for i in range(300):
        load = pb.RepositoryModelLoadRequest(model_name=f"junk{i}")
        load.parameters["version"].int64_param = i + 1
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(load, metadata=AUTHORIZED)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest()).models
    assert not [m for m in index if m.name.startswith("junk")]

    # A published version whose manifest lost its weights entry is damaged (DATA_LOSS), not absent.
    store = served["store"]
    version = publish_random(store, "damaged", seed=9)
    prefix = f"models/damaged/{version}"
    manifest = store.read_manifest(prefix)
    del manifest.files["model.safetensors"]
    store.put_bytes(f"{prefix}/MANIFEST.json", manifest.to_json())
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="damaged"), metadata=AUTHORIZED)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
    assert "model.safetensors" in err.value.details()
    failed = {m.name: (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert failed["damaged"][0] == "UNAVAILABLE" and "IntegrityError" in failed["damaged"][1]
