"""Image folders: ``root/<class>/*.png|jpg``, or split into ``root/train|val|test/<class>/...``.

Images are decoded once, resized to a fixed size and held as one uint8 tensor, like every other
dataset here. Class indices follow the sorted class folder names, shared across splits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.data.memory import InMemoryDataset, resolve_source
from shared.errors import InvalidArgument, NotFound
from shared.logs import get_logger

log = get_logger(__name__)

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0:
        raise InvalidArgument(f"image size must be positive, got {size!r}")
    return h, w


def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_image(path: Path, hw: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if resize == "center_crop":
                im = ImageOps.fit(im, (hw[1], hw[0]), Image.Resampling.BILINEAR)
            else:
                im = im.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidArgument(f"cannot decode image {path}: {exc}") from exc
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _read_dir(root: Path, hw: tuple[int, int], channels: int, classes: list[str], resize: str,
              name: str) -> InMemoryDataset:
    images, labels = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS) if folder.is_dir() else []
        if not files:
            log.warning("class folder has no images", extra={"folder": str(folder)})
        for path in files:
            images.append(_load_image(path, hw, channels, resize))
            labels.append(label)
    if not images:
        raise NotFound(f"no images ({', '.join(sorted(EXTENSIONS))}) under {root}/<class>/")
    return InMemoryDataset(np.stack(images), np.asarray(labels, dtype=np.int64), classes, name)


def image_folder_splits(root: str | Path) -> list[str]:
    """The split folders of ``root`` (train/val/...) or [] when its subfolders are the classes."""
    root = Path(root)
    return [s for s in SPLIT_NAMES if (root / s).is_dir()] if (root / "train").is_dir() else []


def read_image_folder(root: str | Path, size: int | Sequence[int] = 64, *, channels: Literal[1, 3] = 3,
                      classes: Sequence[str] | None = None, resize: Literal["stretch", "center_crop"] = "stretch",
                      store_url: str | None = None, cache_dir: str | Path | None = None) -> InMemoryDataset:
    """One ``root/<class>/*`` folder, every image resized to ``size`` (H, W or one int).

    ``classes`` fixes the class order (and so the label ids); by default the sorted folder names.
    """
    if channels not in (1, 3):
        raise InvalidArgument(f"channels must be 1 or 3, got {channels}")
    local = resolve_source(root, store_url, cache_dir)
    if not local.is_dir():
        raise NotFound(f"image folder {local} is not a directory")
    names = list(classes) if classes is not None else _class_dirs(local)
    if not names:
        raise NotFound(f"{local} has no class subfolders")
    return _read_dir(local, _size(size), channels, names, resize, local.name)


def read_image_folder_splits(root: str | Path, size: int | Sequence[int] = 64, *, channels: Literal[1, 3] = 3,
                             resize: Literal["stretch", "center_crop"] = "stretch", store_url: str | None = None,
                             cache_dir: str | Path | None = None) -> dict[str, InMemoryDataset]:
    """Every split of ``root`` ({"train": ..., "val": ...}), or {"all": ...} for a flat class layout.

    All splits share one class list (the union of their class folders), so label ids agree.
    """
    local = resolve_source(root, store_url, cache_dir)
    splits = image_folder_splits(local)
    if not splits:
        return {"all": read_image_folder(local, size, channels=channels, resize=resize)}
    classes = sorted(set().union(*(_class_dirs(local / s) for s in splits)))
    return {s: read_image_folder(local / s, size, channels=channels, classes=classes, resize=resize)
            for s in splits}
