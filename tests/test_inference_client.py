"""InferenceClient and `trainyard predict` (cmd_predict) against a real in-process inference server."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cli.predict import cmd_predict
from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.grpc_client import wait_serving
from shared.inference_client import InferenceClient, expand_image_paths
from shared.modelcard import ModelRef
from shared.storage import open_store
from tests.harness import free_ports
from tests.harness.inference import RGB_CLASSES, TOKEN, digits_nhwc, metric, publish_random, reference_probs, scrape


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("client-store"))
    publish_random(store, "client-digits", seed=21)
    publish_random(store, "client-digits", seed=22)
    publish_random(store, "client-rgb", seed=23, in_chans=3, size=32, classes=RGB_CLASSES,
                   mean=[0.5] * 3, std=[0.25] * 3)
    publish_random(store, "client-small", seed=24, serving={"max_batch_size": 2})
    repo = ModelRepository(store, max_batch_size=8, max_queue_delay_ms=1.0)
    metrics_port = free_ports(1)[0]
    host, _ = start_server(repo, [ModelRef("client-digits", 1), ModelRef("client-digits", 2), ModelRef("client-rgb"),
                                  ModelRef("client-small")],
                           metrics_port=metrics_port, repository_token=TOKEN)
    address = f"127.0.0.1:{host.port}"
    wait_serving(address, deadline_s=60)
    yield {"address": address, "store": store, "metrics_port": metrics_port}
    host.stop(grace=2)
    repo.close()


def test_classify_top_k_mixed_inputs(server):
    images, _ = digits_nhwc(5, seed=31)
    expected = reference_probs(server["store"], "client-digits", 2, torch.from_numpy(images).permute(0, 3, 1, 2))
    buf = io.BytesIO()
    Image.fromarray(images[3, :, :, 0]).save(buf, format="PNG")
    # a 2-D array, an HWC array, a PIL image, PNG bytes and another array: three kinds in one call
    inputs = [images[0, :, :, 0], images[1], Image.fromarray(images[2, :, :, 0]), buf.getvalue(), images[4]]
    with InferenceClient(server["address"]) as client:
        assert client.server_live() and client.server_ready()
        preds = client.classify("client-digits", inputs, top_k=3, batch_size=2)
    assert [p.source for p in preds] == ["0", "1", "2", "3", "4"]
    for i, p in enumerate(preds):
        assert (p.model, p.version) == ("client-digits", "2")
        order = np.argsort(-expected[i], kind="stable")[:3]
        assert [label for label, _ in p.top] == [str(j) for j in order]
        np.testing.assert_allclose([c for _, c in p.top], expected[i][order], atol=1e-6)
        assert p.label == str(order[0]) and p.confidence == p.top[0][1]


def test_infer_and_versions_and_repository(server):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    with InferenceClient(server["address"], token=TOKEN) as client:
        res = client.infer("client-rgb", rgb, top_k=10)
        assert res.probabilities.shape == (3, 4) and np.allclose(res.probabilities.sum(1), 1, atol=1e-5)
        assert all(len(row) == 4 and set(row) == set(RGB_CLASSES) for row in res.labels)  # top_k clamped
        assert client.infer("client-digits", rgb[:, :28, :28], version=1).version == "1"
        assert client.model_ready("client-digits", 1) and not client.model_ready("client-digits", 3)
        assert list(client.model_metadata("client-digits").versions) == ["1", "2"]

        client.unload_model("client-digits", 1)
        assert not client.model_ready("client-digits", 1) and client.model_ready("client-digits")
        rows = {(r["name"], r["version"]): r["state"] for r in client.repository_index()}
        assert rows[("client-digits", "1")] == "UNAVAILABLE" and rows[("client-digits", "2")] == "READY"
        client.load_model("client-digits", 1)
        assert client.model_ready("client-digits", 1)

        with pytest.raises(NotFound, match="not loaded"):
            client.classify("no-such-model", [rgb[0]])
        with pytest.raises(InvalidArgument, match="uint8"):
            client.classify("client-rgb", [rgb[0].astype(np.float32)])
    with InferenceClient("127.0.0.1:1", timeout=2) as dead, pytest.raises(Unavailable, match="127.0.0.1:1"):
        dead.server_live()


def test_config_statistics_and_batches_split_to_the_models_max(server):
    images, _ = digits_nhwc(5, seed=32)
    with InferenceClient(server["address"]) as client:
        config = client.model_config("client-small")
        # The card's max_batch_size, the server's queue delay (the card sets none).
        assert (config.max_batch_size, config.dynamic_batching.max_queue_delay_microseconds) == (2, 1000)
        assert client.model_config("client-digits", 1).max_batch_size == 8
        preds = client.classify("client-small", list(images), top_k=1, batch_size=32)
        assert len(preds) == 5
        (stats,) = client.model_statistics("client-small")
    # Five images in requests of at most 2: three requests, all served.
    assert (stats.inference_count, stats.inference_stats.success.count, stats.inference_stats.fail.count) == (5, 3, 0)
    assert {b.batch_size for b in stats.batch_stats} == {1, 2}


def test_cmd_predict_on_a_folder_of_pngs(server, tmp_path):
    images, _ = digits_nhwc(7, seed=41)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[:, :, 0]).save(folder / f"digit_{i}.png")
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    expected = reference_probs(server["store"], "client-digits", 1, torch.from_numpy(images).permute(0, 3, 1, 2))

    before = metric(scrape(server["metrics_port"]), "trainyard_inference_requests_total",
                    model="client-digits", version="1", status="OK")
    text = cmd_predict(server["address"], "client-digits", "1", [str(folder)], top_k=2, batch_size=3)
    after = metric(scrape(server["metrics_port"]), "trainyard_inference_requests_total",
                   model="client-digits", version="1", status="OK")
    assert after - before == 3  # 7 images in batches of 3

    lines = text.splitlines()
    assert lines[0] == "model client-digits version 1: 7 image(s)"
    assert len(lines) == 8
    for i, line in enumerate(lines[1:]):
        fields = line.split()
        assert fields[0] == str(folder / f"digit_{i}.png")
        order = np.argsort(-expected[i], kind="stable")[:2]
        assert fields[1::2] == [str(j) for j in order]
        np.testing.assert_allclose([float(c) for c in fields[2::2]], expected[i][order], atol=1e-4)

    with pytest.raises(NotFound):
        cmd_predict(server["address"], "client-digits", None, [str(tmp_path / "missing.png")], 1, 4)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    with pytest.raises(InvalidArgument, match="not a decodable image"):
        cmd_predict(server["address"], "client-digits", None, [str(bad)], 1, 4)


def test_expand_image_paths(tmp_path):
    (tmp_path / "b.PNG").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "c.txt").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in expand_image_paths([tmp_path])] == ["a.jpg", "b.PNG"]
    with pytest.raises(InvalidArgument, match="no image files"):
        expand_image_paths([tmp_path / "sub"])
