"""The inference service over real gRPC: Open Inference Protocol v2 calls made with the generated stubs
only (as a KServe/Triton client would), real models from a real artifact store, real /metrics scrapes."""
from __future__ import annotations

import io
import json
import os
import re
import struct
import sys
import threading
import urllib.request
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.bytes_tensor import deserialize_bytes_tensor, serialize_bytes_tensor
from shared.data import synthetic_digits
from shared.errors import InvalidArgument
from shared.grpc_client import channel, health_status, wait_serving
from shared.modelcard import ModelCard, ModelRef, load_published, publish_model
from shared.models import create_model
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.preprocess import Normalizer
from shared.storage import open_store
from tests.harness import ManagedProcess, free_ports, tcp_probe

MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
RGB_CLASSES = ["simple", "text", "gradient", "complex"]
MAX_MESSAGE = 1024 * 1024
# Load/unload need the repository token (tests/test_security.py covers the refusals).
TOKEN = "test-repository-token"
AUTHORIZED = (("authorization", f"Bearer {TOKEN}"),)


def publish_random(store, name: str, seed: int, *, in_chans: int = 1, size: int = 28,
                   classes: list[str] | None = None, mean=None, std=None, serving: dict | None = None) -> int:
    """Publish a fixed-seed mnist_ultralight (GAP head, so any input size works) as the next version;
    ``serving``: the card's batching settings."""
    classes = classes or [str(i) for i in range(10)]
    torch.manual_seed(seed)
    kwargs = {"num_classes": len(classes), "in_chans": in_chans, "gap_head": True}
    model = create_model("mnist_ultralight", **kwargs)
    card = ModelCard(name=name, version=0, architecture="mnist_ultralight", model_kwargs=kwargs, classes=classes,
                     input_size=[in_chans, size, size], run_id=f"seed-{seed}",
                     normalization={"mean": mean or MNIST_MEAN * in_chans, "std": std or MNIST_STD * in_chans},
                     serving=serving)
    version, _ = publish_model(store, card, save(model.state_dict()))
    return version


def reference_probs(store, name: str, version: int, images_nchw_u8: torch.Tensor) -> np.ndarray:
    """In-process: the exported model on the engine's own normalisation, no server code involved."""
    model, card = load_published(store, name, version)
    norm = Normalizer(card.normalization.mean, card.normalization.std, torch.device("cpu"))
    with torch.inference_mode():
        return torch.softmax(model(norm(images_nchw_u8)), dim=1).numpy()


def infer_request(model: str, arr: np.ndarray, *, version: str = "", name: str | None = None,
                  datatype: str | None = None, outputs=(), top_k: int | None = None) -> pb.ModelInferRequest:
    """A v2 ModelInferRequest with raw_input_contents, written against the protocol only."""
    name = name or ("images" if arr.dtype == np.uint8 else "tensor")
    datatype = datatype or ("UINT8" if arr.dtype == np.uint8 else "FP32")
    req = pb.ModelInferRequest(model_name=model, model_version=version, id="req-1")
    req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
    req.raw_input_contents.append(arr.tobytes())
    for out in outputs:
        o = req.outputs.add(name=out)
        if out == "labels" and top_k:
            o.parameters["top_k"].int64_param = top_k
    return req


def outputs_of(resp: pb.ModelInferResponse) -> dict[str, tuple[list[int], bytes]]:
    return {o.name: (list(o.shape), raw) for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}


def digits_nhwc(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = synthetic_digits(n, seed=seed)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), y.numpy()


def png_bytes(hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format="PNG")
    return buf.getvalue()


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(body: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in body.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


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


def test_dynamic_batching_merges_concurrent_requests(tmp_path):
    store = open_store(tmp_path / "store")
    publish_random(store, "batched", seed=5)
    repo = ModelRepository(store, max_batch_size=16, max_queue_delay_ms=200.0)
    metrics_port = free_ports(1)[0]
    host, _ = start_server(repo, [ModelRef("batched")], metrics_port=metrics_port)
    address = f"127.0.0.1:{host.port}"
    try:
        wait_serving(address, deadline_s=60)
        images, _ = digits_nhwc(16, seed=13)
        expected = reference_probs(store, "batched", 1, torch.from_numpy(images).permute(0, 3, 1, 2))
        results: dict[int, np.ndarray] = {}
        barrier = threading.Barrier(16)

        def client(i: int) -> None:
            with channel(address) as ch:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
                stub.ServerLive(pb.ServerLiveRequest())  # connect before the race starts
                barrier.wait()
                resp = stub.ModelInfer(infer_request("batched", images[i:i + 1]), timeout=30)
                results[i] = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(1, 10)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(16))
        for i in range(16):  # each caller got its own rows back from the merged batch
            np.testing.assert_allclose(results[i][0], expected[i], atol=1e-5)

        body = scrape(metrics_port)
        labels = {"model": "batched", "version": "1"}
        batches = metric(body, "trainyard_inference_batch_size_count", **labels)
        samples = metric(body, "trainyard_inference_batch_size_sum", **labels)
        assert samples == 16 and batches < 16, (batches, samples)
        assert metric(body, "trainyard_inference_compute_seconds_count", **labels) == batches
        assert metric(body, "trainyard_inference_queue_seconds_count", **labels) == 16
        assert metric(body, "trainyard_inference_requests_total", status="OK", **labels) == 16

        # Triton's statistics agree: every request queued and credited with its batch's forward pass.
        with channel(address) as ch:
            stats = inference_pb2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                pb.ModelStatisticsRequest(name="batched")).model_stats
        (s,) = stats
        assert (s.name, s.version, s.inference_count, s.execution_count) == ("batched", "1", 16, batches)
        inference = s.inference_stats
        assert [d.count for d in (inference.success, inference.queue, inference.compute_input,
                                  inference.compute_infer, inference.compute_output)] == [16] * 5
        assert sum(b.batch_size * b.compute_infer.count for b in s.batch_stats) == 16
        assert sum(b.compute_infer.count for b in s.batch_stats) == batches
        # Each request is credited with its batch's forward pass: one sample per request, so a batch of b
        # samples counts its duration b times.
        assert inference.compute_infer.ns == sum(b.batch_size * b.compute_infer.ns for b in s.batch_stats)
    finally:
        host.stop(grace=2)
        repo.close()


def test_not_ready_until_startup_models_load(tmp_path):
    """A start-up model that is not in the store keeps the server unready: ServerReady false, health
    NOT_SERVING, while ServerLive still answers."""
    repo = ModelRepository(open_store(tmp_path / "empty"))
    host, _ = start_server(repo, [ModelRef("absent")])
    address = f"127.0.0.1:{host.port}"
    try:
        with channel(address) as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert health_status(address) == "NOT_SERVING"
    finally:
        host.stop(grace=1)
        repo.close()


def write_digits_idx(root: Path, n_train: int, n_test: int) -> Path:
    from shared.data.mnist import write_idx

    root.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = synthetic_digits(n, seed=seed)
        write_idx(root / f"{split}-images-idx3-ubyte", x[:, 0].numpy())
        write_idx(root / f"{split}-labels-idx1-ubyte", y.numpy().astype(np.uint8))
    return root


def test_trained_model_served_by_a_real_server_process(tmp_path, monkeypatch):
    """Train mnist_ultralight for one epoch on MNIST-format files, export it, serve it with
    `python -m services.inference --models`, and check held-out predictions against in-process ones."""
    from services.train.config import parse_train_config
    from services.train.engine import Engine

    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TRAINYARD_PROGRESS", "0")
    data = write_digits_idx(tmp_path / "mnist", n_train=2048, n_test=256)
    store_url = f"file://{tmp_path / 'store'}"
    cfg = parse_train_config({
        "experiment": "served-digits",
        "model": {"name": "mnist_ultralight", "kwargs": {"batchnorm": True}},
        "data": {"kind": "mnist", "path": str(data)}, "epochs": 1, "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "num_threads": 1, "seed": 0, "device": "cpu",
    })
    result = Engine(cfg, "serve-run", store=open_store(store_url), tracking=False).run()
    assert (result.model_name, result.model_version) == ("served-digits", 1)

    port, metrics_port = free_ports(2)
    server = ManagedProcess(
        "inference",
        [sys.executable, "-m", "services.inference", "--port", port, "--metrics-port", metrics_port,
         "--store", store_url, "--models", "served-digits", "--max-batch-size", "256", "--threads", "1"],
        tmp_path / "inference.log", tcp_probe(port), cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TRAINYARD_SERVE_MODELS": ""}, ready_timeout=120)
    with server:
        address = f"127.0.0.1:{port}"
        wait_serving(address, deadline_s=120)
        held_out, labels = digits_nhwc(256, seed=2)  # the t10k split the engine validated on
        expected = reference_probs(open_store(store_url), "served-digits", 1,
                                   torch.from_numpy(held_out).permute(0, 3, 1, 2))
        with channel(address) as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerReady(pb.ServerReadyRequest()).ready
            resp = stub.ModelInfer(infer_request("served-digits", held_out), timeout=60)
        outs = outputs_of(resp)
        probs = np.frombuffer(outs["probabilities"][1], "<f4").reshape(256, 10)
        served_labels = [int(b) for b in deserialize_bytes_tensor(outs["labels"][1])]
        assert served_labels == expected.argmax(1).tolist()
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        accuracy = float((np.asarray(served_labels) == labels).mean())
        assert accuracy > 0.5, accuracy  # chance is 0.1
        assert "trainyard_inference_compute_seconds_count" in scrape(metrics_port)
    assert '"msg": "stopped"' in (tmp_path / "inference.log").read_text()


def test_all_newest_at_startup_with_int8_quantization(tmp_path):
    """`--models all` loads the newest version of every published model; --quantize swaps the Linear
    layers for dynamic int8 ones and the answers stay close to float32."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    from services.inference.repository import parse_model_specs

    store = open_store(tmp_path / "store")
    publish_random(store, "qa", seed=6)
    publish_random(store, "qa", seed=7)
    publish_random(store, "qb", seed=8)
    repo = ModelRepository(store, quantize=True)
    host, _ = start_server(repo, parse_model_specs("all"))
    try:
        address = f"127.0.0.1:{host.port}"
        wait_serving(address, deadline_s=60)
        with channel(address) as ch:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
            ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
            assert sorted((m.name, m.version) for m in ready) == [("qa", "2"), ("qb", "1")]
            images, _ = digits_nhwc(8, seed=17)
            resp = stub.ModelInfer(infer_request("qa", images))
        got = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(8, 10)
        expected = reference_probs(store, "qa", 2, torch.from_numpy(images).permute(0, 3, 1, 2))
        assert not np.array_equal(got, expected)  # really the int8 model answering...
        np.testing.assert_allclose(got, expected, atol=0.02)  # ...and close to float32
        loaded = repo.get("qa")
        assert loaded.quantized and sum(isinstance(m, DynLinear) for m in loaded.module.modules()) == 2
    finally:
        host.stop(grace=1)
        repo.close()
    assert parse_model_specs(" a , b:3 ") == [ModelRef("a"), ModelRef("b", 3)] and parse_model_specs("") == []
    with pytest.raises(InvalidArgument, match="positive integer"):
        parse_model_specs("a:x")


def test_batching_settings_per_model(tmp_path):
    """A load request's override beats the card's serving fields, which beat the server's flags; a card written
    before serving fields existed still loads, with the flags."""
    from shared.errors import IntegrityError
    from shared.modelcard import Serving

    store = open_store(tmp_path / "store")
    publish_random(store, "plain", seed=1)
    publish_random(store, "carded", seed=2, serving={"max_batch_size": 3})
    written = json.loads(ModelCard(
        name="old", version=1, architecture="mnist_ultralight", model_kwargs={}, classes=["a"], input_size=[1, 8, 8],
        run_id="r", normalization={"mean": [0.0], "std": [1.0]}).to_json())
    del written["serving"]  # as cards were written before the field
    assert ModelCard.from_json(json.dumps(written)).serving is None
    with pytest.raises(IntegrityError, match="serving.max_batch_size"):
        ModelCard.from_json(json.dumps({**written, "serving": {"max_batch_size": 0}}))
    repo = ModelRepository(store, max_batch_size=16, max_queue_delay_ms=4.0)
    try:
        plain, carded = repo.load("plain"), repo.load("carded")
        assert (plain.batching.max_batch_size, plain.batching.max_queue_delay_ms) == (16, 4.0)
        assert (carded.batching.max_batch_size, carded.batching.max_queue_delay_ms) == (3, 4.0)
        # Re-batching a loaded model keeps the model (and its statistics), changes only what was given.
        again = repo.load("carded", serving=Serving(max_queue_delay_ms=0.5))
        assert again is carded and (again.batching.max_batch_size, again.batching.max_queue_delay_ms) == (3, 0.5)
        x = torch.zeros(3, 1, 28, 28)
        assert again.infer(x)["probabilities"].shape == (3, 10)
        with pytest.raises(InvalidArgument, match="max_batch_size 3"):
            again.infer(torch.zeros(4, 1, 28, 28))
    finally:
        repo.close()
