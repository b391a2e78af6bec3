"""In-memory uint8 datasets and a batch loader that augments whole batches as tensors.

Small-image datasets (MNIST, CIFAR-10, logo crops) fit in memory as one uint8 tensor, so loading a
batch is one ``index_select`` and augmentation is a handful of batched tensor ops: no worker
processes, no per-sample PIL, and it can run on the accelerator (``device=``). All randomness comes
from ``torch.Generator``s seeded from (seed, epoch, rank), so a run replays exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from shared.data.augment import AugmentConfig, BatchAugment
from shared.errors import IntegrityError, InvalidArgument, NotFound
from shared.logs import get_logger
from shared.preprocess import Normalizer
from shared.settings import load_settings

log = get_logger(__name__)


class InMemoryDataset(torch.utils.data.Dataset):
    """``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes`` the label names."""

    def __init__(self, images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | Sequence[int],
                 classes: Sequence[str], name: str = ""):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise InvalidArgument(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise InvalidArgument(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise InvalidArgument(f"labels must lie in [0, {len(classes)}), got {int(labels.min())}.."
                                  f"{int(labels.max())}")
        self.images = images.contiguous()
        self.labels = labels
        self.classes = list(classes)
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor, name: str | None = None) -> InMemoryDataset:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return InMemoryDataset(self.images.index_select(0, idx), self.labels.index_select(0, idx),
                               self.classes, self.name if name is None else name)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, for ``shared.preprocess.Normalizer``."""
        x = self.images.float().div_(255).transpose(0, 1).reshape(self.images.shape[1], -1)
        return x.mean(1).tolist(), x.std(1).tolist()

    def __repr__(self) -> str:
        return (f"InMemoryDataset({self.name!r}, n={len(self)}, shape={self.image_shape}, "
                f"classes={self.num_classes})")


def _derive_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class InMemoryLoader:
    """Iterates ``(x, y)``: ``x`` float32 (B, C, H, W) normalised, ``y`` int64 (B,) or soft (B, K) targets.

    ``augment`` is an AugmentConfig (or a BatchAugment); ``mean``/``std`` normalise after it (plain
    [0, 1] scaling when None). For distributed runs every rank gets ``ceil(N / world_size)`` samples of
    one shared permutation, wrapping around so all ranks run the same number of steps. ``drop_last``
    drops a final incomplete batch. ``device`` copies the uint8 data there once so batching and
    augmentation run on it. Call ``set_epoch(e)`` before each epoch for a fresh, reproducible order.
    """

    def __init__(self, dataset: InMemoryDataset, batch_size: int, shuffle: bool = False,
                 augment: AugmentConfig | BatchAugment | None = None, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, device: str | torch.device | None = None):
        if batch_size <= 0:
            raise InvalidArgument(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is not in a world of size {world_size}")
        if (mean is None) != (std is None):
            raise InvalidArgument("give both mean and std, or neither")
        if len(dataset) == 0:
            raise InvalidArgument("cannot load batches from an empty dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        if isinstance(augment, AugmentConfig):
            augment = BatchAugment(augment, num_classes=dataset.num_classes)
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.normalizer = Normalizer(mean, std, self.device) if mean is not None else None
        if self.normalizer is not None and self.normalizer.channels != dataset.image_shape[0]:
            raise InvalidArgument(f"normalisation has {self.normalizer.channels} channels, images have "
                                  f"{dataset.image_shape[0]}")
        self.epoch = 0
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().to(self.device)
        g = torch.Generator(device=self.device).manual_seed(_derive_seed(self.seed, self.epoch, self.rank, 1))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self._images.index_select(0, idx)
            y = self._labels.index_select(0, idx)
            if self.augment is not None:
                x, y = self.augment(x, y, g)
                x = self.normalizer.from_unit(x) if self.normalizer is not None else x
            else:
                x = self.normalizer(x) if self.normalizer is not None else x.float().div_(255)
            yield x, y


def verify_local(path: Path) -> None:
    """A local dataset folder that carries a manifest (a render's output, a published prefix on disk) is read
    only as published, like a store dataset: every file it lists whole, nothing unlisted beside them (a reader
    looking for a file by name must not pick up one the manifest does not vouch for). IntegrityError names
    the first file that differs. A folder without a manifest (a plain download) is read as it is."""
    from shared.storage import MANIFEST_NAME, LocalStore

    path = path.resolve()
    if not (path / MANIFEST_NAME).is_file():
        return
    store = LocalStore(path.parent)
    manifest = store.verify(path.name)
    for key in store.list(path.name):
        rel = key[len(path.name) + 1:]
        if rel != MANIFEST_NAME and rel not in manifest.files and not any(p.startswith(".") for p in rel.split("/")):
            raise IntegrityError(f"{path / rel} is not listed in {path / MANIFEST_NAME}: the folder was changed "
                                 "after it was published")


def resolve_source(root: str | Path, store_url: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local directory holding the dataset files.

    Without ``store_url``, ``root`` is that directory. With it, ``root`` is a key prefix in the store and
    the files are downloaded (verified against the manifest) into a cache dir, reused while the
    store's manifest is unchanged. Default cache: ``$TRAINYARD_HOME/cache/datasets``. A local directory
    with a manifest is verified against it in place (``verify_local``).
    """
    if store_url is None:
        path = Path(root).expanduser()
        if not path.exists():
            raise NotFound(f"dataset path {path} does not exist")
        verify_local(path)
        return path
    from shared.storage import open_store

    prefix = str(root).strip("/")
    base = Path(cache_dir) if cache_dir is not None else load_settings().home / "cache" / "datasets"
    local = base / hashlib.sha256(f"{store_url}|{prefix}".encode()).hexdigest()[:16]
    store = open_store(store_url)
    manifest = store.read_manifest(prefix)
    fingerprint = hashlib.sha256(json.dumps(
        sorted((k, v.size, v.sha256) for k, v in manifest.files.items())).encode()).hexdigest()
    stamp = local / ".trainyard-fingerprint"
    if stamp.is_file() and stamp.read_text() == fingerprint:
        return local
    if local.exists():
        shutil.rmtree(local)
    log.info("downloading dataset", extra={"store": store_url, "prefix": prefix, "files": len(manifest.files)})
    store.download_dir(prefix, local)
    stamp.write_text(fingerprint)
    return local
