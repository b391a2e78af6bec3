"""The inference tests' helpers: an in-process server over a store's published models, fixed-seed models to
publish, requests written against the Open Inference Protocol only, the in-process answers to compare with, and
/metrics scrapes."""
from __future__ import annotations

import io
import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

from services.inference.repository import ModelRepository
from services.inference.server import start_server
from shared.data import synthetic_digits
from shared.grpc_client import wait_serving
from shared.modelcard import ModelCard, ModelRef, load_published, publish_model
from shared.models import create_model
from shared.pb import inference_pb2 as pb
from shared.preprocess import Normalizer

MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
RGB_CLASSES = ["simple", "text", "gradient", "complex"]
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


@contextmanager
def serving(store, *models: str, max_batch_size: int = 8, max_queue_delay_ms: float = 2.0) -> Iterator[str]:
    """Serve the newest version of each named model; yields the server's address, stops it on exit."""
    repo = ModelRepository(store, max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms)
    host, _ = start_server(repo, [ModelRef(name) for name in models])
    address = f"127.0.0.1:{host.port}"
    try:
        wait_serving(address, deadline_s=120)
        yield address
    finally:
        host.stop(grace=2)
        repo.close()
