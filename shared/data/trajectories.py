"""Streaming reader of trajectory-video shards (written by services.render.trajectories).

A dataset is a published store prefix whose manifest meta lists its shards. ``TrajectoryShards``
is an ``IterableDataset``: each DataLoader worker (and each distributed rank) takes its own
shards, decompresses them as a stream straight from the store, one sample (1.5 MB) at a time,
and checks every shard's sha256 against the manifest as it goes. Shuffling is shard order per
epoch plus a bounded in-memory shuffle buffer, so memory stays at ``shuffle_buffer`` samples.

Each item is a dict: ``video`` uint8 (4, 32, 3, 64, 64), ``label`` int64, ``future_position``
float32 (3,), ``index`` int64 (the sample's id in the dataset).
"""
from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import torch
import zstandard
from torch.utils.data import IterableDataset, get_worker_info

from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument
from shared.storage import ArtifactStore, open_store

KIND = "trajectories"


def read_index(store: ArtifactStore, prefix: str) -> dict[str, Any]:
    """The trainer's view of a published trajectory dataset: shards, sizes, digests, class counts."""
    prefix = prefix.strip("/")
    manifest = store.read_manifest(prefix)
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


class _HashingReader:
    """Wraps a binary stream and hashes every byte read through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _read_exact(reader, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = reader.readinto(view[got:])
        if not k:
            raise IntegrityError(f"shard ended after {got} of {n} expected bytes")
        got += k
    return buf


def iter_shard(store: ArtifactStore, prefix: str, shard: dict[str, Any], verify: bool = True) -> Iterator[dict]:
    """Yield the samples of one shard in order, streaming and (optionally) verifying it."""
    labels_key = f"{prefix}/{shard['labels']}"
    labels_bytes = store.get_bytes(labels_key)
    if verify and hashlib.sha256(labels_bytes).hexdigest() != shard["labels_sha256"]:
        raise IntegrityError(f"{store.url}/{labels_key} does not match its manifest sha256")
    labels = np.load(io.BytesIO(labels_bytes), allow_pickle=False)
    videos_key = f"{prefix}/{shard['videos']}"
    with store.open_read(videos_key) as raw:
        source = _HashingReader(raw)
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
            video = np.frombuffer(chunk, np.uint8).reshape(shape[1:])
            yield {
                "video": torch.from_numpy(video),
                "label": torch.tensor(int(row["class_label"])),
                "future_position": torch.from_numpy(row["future_position"].astype(np.float32)),
                "index": torch.tensor(int(row["index"])),
            }
        if verify:
            source.drain()
            if source.sha.hexdigest() != shard["videos_sha256"] or source.size != shard["videos_size"]:
                raise IntegrityError(f"{store.url}/{videos_key} does not match its manifest sha256")


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
        self.epoch = 0
        self.classes = self.index["classes"]

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently each epoch (identically across ranks, so they split the same order)."""
        self.epoch = epoch

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
