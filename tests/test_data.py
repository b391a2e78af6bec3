"""Dataset readers (files written here in the published formats), subsets, augmentation, loader."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from shared.data import (
    AugmentConfig,
    BatchAugment,
    InMemoryDataset,
    InMemoryLoader,
    read_cifar10,
    read_idx,
    read_image_folder,
    read_image_folder_splits,
    read_mnist,
    stratified_split,
    stratified_subset,
    write_idx,
)
from shared.errors import IntegrityError, InvalidArgument, NotFound
from shared.preprocess import Normalizer
from shared.storage import open_store


def _mnist_files(root, n_train=12, n_test=5, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        write_idx(root / (name + (".gz" if gz else "")), arr)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = _mnist_files(tmp_path, gz=gz)
    train, test = read_mnist(tmp_path)
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert test.labels.dtype == torch.int64 and train.classes == [str(i) for i in range(10)]
    if gz:  # really gzip on disk, header as published: magic 0x00000803 then N, 28, 28
        raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
        assert struct.unpack(">IIII", raw[:16]) == (0x803, 12, 28, 28)


def test_mnist_corrupt_files(tmp_path):
    _mnist_files(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-7])  # truncated payload
    with pytest.raises(InvalidArgument, match="needs 9408 data bytes"):
        read_mnist(tmp_path)
    images.write_bytes(b"\x01\x02" + good[2:])  # bad magic
    with pytest.raises(InvalidArgument, match="magic"):
        read_mnist(tmp_path)
    images.write_bytes(good[:10])  # header cut inside the dimensions
    with pytest.raises(InvalidArgument, match="truncated"):
        read_mnist(tmp_path)
    write_idx(images, np.zeros((11, 28, 28), np.uint8))  # count differs from the labels file
    with pytest.raises(InvalidArgument, match="11 images but"):
        read_mnist(tmp_path)
    write_idx(images, np.zeros((12, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(12, 10, np.uint8))
    with pytest.raises(InvalidArgument, match="out of range"):
        read_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(InvalidArgument, match="gzip"):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(NotFound):
        read_mnist(tmp_path / "nowhere")


def test_mnist_from_store_with_cache(tmp_path):
    src = tmp_path / "src"
    arrays = _mnist_files(src, gz=True)
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    store.publish_dir("datasets/mnist", src)
    cache = tmp_path / "cache"
    train, _ = read_mnist("datasets/mnist", store_url=store_url, cache_dir=cache)
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert len(list(cache.iterdir())) == 1
    # republished data is noticed (the manifest changed), not served stale from the cache
    src2 = tmp_path / "src2"
    arrays2 = _mnist_files(src2, n_train=20, gz=True, seed=1)
    store.publish_dir("datasets/mnist", src2, overwrite=True)
    train2, _ = read_mnist("datasets/mnist", store_url=store_url, cache_dir=cache)
    assert len(train2) == 20
    assert np.array_equal(train2.images[:, 0].numpy(), arrays2["train-images-idx3-ubyte"])


def test_local_dataset_with_a_manifest_is_verified_like_a_store_dataset(tmp_path):
    """A published folder read in place (data.path a local directory) is checked against its manifest: flipped
    bytes under a stale manifest, or a file the manifest does not list, are IntegrityError naming the file."""
    arrays = _mnist_files(tmp_path / "src")
    open_store(tmp_path / "store").publish_dir("mnist", tmp_path / "src")
    local = tmp_path / "store" / "mnist"
    train, _ = read_mnist(local)
    assert np.array_equal(train.labels.numpy(), arrays["train-labels-idx1-ubyte"])

    images = local / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])  # still a valid IDX file
    with pytest.raises(IntegrityError, match="train-images-idx3-ubyte: sha256"):
        read_mnist(local)
    images.write_bytes(good)
    (local / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good))  # a second copy nobody vouches for
    with pytest.raises(IntegrityError, match="t10k-images-idx3-ubyte.gz is not listed"):
        read_mnist(local)
    (local / "t10k-images-idx3-ubyte.gz").unlink()
    (local / "MANIFEST.json").unlink()  # a plain folder (a download) is read as it is
    read_mnist(local)


def _cifar_dir(root, per_batch=6, seed=0, protocol=2):
    """Batches as the published python version: dicts with bytes keys, 'data' uint8 (N, 3072)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_batches_round_trip(tmp_path, protocol):
    written = _cifar_dir(tmp_path, protocol=protocol)
    train, test = read_cifar10(tmp_path)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    data, labels = written["data_batch_2"]
    # row layout: 1024 red, 1024 green, 1024 blue values
    assert np.array_equal(train.images[6:12].numpy(), data.reshape(6, 3, 32, 32))
    assert train.images[7, 1, 0, 0].item() == data[1, 1024]
    assert train.labels[6:12].tolist() == labels
    assert test.labels.tolist() == written["test_batch"][1]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_refuses_malicious_pickle(tmp_path, monkeypatch):
    _cifar_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(InvalidArgument, match="not allowed"):
        read_cifar10(tmp_path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                                                          b"labels": [0, 1]}, protocol=2))
    with pytest.raises(InvalidArgument, match="3072"):
        read_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(NotFound, match="data_batch_3"):
        read_cifar10(tmp_path)


def _png(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_splits_and_flat(tmp_path):
    root = tmp_path / "logos"
    _png(root / "train" / "simple" / "a.png", (40, 30), (255, 0, 0))
    _png(root / "train" / "simple" / "b.jpg", (20, 20), (250, 0, 0))
    _png(root / "train" / "text" / "c.png", (64, 64), (0, 0, 255))
    _png(root / "val" / "text" / "d.PNG", (10, 50), (0, 0, 255))
    _png(root / "val" / "gradient" / "e.png", (33, 33), (0, 255, 0))
    (root / "train" / "text" / "notes.txt").write_text("ignored")
    splits = read_image_folder_splits(root, size=(16, 24))
    assert set(splits) == {"train", "val"}
    assert splits["train"].classes == splits["val"].classes == ["gradient", "simple", "text"]
    train = splits["train"]
    assert train.images.shape == (3, 3, 16, 24) and train.labels.tolist() == [1, 1, 2]
    assert train.images[0, :, 8, 12].tolist() == [255, 0, 0]
    assert splits["val"].labels.tolist() == [0, 2]
    gray = read_image_folder(root / "train", size=8, channels=1, resize="center_crop")
    assert gray.images.shape == (3, 1, 8, 8) and gray.classes == ["simple", "text"]
    flat = read_image_folder_splits(root / "val", size=8)
    assert list(flat) == ["all"] and len(flat["all"]) == 2
    (root / "val" / "text" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InvalidArgument, match="broken.png"):
        read_image_folder(root / "val", size=8)


def test_stratified_subset_balance_and_determinism():
    labels = np.repeat(np.arange(10), 500)  # balanced, like CIFAR-10
    np.random.default_rng(0).shuffle(labels)
    small = stratified_subset(labels, 1000, seed=7)
    assert len(small) == 1000 and len(set(small.tolist())) == 1000
    assert np.bincount(labels[small], minlength=10).tolist() == [100] * 10
    assert np.array_equal(small, stratified_subset(torch.as_tensor(labels), 1000, seed=7))
    assert not np.array_equal(small, stratified_subset(labels, 1000, seed=8))
    big = stratified_subset(labels, 2500, seed=7)
    assert set(small.tolist()) <= set(big.tolist())  # nested: more data adds samples
    skewed = np.array([0] * 90 + [1] * 10)
    counts = np.bincount(skewed[stratified_subset(skewed, 21, seed=0)])
    assert counts.tolist() == [19, 2]  # 18.9 / 2.1 by largest remainder
    with pytest.raises(InvalidArgument):
        stratified_subset(labels, 6000)
    tr, va = stratified_split(skewed, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    assert np.bincount(skewed[va]).tolist() == [18, 2]


def _batch(b=16, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8), torch.arange(b) % 10


def test_augment_shapes_determinism_and_mixup():
    x, y = _batch()
    aug = BatchAugment(AugmentConfig.preset("cifar_strong"), num_classes=10)
    out1, t1 = aug(x, y, torch.Generator().manual_seed(3))
    out2, t2 = aug(x, y, torch.Generator().manual_seed(3))
    out3, _ = aug(x, y, torch.Generator().manual_seed(4))
    assert out1.dtype == torch.float32 and out1.shape == x.shape
    assert out1.min() >= 0 and out1.max() <= 1
    assert torch.equal(out1, out2) and torch.equal(t1, t2) and not torch.equal(out1, out3)
    assert t1.shape == (16, 10) and torch.allclose(t1.sum(1), torch.ones(16))
    for cfg in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}):
        _, t = BatchAugment(AugmentConfig(**cfg), 10)(x, y, torch.Generator().manual_seed(1))
        assert torch.allclose(t.sum(1), torch.ones(16)) and (t < 1).any()  # really mixed
    logo = BatchAugment(AugmentConfig.preset("logo"))
    lo, ly = logo(x, y, torch.Generator().manual_seed(0))
    assert lo.shape == x.shape and torch.equal(ly, y)
    gray, _ = BatchAugment(AugmentConfig.preset("mnist"))(x[:, :1], y, torch.Generator().manual_seed(0))
    assert gray.shape == (16, 1, 32, 32)
    with pytest.raises(InvalidArgument):
        BatchAugment(AugmentConfig(mixup_alpha=1.0))


def test_augment_ops_are_correct():
    x, y = _batch(b=8, h=6, w=6)
    flipped, _ = BatchAugment(AugmentConfig(hflip=1.0))(x, y, torch.Generator())
    assert torch.equal(flipped, x.flip(-1).float() / 255)
    cropped, _ = BatchAugment(AugmentConfig(crop_padding=2))(x, y, torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2)).float() / 255
    for i in range(8):  # each sample is some 6x6 window of its padded image
        windows = [pad[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(cropped[i], win) for win in windows)
    gray, _ = BatchAugment(AugmentConfig(grayscale=1.0))(x, y, torch.Generator())
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    rot, _ = BatchAugment(AugmentConfig(rotate_deg=1e-6))(x, y, torch.Generator())
    assert torch.allclose(rot, x.float() / 255, atol=1e-4)  # ~zero angle is the identity
    z = Normalizer([0.5, 0.25, 0.0], [0.5, 0.25, 1.0]).from_unit(torch.full((1, 3, 2, 2), 0.5))
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 0.5]


def _dataset(n=50, classes=5):
    x, _ = _batch(b=n, h=8, w=8)
    return InMemoryDataset(x, torch.arange(n) % classes, [f"c{i}" for i in range(classes)])


def test_loader_epochs_determinism_and_drop_last():
    ds = _dataset()
    loader = InMemoryLoader(ds, batch_size=16, shuffle=False)
    xs, ys = zip(*loader, strict=True)
    assert [len(b) for b in ys] == [16, 16, 16, 2] and len(loader) == 4
    assert torch.equal(torch.cat(xs), ds.images.float() / 255)
    shuffled = InMemoryLoader(ds, 16, shuffle=True, augment=AugmentConfig.preset("cifar"), seed=1,
                              mean=[0.5] * 3, std=[0.25] * 3, drop_last=True)
    assert len(shuffled) == 3
    first = [(x.clone(), y.clone()) for x, y in shuffled]
    again = list(shuffled)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    shuffled.set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in shuffled]), torch.cat([y for _, y in first]))
    assert first[0][0].dtype == torch.float32 and first[0][0].min() < 0  # normalised
    all_labels = torch.cat([y for _, y in InMemoryLoader(ds, 7, shuffle=True, seed=3)])
    assert sorted(all_labels.tolist()) == sorted(ds.labels.tolist())  # each sample once per epoch


def test_loader_sharding_and_soft_targets():
    ds = _dataset(n=50)
    shards = [InMemoryLoader(ds, 8, shuffle=True, seed=5, rank=r, world_size=3) for r in range(3)]
    orders = [s.indices() for s in shards]
    assert all(len(o) == 17 for o in orders) and len({len(s) for s in shards}) == 1
    assert set(torch.cat(orders).tolist()) == set(range(50))  # 51 slots: one sample wraps around
    mixed = InMemoryLoader(ds, 10, augment=AugmentConfig(mixup_alpha=0.3), seed=0)
    x, t = next(iter(mixed))
    assert t.shape == (10, 5) and torch.allclose(t.sum(1), torch.ones(10))
    with pytest.raises(InvalidArgument):
        InMemoryLoader(ds, 8, rank=3, world_size=3)
