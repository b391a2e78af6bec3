"""CIFAR-100 python batches (fine and coarse labels): the reader, its refusals and a real training run on them."""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from services.train.config import parse_train_config
from services.train.engine import Engine
from shared.data import NORMALIZATION, read_cifar100
from shared.errors import InvalidArgument, NotFound
from shared.modelcard import load_published
from shared.storage import open_store

FINE_PER_COARSE = 5  # as in the real CIFAR-100: 20 superclasses of 5 classes each
COARSE_NAMES = [f"super_{i:02d}" for i in range(20)]
FINE_NAMES = [f"class_{i:03d}" for i in range(100)]
# 20 well-apart colours (levels 40 / 128 / 216 per channel), one per superclass.
COLOURS = np.array([(r, g, b) for r in (40, 128, 216) for g in (40, 128, 216) for b in (40, 128, 216)][:20])


def _images(fine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8, channel-planar: the superclass's colour, a bright row band whose position is the fine
    class within its superclass, and noise."""
    n = len(fine)
    x = COLOURS[fine // FINE_PER_COARSE][:, :, None, None] + rng.normal(0, 20, (n, 3, 32, 32))
    for i, f in enumerate(fine):
        band = 6 * (f % FINE_PER_COARSE)
        x[i, :, band:band + 4, :] += 60
    return np.clip(x, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0, protocol: int = 2) -> dict:
    """``train``, ``test`` and ``meta`` as the published ``cifar-100-python``: bytes keys, fine and coarse labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    meta = {b"fine_label_names": [n.encode() for n in FINE_NAMES],
            b"coarse_label_names": [n.encode() for n in COARSE_NAMES]}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.permutation(np.arange(n) % 100)  # every fine class, hence every superclass, in both splits
        batch = {b"batch_label": f"{name} batch".encode(), b"data": _images(fine, rng),
                 b"fine_labels": [int(f) for f in fine], b"coarse_labels": [int(f) // FINE_PER_COARSE for f in fine],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = batch
    return written


@pytest.mark.parametrize("protocol", [2, 5])
def test_reads_both_label_sets(tmp_path, protocol):
    written = write_cifar100(tmp_path, n_train=300, n_test=100, protocol=protocol)
    fine_train, fine_test = read_cifar100(tmp_path)
    coarse_train, coarse_test = read_cifar100(tmp_path, labels="coarse")

    assert fine_train.images.shape == (300, 3, 32, 32) and fine_test.images.shape == (100, 3, 32, 32)
    assert fine_train.images.dtype == coarse_train.images.dtype == torch.uint8
    assert fine_train.labels.dtype == coarse_train.labels.dtype == torch.int64
    # Channel-planar rows: 1024 red, then green, then blue values.
    data = written["train"][b"data"]
    assert np.array_equal(fine_train.images.numpy(), data.reshape(300, 3, 32, 32))
    assert fine_train.images[7, 1, 0, 0].item() == data[7, 1024]
    # Same images, the chosen label set's labels and names.
    assert np.array_equal(coarse_train.images.numpy(), fine_train.images.numpy())
    assert fine_train.labels.tolist() == written["train"][b"fine_labels"]
    assert coarse_train.labels.tolist() == written["train"][b"coarse_labels"]
    assert fine_test.labels.tolist() == written["test"][b"fine_labels"]
    assert coarse_test.labels.tolist() == written["test"][b"coarse_labels"]
    assert fine_train.classes == fine_test.classes == FINE_NAMES
    assert coarse_train.classes == coarse_test.classes == COARSE_NAMES
    assert (fine_train.name, coarse_test.name) == ("cifar100-fine-train", "cifar100-coarse-test")


def test_bad_or_missing_files_are_typed_errors(tmp_path):
    write_cifar100(tmp_path, n_train=100, n_test=100)
    with pytest.raises(InvalidArgument, match="fine, coarse"):
        read_cifar100(tmp_path, labels="superfine")
    with pytest.raises(NotFound, match="does not exist"):
        read_cifar100(tmp_path / "nowhere")

    (tmp_path / "test").write_bytes(b"not a pickle at all")
    with pytest.raises(InvalidArgument, match="test: not a valid CIFAR pickle"):
        read_cifar100(tmp_path)
    # A CIFAR-10 batch where a CIFAR-100 one belongs: it has no fine or coarse labels.
    (tmp_path / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(InvalidArgument, match="no 'coarse_labels'"):
        read_cifar100(tmp_path, labels="coarse")
    (tmp_path / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}))
    with pytest.raises(InvalidArgument, match=r"fine_labels must lie in \[0, 100\)"):
        read_cifar100(tmp_path)
    (tmp_path / "test").unlink()
    with pytest.raises(NotFound, match="test does not exist"):
        read_cifar100(tmp_path)

    write_cifar100(tmp_path, n_train=100, n_test=100)
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    with pytest.raises(InvalidArgument, match="'fine_label_names' must be a non-empty list"):
        read_cifar100(tmp_path)
    (tmp_path / "meta").unlink()
    with pytest.raises(NotFound, match="meta does not exist"):
        read_cifar100(tmp_path)


def test_label_option_belongs_to_cifar100_only(tmp_path):
    base = {"experiment": "c100", "model": {"name": "mnist_ultralight"}, "epochs": 1}
    cfg = parse_train_config({**base, "data": {"kind": "cifar100", "path": str(tmp_path)}})
    assert cfg.data.labels == "fine"  # the default, spelt out in the run's config
    assert parse_train_config(base | {"data": {"kind": "cifar100", "path": "x", "labels": "coarse"}}).data.labels \
        == "coarse"
    with pytest.raises(InvalidArgument, match="applies only to data.kind=cifar100, not cifar10"):
        parse_train_config(base | {"data": {"kind": "cifar10", "path": "x", "labels": "coarse"}})
    with pytest.raises(InvalidArgument, match="data.labels"):
        parse_train_config(base | {"data": {"kind": "cifar100", "path": "x", "labels": "medium"}})


def test_training_on_coarse_labels(tmp_path, home):
    """A tiny real run on kind=cifar100, labels=coarse: well above the 5% chance of 20 superclasses, and the
    published card names the superclasses and carries CIFAR-100's normalisation."""
    data_dir = tmp_path / "cifar-100-python"
    write_cifar100(data_dir, n_train=600, n_test=200)
    cfg = parse_train_config({
        "experiment": "cifar100-test",
        "model": {"name": "mnist_ultralight", "kwargs": {"batchnorm": True, "gap_head": True}},
        "data": {"kind": "cifar100", "path": str(data_dir), "labels": "coarse"},
        "epochs": 8, "batch_size": 32, "optimizer": {"name": "adamw", "lr": 0.01},
        "deterministic": True, "num_threads": 1, "seed": 0,
    })
    store = open_store(tmp_path / "store")
    started = time.perf_counter()
    result = Engine(cfg, "c100-coarse", store=store, tracking=False).run()
    seconds = time.perf_counter() - started

    assert result.state == "SUCCEEDED", result.message
    assert max(h["val_acc"] for h in result.history) > 0.5, result.history
    assert result.final_metrics["test_acc"] > 0.5, result.final_metrics
    _, card = load_published(store, "cifar100-test")
    assert card.classes == COARSE_NAMES and card.input_size == [3, 32, 32]
    mean, std = NORMALIZATION["cifar100"]
    assert card.normalization.mean == pytest.approx(list(mean)) and card.normalization.std == pytest.approx(list(std))
    assert seconds < 20, seconds
