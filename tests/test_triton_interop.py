"""Interop with the ecosystem's own clients: NVIDIA's `tritonclient.grpc` and `tritonclient.http` against a real
`python -m services.inference --http-port ...` process, for every call a Triton user makes on day one: health,
server and model metadata, model config, inference statistics, infer with every input kind (UINT8 images, FP32
tensors, BYTES encoded files; JSON and binary tensors over HTTP), BYTES outputs (labels, a captioner's text) and
the repository extension (index, load with a config override, unload; the token in a header).

The clients run in a spawned process (tests/triton_calls.py says why); this process computes the expected
answers in-process from the published models.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from shared.grpc_client import wait_serving
from shared.modelcard import ModelCard, load_published, publish_model
from shared.models import create_model
from shared.predict import signature_for
from shared.preprocess import Normalizer
from shared.storage import open_store
from shared.text.tokenizer import train_tokenizer
from tests import triton_calls
from tests.harness import ManagedProcess, free_ports, http_probe
from tests.harness.inference import RGB_CLASSES, digits_nhwc, png_bytes, publish_random, reference_probs

TOKEN = "interop-token"
AUTHORIZED = {"authorization": f"Bearer {TOKEN}"}
RGB_NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# The status tritonclient reports for a failed call: gRPC's code, or the HTTP status.
STATUS = {"grpc": {"INVALID_ARGUMENT": "StatusCode.INVALID_ARGUMENT", "NOT_FOUND": "StatusCode.NOT_FOUND",
                   "UNAUTHENTICATED": "StatusCode.UNAUTHENTICATED"},
          "http": {"INVALID_ARGUMENT": "400", "NOT_FOUND": "404", "UNAUTHENTICATED": "401"}}


def publish_captioner(store, name: str) -> int:
    """A small random-weight cad_captioner with its tokenizer: its text is noise, but real generated text."""
    tokenizer = train_tokenizer(["a box with two holes", "a cylinder on a plate", "two boxes side by side"] * 3,
                                vocab_size=300)
    torch.manual_seed(0)
    kwargs = {"vocab_size": tokenizer.vocab_size, "channels": [8, 16, 16, 16], "hidden_dim": 32, "embed_dim": 16,
              "attn_dim": 16}
    model = create_model("cad_captioner", **kwargs)
    model.tokenizer = tokenizer
    files = model.export_files()
    card = ModelCard(name=name, version=0, architecture="cad_captioner", model_kwargs=kwargs, task="captioning",
                     classes=[], input_size=[3, 64, 64], run_id="random", normalization={"mean": [0.5] * 3,
                                                                                           "std": [0.5] * 3},
                     files=sorted(files), generation={"prompt": "Describe the part.", "max_new_tokens": 6})
    version, _ = publish_model(store, card, save(model.state_dict()), extra_files=files)
    return version


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop")
    store_url = f"file://{root / 'store'}"
    store = open_store(store_url)
    publish_random(store, "digits", seed=1)
    publish_random(store, "digits", seed=2)
    publish_random(store, "rgb", seed=3, in_chans=3, size=32, classes=RGB_CLASSES, **RGB_NORM)
    publish_random(store, "carded", seed=4, serving={"max_batch_size": 4, "max_queue_delay_ms": 5})
    publish_random(store, "spare", seed=5)
    publish_captioner(store, "captioner")
    port, http_port, metrics_port = free_ports(3)
    server = ManagedProcess(
        "inference",
        [sys.executable, "-m", "services.inference", "--port", port, "--http-port", http_port, "--metrics-port",
         metrics_port, "--store", store_url, "--models", "digits:1,digits,rgb,carded,captioner",
         "--max-batch-size", "16", "--max-queue-delay-ms", "1", "--threads", "1"],
        root / "inference.log", http_probe(f"http://127.0.0.1:{http_port}/v2/health/ready"),
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "TRAINYARD_SERVE_MODELS": "", "TRAINYARD_REPOSITORY_TOKEN": TOKEN}, ready_timeout=180)
    with server:
        wait_serving(f"127.0.0.1:{port}", deadline_s=60)
        yield {"store": store, "grpc": f"127.0.0.1:{port}", "http": f"127.0.0.1:{http_port}"}


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


class Triton:
    """tritonclient of one protocol, called in the spawned process."""

    def __init__(self, pool, protocol: str, url: str):
        self.pool, self.protocol, self.url = pool, protocol, url

    def __call__(self, method: str, *args, **kwargs):
        return self.pool.submit(triton_calls.call, self.protocol, self.url, method, *args, **kwargs).result(120)

    def infer(self, model: str, inputs, outputs=(), **kwargs) -> dict:
        return self.pool.submit(triton_calls.infer, self.protocol, self.url, model, inputs, outputs,
                                **kwargs).result(120)

    def fails(self, code: str, fn, *args, **kwargs) -> str:
        """Runs a call that must fail with ``code``; returns the server's message."""
        with pytest.raises(triton_calls.TritonError) as err:
            fn(*args, **kwargs)
        assert err.value.status == STATUS[self.protocol][code], err.value.message
        return err.value.message

    def config(self, model: str, version: str = "") -> dict:
        """The model config, the same shape from either protocol (gRPC's JSON wraps it and writes int64 as text)."""
        raw = self("get_model_config", model, version)
        cfg = raw.get("config", raw)

        def tensors(key: str) -> dict:
            return {t["name"]: (t["data_type"], t.get("format", "FORMAT_NONE"), [int(d) for d in t.get("dims", [])])
                    for t in cfg[key]}

        delay = cfg.get("dynamic_batching", {}).get("max_queue_delay_microseconds")
        return {"name": cfg["name"], "platform": cfg["platform"], "max_batch_size": int(cfg["max_batch_size"]),
                "input": tensors("input"), "output": tensors("output"),
                "delay_us": None if delay is None else int(delay),
                "versions": [int(v) for v in cfg["version_policy"]["specific"]["versions"]]}

    def index(self) -> dict[tuple[str, str], str]:
        """(name, version) -> state; gRPC's JSON wraps the list in {"models": ...}."""
        index = self("get_model_repository_index")
        return {(m["name"], m["version"]): m["state"] for m in (index["models"] if isinstance(index, dict) else index)}

    def stats(self, model: str = "", version: str = "") -> list[dict]:
        """Each model version's statistics with integers (gRPC's JSON writes uint64 as text, leaves zeros out)."""
        def duration(d: dict | None) -> tuple[int, int]:
            d = d or {}
            return int(d.get("count", 0)), int(d.get("ns", 0))

        out = []
        for s in self("get_inference_statistics", model, version)["model_stats"]:
            inference = s.get("inference_stats", {})
            out.append({
                "name": s["name"], "version": s["version"],
                **{k: int(s.get(k, 0)) for k in ("last_inference", "inference_count", "execution_count")},
                **{k: duration(inference.get(k)) for k in ("success", "fail", "queue", "compute_input",
                                                           "compute_infer", "compute_output")},
                "batches": {int(b["batch_size"]): duration(b.get("compute_infer")) for b in s.get("batch_stats", [])},
            })
        return out


@pytest.fixture(params=["grpc", "http"])
def triton(request, served, pool) -> Triton:
    return Triton(pool, request.param, served[request.param])


def test_health_and_metadata(triton):
    assert triton("is_server_live") and triton("is_server_ready")
    meta = triton("get_server_metadata")
    assert meta["name"] == "trainyard-inference"
    assert {"model_repository", "model_configuration", "statistics"} <= set(meta["extensions"])
    assert triton("is_model_ready", "digits") and triton("is_model_ready", "digits", "1")
    for args in (("digits", "3"), ("spare",), ("nope",)):
        assert not triton("is_model_ready", *args), args

    md = triton("get_model_metadata", "rgb")
    assert (md["name"], md["platform"], md["versions"]) == ("rgb", "pytorch", ["1"])
    assert {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in md["inputs"]} == {
        "images": ("UINT8", [-1, -1, -1, -1]), "tensor": ("FP32", [-1, 3, 32, 32]), "encoded": ("BYTES", [-1])}
    assert {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in md["outputs"]} == {
        "probabilities": ("FP32", [-1, 4]), "labels": ("BYTES", [-1])}
    assert triton("get_model_metadata", "digits")["versions"] == ["1", "2"]
    assert triton("get_model_metadata", "digits", "1")["versions"] == ["1"]
    outputs = triton("get_model_metadata", "captioner")["outputs"]
    assert [(t["name"], t["datatype"]) for t in outputs] == [("text", "BYTES")]
    assert "not loaded" in triton.fails("NOT_FOUND", triton, "get_model_metadata", "nope")


def test_model_config_reports_the_batching_applied(triton):
    cfg = triton.config("digits")
    assert (cfg["name"], cfg["platform"], cfg["versions"]) == ("digits", "pytorch", [1, 2])
    # The server's flags, since the card sets nothing.
    assert (cfg["max_batch_size"], cfg["delay_us"]) == (16, 1000)
    assert cfg["input"] == {"images": ("TYPE_UINT8", "FORMAT_NHWC", [-1, -1, -1]),
                            "tensor": ("TYPE_FP32", "FORMAT_NCHW", [1, 28, 28]),
                            "encoded": ("TYPE_STRING", "FORMAT_NONE", [])}
    assert cfg["output"] == {"probabilities": ("TYPE_FP32", "FORMAT_NONE", [10]),
                             "labels": ("TYPE_STRING", "FORMAT_NONE", [])}
    # The card's serving settings win over the flags, and are what the server enforces.
    carded = triton.config("carded")
    assert (carded["max_batch_size"], carded["delay_us"]) == (4, 5000)
    images, _ = digits_nhwc(5, seed=3)
    message = triton.fails("INVALID_ARGUMENT", triton.infer, "carded", [("images", "UINT8", images)])
    assert "at most 4 per request" in message
    assert triton.infer("carded", [("images", "UINT8", images[:4])])["outputs"]["probabilities"].shape == (4, 10)


@pytest.mark.parametrize(("protocol", "binary"), [("grpc", True), ("http", True), ("http", False)],
                         ids=["grpc", "http-binary", "http-json"])
def test_infer_with_every_input_kind(served, pool, protocol, binary):
    triton = Triton(pool, protocol, served[protocol])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = reference_probs(served["store"], "rgb", 1, nchw)
    tensor = Normalizer(RGB_NORM["mean"], RGB_NORM["std"], torch.device("cpu"))(nchw).numpy()
    encoded = np.array([png_bytes(im) for im in images], dtype=np.object_)
    kinds = [("images", "UINT8", images), ("tensor", "FP32", tensor)]
    if binary:  # encoded files are not UTF-8 text, so they travel as binary data only
        kinds.append(("encoded", "BYTES", encoded))
    for name, datatype, array in kinds:
        result = triton.infer("rgb", [(name, datatype, array)], ["probabilities", "labels"], binary=binary,
                              request_id=f"req-{name}")
        assert (result["model_name"], result["model_version"], result["id"]) == ("rgb", "1", f"req-{name}")
        if protocol == "http":
            assert result["binary"] == [binary, binary], name
        np.testing.assert_allclose(result["outputs"]["probabilities"], expected, atol=1e-5, err_msg=name)
        labels = [b.decode() if isinstance(b, bytes) else b for b in result["outputs"]["labels"]]
        assert labels == [RGB_CLASSES[i] for i in expected.argmax(1)], name
    # No outputs named: every output comes back.
    assert triton.infer("rgb", [("images", "UINT8", images)], binary=binary)["order"] == ["probabilities", "labels"]
    message = triton.fails("INVALID_ARGUMENT", triton.infer, "rgb", [("images", "FP32", tensor)], binary=binary)
    assert "must be UINT8" in message


def test_bytes_text_output_of_a_captioner(served, triton):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    module, card = load_published(served["store"], "captioner", 1)
    signature = signature_for(card, module)
    expected = signature.forward(signature.prepare(torch.from_numpy(images).permute(0, 3, 1, 2)))["text"]
    encoded = np.array([png_bytes(im) for im in images], dtype=np.object_)
    for name, datatype, array in (("images", "UINT8", images), ("encoded", "BYTES", encoded)):
        result = triton.infer("captioner", [(name, datatype, array)], ["text"])
        assert [t.decode() for t in result["outputs"]["text"]] == expected, name


def test_statistics_count_what_was_served(triton):
    (before,) = triton.stats("digits", "1")
    started_ms = time.time() * 1000
    images, _ = digits_nhwc(6, seed=4)
    for lo, hi in ((0, 2), (2, 5), (5, 6)):  # one after the other: batches of 2, 3 and 1
        triton.infer("digits", [("images", "UINT8", images[lo:hi])], version="1")
    triton.fails("INVALID_ARGUMENT", triton.infer, "digits", [("tensor", "FP32", np.zeros((1, 1, 9, 9), np.float32))],
                 version="1")
    (after,) = triton.stats("digits", "1")

    assert (after["name"], after["version"]) == ("digits", "1")
    assert after["inference_count"] - before["inference_count"] == 6  # samples
    assert after["execution_count"] - before["execution_count"] == 3  # forward passes
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        count, ns = (a - b for a, b in zip(after[key], before[key], strict=True))
        assert count == 3 and ns > 0, (key, before[key], after[key])
    assert after["fail"][0] - before["fail"][0] == 1
    for size in (1, 2, 3):
        count, ns = (a - b for a, b in zip(after["batches"][size], before["batches"].get(size, (0, 0)), strict=True))
        assert count == 1 and ns > 0, size
    assert started_ms - 1000 <= after["last_inference"] <= time.time() * 1000 + 1000

    everything = triton.stats()
    assert {(s["name"], s["version"]) for s in everything} == {
        ("digits", "1"), ("digits", "2"), ("rgb", "1"), ("carded", "1"), ("captioner", "1")}
    assert [s["version"] for s in triton.stats("digits")] == ["1", "2"]
    triton.fails("NOT_FOUND", triton.stats, "nope")


def test_repository_index_load_with_config_and_unload(triton):
    entries = triton.index()
    assert entries[("digits", "1")] == "READY" and entries[("spare", "1")] == "UNAVAILABLE"

    assert "token" in triton.fails("UNAUTHENTICATED", triton, "load_model", "spare")
    assert not triton("is_model_ready", "spare")
    triton("load_model", "spare", headers=AUTHORIZED)
    assert triton("is_model_ready", "spare")
    assert (triton.config("spare")["max_batch_size"], triton.config("spare")["delay_us"]) == (16, 1000)

    # Triton's load-time config override: the batching of a loaded model changes, and is enforced.
    override = {"max_batch_size": 2, "dynamic_batching": {"max_queue_delay_microseconds": 500}}
    triton("load_model", "spare", headers=AUTHORIZED, config=json.dumps(override))
    cfg = triton.config("spare")
    assert (cfg["max_batch_size"], cfg["delay_us"]) == (2, 500)
    images, _ = digits_nhwc(3, seed=6)
    assert "at most 2 per request" in triton.fails("INVALID_ARGUMENT", triton.infer, "spare",
                                                   [("images", "UINT8", images)])
    assert triton.infer("spare", [("images", "UINT8", images[:2])])["model_version"] == "1"
    message = triton.fails("INVALID_ARGUMENT", triton, "load_model", "spare", headers=AUTHORIZED,
                           config=json.dumps({"instance_group": [{"count": 2}]}))
    assert "instance_group" in message

    triton("unload_model", "spare", headers=AUTHORIZED)
    assert not triton("is_model_ready", "spare")
    entries = triton.index()
    assert entries[("spare", "1")] == "UNAVAILABLE"
    triton.fails("NOT_FOUND", triton, "unload_model", "spare", headers=AUTHORIZED)
