"""Streaming reader of trajectory-video shards (written by services.render.trajectories).

A dataset is a published store prefix whose manifest meta lists its shards. ``TrajectoryShards``
is an ``IterableDataset``: each DataLoader worker (and each distributed rank) takes its own
shards, fetches one compressed shard (~10 MB), checks its sha256 against the manifest before any of
its samples is used, and decompresses it as a stream, one sample (1.5 MB) at a time. Shuffling is
shard order per epoch plus a bounded in-memory shuffle buffer, so memory stays at one compressed shard
and ``shuffle_buffer`` samples per worker, whatever the dataset's size (10,000 samples are ~15 GB as
uint8 tensors).

Each item is a dict: ``video`` uint8 (4, 32, 3, 64, 64), ``label`` int64, ``future_position``
float32 (3,), ``positions`` float32 (32, 3) (the ball at every rendered frame, for the baselines),
``index`` int64 (the sample's id in the dataset).
"""
from __future__ import annotations

import copy
import hashlib
import io
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import zstandard
from torch.utils.data import IterableDataset, get_worker_info

from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument
from shared.storage import ArtifactStore, dataset_source, open_store, split_location
from shared.storage.manifest import reading_meta

KIND = "trajectories"


def locate(location: str) -> tuple[ArtifactStore, str]:
    """(store, prefix) of a published trajectory dataset at a path, ``file://``, ``s3://`` or ``store:``."""
    root, store_url = dataset_source(location)
    if store_url is None:
        store_url, root = split_location(root)
    return open_store(store_url), root


def read_index(store: ArtifactStore, prefix: str) -> dict[str, Any]:
    """The trainer's view of a published trajectory dataset: shards, sizes, digests, class counts."""
    prefix = prefix.strip("/")
    manifest = store.read_manifest(prefix)
    with reading_meta(f"{store.url}/{prefix}"):
        return _index(store, prefix, manifest)


def _index(store: ArtifactStore, prefix: str, manifest) -> dict[str, Any]:
    meta = manifest.meta
    if meta.get("kind") != KIND:
        raise FailedPrecondition(f"{prefix!r} is a {meta.get('kind')!r} dataset, not {KIND!r}")
    shards = []
    for shard in meta["shards"]:
        videos, labels = manifest.files[shard["videos"]], manifest.files[shard["labels"]]
        shards.append({
            **shard,
            "videos_size": videos.size, "videos_sha256": videos.sha256,
            "labels_size": labels.size, "labels_sha256": labels.sha256,
        })
    return {
        "type": "trajectory_shards",
        "store": store.url,
        "prefix": prefix,
        "generator_version": meta.get("generator_version"),
        "seed": meta.get("seed"),
        "classes": meta["config"]["classes"],
        # Frames between the clip's last frame and the position to predict.
        "future_offset": meta["config"].get("future_offset"),
        "sample_shape": meta["sample_shape"],
        "num_samples": meta["num_samples"],
        "class_distribution": meta["class_distribution"],
        "cameras_params": meta.get("cameras_params"),
        "shards": shards,
    }


def split_shards(index: dict[str, Any], val_fraction: float = 0.1) -> tuple[list[int], list[int]]:
    """(train, val) shard ids: the last shards are validation. Classes cycle every 4 items, so each
    shard is class-balanced and a shard-level split is a stratified one."""
    ids = [s["index"] for s in index["shards"]]
    if not 0 <= val_fraction < 1:
        raise InvalidArgument(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(ids) > 1:
        n_val = 1
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:]


def three_way_split(index: dict[str, Any], val_fraction: float, test_fraction: float,
                    seed: int) -> dict[str, list[int]]:
    """{"train", "val", "test"} shard ids, shards shuffled by ``seed`` (the dataset's own, so every run
    and every study trial on this dataset sees the same split); each split gets at least one shard."""
    ids = [s["index"] for s in index["shards"]]
    if len(ids) < 3:
        raise InvalidArgument(f"{len(ids)} shards cannot make train, val and test splits; render more or smaller")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InvalidArgument(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) "
                              "and leave some training data")
    random.Random(seed).shuffle(ids)
    n_val = max(1, round(len(ids) * val_fraction))
    n_test = max(1, round(len(ids) * test_fraction))
    return {"test": sorted(ids[:n_test]), "val": sorted(ids[n_test:n_test + n_val]),
            "train": sorted(ids[n_test + n_val:])}


def _read_exact(reader, n: int) -> np.ndarray:
    buf = np.empty(n, np.uint8)  # every byte is written below: no zero-filling 1.5 MB per sample
    view, got = memoryview(buf), 0
    while got < n:
        k = reader.readinto(view[got:])
        if not k:
            raise IntegrityError(f"shard ended after {got} of {n} expected bytes")
        got += k
    return buf


def read_labels(store: ArtifactStore, prefix: str, shard: dict[str, Any], verify: bool = True) -> np.ndarray:
    """A shard's structured labels (class_label, future_position, positions, index), checked against the
    manifest: small, so the trainer reads them alone for the training split's target statistics."""
    key = f"{prefix}/{shard['labels']}"
    data = store.get_bytes(key)
    if verify and hashlib.sha256(data).hexdigest() != shard["labels_sha256"]:
        raise IntegrityError(f"{store.url}/{key} does not match its manifest sha256")
    return np.load(io.BytesIO(data), allow_pickle=False)


def iter_shard(store: ArtifactStore, prefix: str, shard: dict[str, Any], verify: bool = True) -> Iterator[dict]:
    """Yield the samples of one shard in order; with ``verify`` the shard's bytes are checked against the
    manifest before the first sample is yielded (a corrupt shard yields nothing)."""
    labels = read_labels(store, prefix, shard, verify)
    videos_key = f"{prefix}/{shard['videos']}"
    compressed = store.get_bytes(videos_key)  # ~10 MB: frames compress 30-60x
    if verify and (len(compressed) != shard["videos_size"]
                   or hashlib.sha256(compressed).hexdigest() != shard["videos_sha256"]):
        raise IntegrityError(f"{store.url}/{videos_key} does not match its manifest sha256")
    with io.BytesIO(compressed) as source:
        reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        version = np.lib.format.read_magic(reader)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _fortran, dtype = read_header(reader)
        if shape[0] != len(labels) or dtype != np.uint8:
            raise IntegrityError(f"{videos_key}: header {shape} {dtype} does not match {len(labels)} labels")
        sample_bytes = int(np.prod(shape[1:]))
        for row in labels:
            try:
                chunk = _read_exact(reader, sample_bytes)
            except zstandard.ZstdError as exc:
                raise IntegrityError(f"{store.url}/{videos_key} is corrupt: {exc}") from exc
            video = chunk.reshape(shape[1:])
            yield {
                "video": torch.from_numpy(video),
                "label": torch.tensor(int(row["class_label"])),
                "future_position": torch.from_numpy(row["future_position"].astype(np.float32)),
                "positions": torch.from_numpy(row["positions"].astype(np.float32)),
                "index": torch.tensor(int(row["index"])),
            }


class TrajectoryShards(IterableDataset):
    """Stream a trajectory dataset from ``store`` (an ArtifactStore or a store URL) at ``prefix``."""

    def __init__(
        self,
        store: ArtifactStore | str,
        prefix: str,
        *,
        shards: Sequence[int] | None = None,
        shuffle: bool = False,
        shuffle_buffer: int = 64,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
        transform: Callable[[dict], dict] | None = None,
    ):
        super().__init__()
        # Workers reopen the store from its URL: S3 clients do not survive being pickled or forked.
        self.store_url = store if isinstance(store, str) else store.url
        self.prefix = prefix.strip("/")
        self.index = read_index(open_store(self.store_url), self.prefix)
        by_id = {s["index"]: s for s in self.index["shards"]}
        wanted = list(by_id) if shards is None else list(shards)
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise InvalidArgument(f"{self.prefix!r} has no shard(s) {missing}")
        self.shards = [by_id[i] for i in wanted]
        if not 0 <= rank < world_size:
            raise InvalidArgument(f"rank {rank} is outside world_size {world_size}")
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, max(1, shuffle_buffer), seed
        self.rank, self.world_size, self.verify = rank, world_size, verify
        # Applied to each sample where it is read (in the DataLoader worker), before the shuffle buffer: the
        # trainer subsamples the clip there, so the buffer and the hand-off to the trainer hold 1/8 of it.
        self.transform = transform
        self.epoch = 0
        self.classes = self.index["classes"]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch (identically across ranks, so they split the same order)."""
        self.epoch = epoch

    def split(self, parts: int) -> list[TrajectoryShards]:
        """This reader as ``parts`` readers of disjoint shards (as many ranks), e.g. one per reading thread."""
        out = []
        for i in range(parts):
            part = copy.copy(self)
            part.rank, part.world_size = self.rank * parts + i, self.world_size * parts
            out.append(part)
        return out

    def _my_shards(self) -> list[dict]:
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stride, offset = self.world_size * n_workers, self.rank * n_workers + worker
        return order[offset::stride]

    def __len__(self) -> int:
        # Samples this rank sees (exact when shards divide evenly between ranks).
        return sum(s["samples"] for s in self.shards[self.rank::self.world_size])

    def __iter__(self) -> Iterator[dict]:
        store = open_store(self.store_url)
        samples = (item for shard in self._my_shards()
                   for item in iter_shard(store, self.prefix, shard, self.verify))
        if self.transform is not None:
            samples = map(self.transform, samples)
        if not self.shuffle:
            yield from samples
            return
        info = get_worker_info()
        rng = random.Random(hash((self.seed, self.epoch, self.rank, info.id if info else 0)))
        buffer: list[dict] = []
        for item in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            slot = rng.randrange(len(buffer))
            yield buffer[slot]
            buffer[slot] = item
        rng.shuffle(buffer)
        yield from buffer
