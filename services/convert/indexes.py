"""Dataset indexes the trainer reads instead of listing a store.

- Image folders (``<split>/<class>/<file>`` or ``<class>/<file>``) -> a classification manifest:
  classes (sorted names = label ids), per-split per-class counts, and every file with its label.
- Trajectory shards -> the shard index of ``shared.data.trajectories.read_index``.

Both come from a published store prefix (``*_from_store``) or, for image folders, a local
directory, and are published with ``publish_index`` as ``<out_prefix>/index.json``.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared.errors import InvalidArgument
from shared.storage import ArtifactStore, Manifest, open_location, open_output

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INDEX_NAME = "index.json"


def image_folder_index(paths: Iterable[str], source: str = "") -> dict[str, Any]:
    """Build a classification index from relative file paths; non-images are ignored."""
    by_split: dict[str, list[tuple[str, str]]] = {}
    for rel in sorted(paths):
        if not rel.lower().endswith(IMAGE_EXTENSIONS):
            continue
        parts = rel.split("/")
        if len(parts) == 3:
            split, cls = parts[0], parts[1]
        elif len(parts) == 2:
            split, cls = "train", parts[0]  # no split level: everything is training data
        else:
            raise InvalidArgument(f"{source or 'image folder'}: {rel!r} is not <split>/<class>/<file> "
                                  "or <class>/<file>")
        by_split.setdefault(split, []).append((rel, cls))
    if not by_split:
        raise InvalidArgument(f"{source or 'image folder'} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted({cls for items in by_split.values() for _, cls in items})
    label = {cls: i for i, cls in enumerate(classes)}
    splits = {}
    for split, items in sorted(by_split.items()):
        counts = dict.fromkeys(classes, 0)
        for _, cls in items:
            counts[cls] += 1
        splits[split] = {"total": len(items), "counts": counts,
                         "files": [[rel, label[cls]] for rel, cls in items]}
    return {"type": "image_folder", "source": source, "classes": classes, "splits": splits}


def image_folder_from_dir(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    if not root.is_dir():
        raise InvalidArgument(f"image folder {root} is not a directory")
    paths = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return image_folder_index(paths, source=str(root))


def image_folder_from_store(store: ArtifactStore, prefix: str) -> dict[str, Any]:
    """Index a published image-folder dataset from its manifest (the files it vouches for)."""
    prefix = prefix.strip("/")
    manifest = store.read_manifest(prefix)
    index = image_folder_index(manifest.files, source=f"{store.url}/{prefix}")
    index["prefix"] = prefix
    return index


def trajectory_from_store(store: ArtifactStore, prefix: str) -> dict[str, Any]:
    # Imported here: the reader pulls in torch, which the image-folder path does not need.
    from shared.data.trajectories import read_index

    return read_index(store, prefix)


def publish_index(store: ArtifactStore, out_prefix: str, index: dict[str, Any]) -> Manifest:
    data = json.dumps(index, indent=1, sort_keys=True).encode()
    meta = {"kind": f"{index['type']}_index", "source": index.get("source") or index.get("prefix")}
    return store.publish(out_prefix, {INDEX_NAME: data}, meta=meta)


def index_dataset(kind: str, path: str, out: str = "") -> tuple[str, dict[str, Any]]:
    """Index the published dataset at ``path`` and publish the index at ``out`` (default ``<path>-index``);
    ``kind`` is "image-folder" or "trajectories". Returns (where the index went, the index).

    Every file the index vouches for (each trajectory shard, each image) is checked against the manifest
    first: an index of damaged data is refused (IntegrityError), not published."""
    out = out or f"{path.rstrip('/')}-index"
    out_store, out_prefix = open_output(out)
    store, prefix = open_location(path)
    store.verify(prefix)
    index = image_folder_from_store(store, prefix) if kind == "image-folder" else trajectory_from_store(store, prefix)
    publish_index(out_store, out_prefix, index)
    return out, index
