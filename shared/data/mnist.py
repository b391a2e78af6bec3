"""MNIST in its published IDX format (raw or gzip), also fitting Fashion-MNIST and KMNIST.

IDX: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension and the data. Every header field and the payload size are checked,
so a truncated download fails here with a clear message instead of as a reshape error in training.
"""
from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.data.memory import InMemoryDataset, resolve_source
from shared.errors import InvalidArgument, NotFound

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_CLASSES = [str(i) for i in range(10)]


def _read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        try:
            return gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as exc:
            raise InvalidArgument(f"{path}: not a valid gzip file ({exc})") from exc
    return path.read_bytes()


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one IDX blob into an array of its declared shape."""
    if len(data) < 4:
        raise InvalidArgument(f"{source}: {len(data)} bytes is too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES:
        raise InvalidArgument(f"{source}: bad IDX magic number 0x{data[:4].hex()}")
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise InvalidArgument(f"{source}: IDX header declares {ndim} dimensions but is truncated")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise InvalidArgument(f"{source}: IDX shape {'x'.join(map(str, dims))} needs {expected} data bytes, "
                              f"file has {payload}")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"IDX file {path} does not exist")
    return parse_idx(_read_bytes(path), str(path))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8 or int8) as IDX; gzip-compressed when ``path`` ends in .gz."""
    array = np.ascontiguousarray(array)
    if array.dtype not in _CODES or array.ndim == 0:
        raise InvalidArgument(f"write_idx takes uint8/int8 arrays with 1+ dims, got {array.dtype} {array.shape}")
    blob = struct.pack(">HBB", 0, _CODES[array.dtype], array.ndim)
    blob += struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def _find(root: Path, stem: str) -> Path:
    # The published names, the ".idx" spelling some mirrors use, each raw or gzipped.
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        if (root / name).is_file():
            return root / name
    raise NotFound(f"{root} has no {stem} (or {stem}.gz)")


def _split(root: Path, split: str, classes: list[str]) -> InMemoryDataset:
    img_path, lbl_path = (_find(root, stem) for stem in FILES[split])
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InvalidArgument(f"{img_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise InvalidArgument(f"{lbl_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise InvalidArgument(f"{img_path.name} has {len(images)} images but {lbl_path.name} "
                              f"{len(labels)} labels")
    if len(labels) and labels.max() >= len(classes):
        raise InvalidArgument(f"{lbl_path}: label {labels.max()} out of range for {len(classes)} classes")
    return InMemoryDataset(images[:, None].copy(), labels.astype(np.int64), classes, f"mnist-{split}")


def read_mnist(root: str | Path, *, store_url: str | None = None, cache_dir: str | Path | None = None,
               classes: Sequence[str] | None = None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, test) from the four IDX files in ``root`` (a key prefix when ``store_url`` is given)."""
    local = resolve_source(root, store_url, cache_dir)
    names = list(classes) if classes is not None else MNIST_CLASSES
    return _split(local, "train", names), _split(local, "test", names)
