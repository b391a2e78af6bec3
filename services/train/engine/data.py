"""Image-classification data for the engine: the dataset in memory as uint8, and its batch loaders."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from services.train.config import DataConfig, TrainConfig
from services.train.engine.distributed import DistInfo
from shared import data as D
from shared.errors import InvalidArgument
from shared.preprocess import Normalizer
from shared.storage import dataset_source

# The usual normalisation constants per data kind, when the config gives none.
_NORM_NAME = {"mnist": "mnist", "cifar10": "cifar10", "cifar100": "cifar100", "imagefolder": "imagenet"}
# Float copies of the training set up to this size are kept in memory when there is no augmentation.
_PRENORMALIZE_MAX_BYTES = 2 << 30


@dataclass
class DataBundle:
    """The whole dataset as uint8 tensors in memory (N, C, H, W) with int64 labels, in three splits: train
    (what the model fits), val (what selection sees) and test (evaluated once, at the end; None when the
    dataset has no test split)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor | None
    test_y: torch.Tensor | None
    classes: list[str]
    mean: list[float]
    std: list[float]
    version: str = ""
    resize: int | None = None  # upsample batches to this square size on the device (CIFAR -> 224 ViTs)
    val_source: str = ""  # where validation came from, e.g. "10% of train, stratified (seed 0)"
    # A fixed stratified sample of the training data, evaluated like validation every epoch.
    train_eval_idx: torch.Tensor | None = None

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "train":
            idx = self.train_eval_idx if self.train_eval_idx is not None else slice(None)
            return self.train_x[idx], self.train_y[idx]
        if name == "val":
            return self.val_x, self.val_y
        if name == "test" and self.test_x is not None:
            return self.test_x, self.test_y
        raise InvalidArgument(f"the dataset has no {name!r} split")

    @property
    def input_size(self) -> list[int]:
        c, h, w = self.train_x.shape[1:]
        return [c, self.resize, self.resize] if self.resize else [c, h, w]


def _synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    size = cfg.image_size or 28
    if cfg.num_classes == 10 and cfg.channels == 1:
        tx, ty = D.synthetic_digits(cfg.train_size, seed=seed, size=size)
        vx, vy = D.synthetic_digits(cfg.val_size, seed=seed + 1, size=size)
        sx, sy = D.synthetic_digits(cfg.test_size, seed=seed + 2, size=size)
        # Digits look like MNIST (dark background, thin strokes): MNIST's constants fit them.
        mean, std = D.NORMALIZATION["mnist"]
    else:
        # Other shapes: one fixed random template per class plus noise; learnable, not trivial.
        g = torch.Generator().manual_seed(seed)
        templates = torch.rand(cfg.num_classes, cfg.channels, size, size, generator=g)

        def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, cfg.num_classes, (n,), generator=g)
            x = 0.6 * templates[y] + 0.4 * torch.rand(n, cfg.channels, size, size, generator=g)
            return (x * 255).to(torch.uint8), y

        tx, ty = make(cfg.train_size)
        vx, vy = make(cfg.val_size)
        sx, sy = make(cfg.test_size)
        mean, std = [0.5] * cfg.channels, [0.25] * cfg.channels
    bundle = DataBundle(tx, ty, vx, vy, sx, sy, [str(i) for i in range(cfg.num_classes)], list(mean), list(std),
                        val_source="generated apart from train and test")
    if cfg.val_split == "test":
        bundle.val_x, bundle.val_y, bundle.val_source = sx, sy, "the test split (selection on test)"
    return bundle


def _read(cfg: DataConfig, cache_root: Path) -> DataBundle:
    root, store_url = dataset_source(cfg.path)
    src = {"store_url": store_url, "cache_dir": cache_root}
    val = None
    if cfg.kind == "mnist":
        train, test = D.read_mnist(root, **src)
    elif cfg.kind == "cifar10":
        train, test = D.read_cifar10(root, **src)
    elif cfg.kind == "cifar100":
        train, test = D.read_cifar100(root, labels=cfg.labels, **src)
    else:
        # Image folders are decoded at the target size up front; no per-batch resize later.
        splits = D.read_image_folder_splits(root, size=cfg.image_size or 224, **src)
        train = splits.get("train", splits.get("all"))
        val = next((splits[k] for k in ("val", "valid", "validation") if k in splits), None)
        test = splits.get("test")
    tx, ty = train.images, train.labels
    test = test if test is not None and len(test.labels) else None
    if cfg.val_split == "test":
        if test is None:
            raise InvalidArgument(f"data.val_split=test, but {cfg.path} has no test split")
        vx, vy, source = test.images, test.labels, "the test split (selection on test)"
    elif cfg.val_split == "auto" and val is not None and len(val.labels):
        vx, vy, source = val.images, val.labels, "the dataset's own val split"
    else:
        # Hold out a stratified fraction of train, fixed by subset_seed so every run sees the same split.
        tr_idx, val_idx = (torch.as_tensor(i) for i in D.stratified_split(ty, cfg.val_fraction,
                                                                          seed=cfg.subset_seed))
        vx, vy, tx, ty = tx[val_idx], ty[val_idx], tx[tr_idx], ty[tr_idx]
        source = f"{cfg.val_fraction:.0%} of train, stratified (seed {cfg.subset_seed})"
    mean, std = D.NORMALIZATION[_NORM_NAME[cfg.kind]]
    return DataBundle(tx, ty, vx, vy, test.images if test is not None else None,
                      test.labels if test is not None else None, list(train.classes), list(mean), list(std),
                      val_source=source)


def load_data(cfg: DataConfig, seed: int, cache_root: Path) -> DataBundle:
    """Read the configured dataset into memory, split validation, take the stratified subset."""
    bundle = _synthetic(cfg, seed) if cfg.kind == "synthetic" else _read(cfg, cache_root)
    if cfg.subset is not None:
        if cfg.subset > len(bundle.train_y):
            raise InvalidArgument(f"data.subset={cfg.subset} exceeds the {len(bundle.train_y)} training samples")
        if cfg.subset < len(bundle.train_y):
            idx = torch.as_tensor(D.stratified_subset(bundle.train_y, cfg.subset, seed=cfg.subset_seed))
            bundle.train_x, bundle.train_y = bundle.train_x[idx], bundle.train_y[idx]
    if cfg.image_size and tuple(bundle.train_x.shape[-2:]) != (cfg.image_size, cfg.image_size):
        # Kept small in memory (50k CIFAR at 224x224 would be 7.5 GB); each batch is upsampled on the device.
        bundle.resize = cfg.image_size
    if cfg.mean is not None:
        bundle.mean = list(cfg.mean)
    if cfg.std is not None:
        bundle.std = list(cfg.std)
    if len(bundle.mean) != bundle.train_x.shape[1] or len(bundle.std) != bundle.train_x.shape[1]:
        raise InvalidArgument(f"data.mean/std need {bundle.train_x.shape[1]} values (one per channel)")
    n_train = len(bundle.train_y)
    if cfg.train_eval_size < n_train:
        bundle.train_eval_idx = torch.as_tensor(D.stratified_subset(bundle.train_y, cfg.train_eval_size,
                                                                    seed=cfg.subset_seed))
    h = hashlib.sha256()
    for t in (bundle.train_x, bundle.train_y, bundle.val_x, bundle.val_y, bundle.test_x, bundle.test_y):
        if t is not None:
            h.update(t.contiguous().numpy().tobytes())
    bundle.version = h.hexdigest()[:16]
    return bundle


class PreNormalized:
    """Without augmentation, the training set normalised to float once, as a bare loop would hold it.

    A batch is then one index_select instead of gather + convert + normalise (four passes over the batch,
    each a parallel region); the sample order is the loader's own (its shuffle and rank sharding).
    """

    def __init__(self, loader: D.InMemoryLoader, data: DataBundle, device: torch.device):
        self.loader = loader
        normalize = Normalizer(data.mean, data.std, device)
        self.x = torch.empty(data.train_x.shape, dtype=torch.float32, device=device)
        for i in range(0, len(data.train_x), 4096):
            self.x[i:i + 4096] = normalize(data.train_x[i:i + 4096].to(device))
        self.y = data.train_y.to(device)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        order = self.loader.indices().to(self.x.device)
        bs = self.loader.batch_size
        for b in range(len(self.loader)):
            idx = order[b * bs:(b + 1) * bs]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


def make_train_loader(cfg: TrainConfig, data: DataBundle, dist: DistInfo, device: torch.device):
    """Shuffled, augmented (when configured), normalised training batches of this rank."""
    if cfg.batch_size % dist.world_size:
        raise InvalidArgument(f"batch_size {cfg.batch_size} is not divisible by the {dist.world_size} processes")
    a = cfg.data.augment
    augment = D.AugmentConfig(
        crop_padding=a.crop, hflip=0.5 if a.flip else 0.0, rotate_deg=a.rotation, brightness=a.color_jitter,
        contrast=a.color_jitter, saturation=a.color_jitter, grayscale=a.grayscale, mixup_alpha=a.mixup,
        cutmix_alpha=a.cutmix) if a.enabled else None
    # The loader shards one shared permutation by rank, so the per-rank batches of step k together are
    # exactly the single-process batch k: the global batch stays cfg.batch_size.
    loader = D.InMemoryLoader(
        D.InMemoryDataset(data.train_x, data.train_y, data.classes),
        batch_size=cfg.batch_size // dist.world_size, shuffle=True, augment=augment, seed=cfg.seed,
        drop_last=False, rank=dist.rank, world_size=dist.world_size, mean=data.mean, std=data.std, device=device,
    )
    if augment is None and data.train_x.numel() * 4 <= _PRENORMALIZE_MAX_BYTES:
        return PreNormalized(loader, data, device)
    return loader
