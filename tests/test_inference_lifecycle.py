"""Inference servers started per test: readiness until the start-up models load, `--models all` with int8
quantisation, dynamic batching and its settings per model, and a trained model served by a real
`python -m services.inference` process (tests/test_inference.py holds the protocol tests on one shared server)."""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.bytes_tensor import deserialize_bytes_tensor
from shared.data import synthetic_digits
from shared.errors import InvalidArgument
from shared.grpc_client import channel, health_status, wait_serving
from shared.modelcard import ModelCard, ModelRef
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.storage import open_store
from tests.harness import ManagedProcess, free_ports, tcp_probe
from tests.harness.inference import (
    digits_nhwc,
    infer_request,
    metric,
    outputs_of,
    publish_random,
    reference_probs,
    scrape,
)


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
