"""Logo image folders and synthetic MNIST digits: formats read back, balance, determinism, learnability."""
from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from PIL import Image

from services.convert.indexes import image_folder_from_dir, image_folder_from_store
from services.render.digits import DigitsJob, idx_bytes, render_digit
from services.render.jobs import create_job, run_job
from services.render.logos import CLASSES, LogoJob
from services.render.shards import run_sharded
from shared.data.mnist import parse_idx
from shared.errors import AlreadyExists
from shared.storage import open_store


def test_logos_image_folder_layout_and_index(tmp_path):
    store = open_store(tmp_path)
    manifest = run_sharded(LogoJob(train_per_class=3, val_per_class=1, image_size=96, shard_size=5), store, "logos")
    images = sorted(k for k in manifest.files if k.endswith(".png"))
    assert len(images) == 16
    assert {k.split("/")[0] for k in images} == {"train", "val"}
    for key in images[:4]:
        with Image.open(io.BytesIO(store.get_verified("logos", key))) as im:
            assert im.size == (96, 96) and im.mode == "RGB"
            assert np.asarray(im).std() > 5  # something is drawn
    index = image_folder_from_store(store, "logos")
    assert index["classes"] == sorted(CLASSES)
    assert index["splits"]["train"]["counts"] == dict.fromkeys(CLASSES, 3)
    assert index["splits"]["val"]["counts"] == dict.fromkeys(CLASSES, 1)
    label_of = dict(map(tuple, index["splits"]["train"]["files"]))
    assert all(index["classes"][label] == rel.split("/")[1] for rel, label in label_of.items())
    assert manifest.meta["splits"]["train"] == dict.fromkeys(CLASSES, 3)
    # The same folder on local disk indexes identically.
    local = image_folder_from_dir(store.root / "logos")
    assert local["splits"]["val"]["files"] == index["splits"]["val"]["files"]


def test_logos_deterministic_and_classes_differ():
    job = LogoJob(train_per_class=2, val_per_class=0, seed=4)
    assert job.render_item(5) == LogoJob(train_per_class=2, val_per_class=0, seed=4).render_item(5)
    assert job.render_item(5) != LogoJob(train_per_class=2, val_per_class=0, seed=5).render_item(5)
    with Image.open(io.BytesIO(job.render_item(0))) as im:
        assert im.size == (224, 224)
    # Gradients have many distinct colours; flat "simple" logos only a handful (plus edge blends).
    def colours(i):
        with Image.open(io.BytesIO(job.render_item(i))) as im:
            return len(np.unique(np.asarray(im).reshape(-1, 3), axis=0))
    assert colours(2) > 10 * colours(0)


def test_digits_idx_files(tmp_path):
    store = open_store(tmp_path)
    manifest = run_job(create_job("digits", {"train": 600, "test": 200, "seed": 1}), store, "mnist", workers=2)
    assert sorted(manifest.files) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                                      "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    raw = store.get_verified("mnist", "train-images-idx3-ubyte")
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:16] == (600).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    assert store.get_bytes("mnist/train-labels-idx1-ubyte")[:8] == b"\x00\x00\x08\x01" + (600).to_bytes(4, "big")
    images = parse_idx(raw)
    labels = parse_idx(store.get_bytes("mnist/train-labels-idx1-ubyte"))
    test_images = parse_idx(store.get_bytes("mnist/t10k-images-idx3-ubyte"))
    assert images.shape == (600, 28, 28) and test_images.shape == (200, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [60] * 10
    ink = (images > 50).sum(axis=(1, 2))
    assert ink.min() > 20 and images.max() == 255  # no blank digits
    # Centred like MNIST: the ink's centre of mass is near the middle, and the border is empty.
    ys, xs = np.mgrid[0:28, 0:28]
    mass = images.astype(float).sum(axis=(1, 2))
    assert np.abs((images * ys).sum(axis=(1, 2)) / mass - 13.5).max() < 1.5
    assert np.abs((images * xs).sum(axis=(1, 2)) / mass - 13.5).max() < 1.5
    assert images[:, :, :2].max() == 0 or images[:, :, :2].mean() < 1
    assert manifest.meta["class_counts"]["test"] == [20] * 10
    with pytest.raises(AlreadyExists):
        run_job(create_job("digits", {"train": 10, "test": 10}), store, "mnist")


def test_digits_deterministic_and_gzip(tmp_path):
    a = render_digit(7, np.random.default_rng([0, 1, 7]))
    assert np.array_equal(a, render_digit(7, np.random.default_rng([0, 1, 7])))
    assert not np.array_equal(a, render_digit(7, np.random.default_rng([0, 1, 17])))
    store = open_store(tmp_path)
    DigitsJob(train=30, test=10, seed=3, gzip=True).run(store, "gz")
    DigitsJob(train=30, test=10, seed=3).run(store, "plain")
    packed = store.get_verified("gz", "train-images-idx3-ubyte.gz")
    assert gzip.decompress(packed) == store.get_verified("plain", "train-images-idx3-ubyte")
    again = open_store(tmp_path / "again")
    DigitsJob(train=30, test=10, seed=3, gzip=True).run(again, "gz")
    assert again.get_bytes("gz/train-images-idx3-ubyte.gz") == packed  # gzip without timestamps
    assert idx_bytes(np.zeros((2, 3), np.uint8))[:12] == b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + \
        (3).to_bytes(4, "big")


@pytest.mark.slow
def test_digits_are_learnable_by_a_small_cnn():
    import torch
    from torch import nn

    job = DigitsJob(train=3000, test=600, seed=0)
    x_train, y_train = job.render_split("train", workers=2)
    x_test, y_test = job.render_split("test", workers=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    xt = torch.from_numpy(x_train).float().unsqueeze(1) / 255
    yt = torch.from_numpy(y_train).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _epoch in range(4):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test).float().unsqueeze(1) / 255).argmax(1).numpy()
    accuracy = (pred == y_test).mean()
    assert accuracy > 0.9, accuracy
