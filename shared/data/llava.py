"""A converted TinyLLaVA dataset (``services.convert.tinyllava``) as a trainer reads it.

The converted dataset is published (``MANIFEST.json``) with ``tinyllava_metadata.json`` and one JSON list of
LLaVA records per split (``train.json``, ``val.json`` and, with a split file, ``test.json``). Its images live in
the rendered dataset it names (``image_folder``: a local folder or an ``s3://`` URL, ending in ``/images``);
every image read is checked against that rendered dataset's manifest, so a view changed after conversion is
an error, not silently different training data.

Bounds checked before any work: at most ``MAX_RECORDS`` records per split, images at most ``MAX_IMAGE_SIDE``
pixels on a side (``PIL``'s decompression-bomb guard aside).
"""
from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shared.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from shared.storage import ArtifactStore, dataset_source, open_store, split_location
from shared.storage.manifest import check_entry, hash_bytes

METADATA_FILE = "tinyllava_metadata.json"
SPLITS = ("train", "val", "test")
MAX_RECORDS = 500_000
MAX_IMAGE_SIDE = 4096


@dataclass
class LlavaDataset:
    location: str
    meta: dict[str, Any]
    records: dict[str, list[dict]]  # split -> LLaVA records, as the converter wrote them
    version: str  # digest of the records' files (their manifest sha256s)
    image_store: ArtifactStore
    image_prefix: str  # the rendered dataset's prefix in image_store (its images are under images/)

    def model_id(self, record: dict) -> str:
        """The CAD model a record describes (records of one model share it: ``<model>_<view>``)."""
        return str(record["id"]).rsplit("_", 1)[0]

    def load_images(self, records: list[dict], size: int, threads: int = 2) -> torch.Tensor:
        """uint8 (N, 3, size, size) RGB of the records' images, area-averaged (BOX) to ``size``, each checked
        against the rendered dataset's manifest."""
        manifest = self.image_store.read_manifest(self.image_prefix)

        def one(record: dict) -> np.ndarray:
            rel = f"images/{record['image']}"
            entry = manifest.files.get(rel)
            if entry is None:
                raise NotFound(f"{rel} (record {record.get('id')!r}) is not in the manifest of "
                               f"{self.image_store.url}/{self.image_prefix}")
            data = self.image_store.get_bytes(f"{self.image_prefix}/{rel}")
            check_entry(entry, hash_bytes(data), f"{self.image_store.url}/{self.image_prefix}/{rel}")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    if max(im.size) > MAX_IMAGE_SIDE:
                        raise InvalidArgument(f"{rel} is {im.size[0]}x{im.size[1]}, above {MAX_IMAGE_SIDE} px")
                    im = im.convert("RGB")
                    if im.size != (size, size):
                        im = im.resize((size, size), Image.Resampling.BOX)
                    return np.asarray(im)
            except (UnidentifiedImageError, OSError) as exc:
                raise IntegrityError(f"{rel} is not a decodable image: {exc}") from None

        with ThreadPoolExecutor(max(1, threads)) as pool:  # PNG decoding releases the GIL
            arrays = list(pool.map(one, records))
        if not arrays:
            return torch.zeros(0, 3, size, size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _locate(location: str) -> tuple[ArtifactStore, str]:
    root, store_url = dataset_source(location)
    if store_url is None:
        store_url, root = split_location(root)
    return open_store(store_url), root.strip("/")


def read_llava(location: str) -> LlavaDataset:
    """The converted dataset at a path, ``file://``, ``s3://`` or ``store:`` location, records read and verified."""
    store, prefix = _locate(location)
    manifest = store.read_manifest(prefix)
    if METADATA_FILE not in manifest.files:
        raise FailedPrecondition(f"{location} is not a converted TinyLLaVA dataset (no {METADATA_FILE})")
    meta = json.loads(store.get_verified(prefix, METADATA_FILE))
    files = meta.get("files") or {}
    records: dict[str, list[dict]] = {}
    digest = hashlib.sha256()
    for split in SPLITS:
        name = files.get(split)
        if not name:
            records[split] = []
            continue
        data = store.get_verified(prefix, name)
        digest.update(f"{split}:{manifest.files[name].sha256};".encode())
        items = json.loads(data)
        if not isinstance(items, list):
            raise IntegrityError(f"{location}/{name} is not a JSON list of records")
        if len(items) > MAX_RECORDS:
            raise InvalidArgument(f"{location}/{name} holds {len(items)} records, above the bound {MAX_RECORDS}")
        records[split] = items
    if not records["train"]:
        raise FailedPrecondition(f"{location} has no training records")
    folder = str(meta.get("image_folder") or "").rstrip("/")
    if not folder.endswith("/images"):
        raise FailedPrecondition(f"{location}: image_folder {folder!r} is not a rendered dataset's images/ folder")
    image_store, image_prefix = _locate(folder[: -len("/images")])
    return LlavaDataset(location, meta, records, digest.hexdigest()[:16], image_store, image_prefix)
