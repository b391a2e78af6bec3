"""CIFAR-10 in its published "python version" format: pickled batches.

Why a pickle reader at all when the design forbids unpickling untrusted data: the published format
IS pickle (``data_batch_1..5``, ``test_batch``, ``batches.meta``), and there is no other official
encoding. So the batches are read with a restricted Unpickler whose ``find_class`` allows only what
these files reconstruct: numpy's array rebuild functions, ``numpy.ndarray``, ``numpy.dtype``, and
``_codecs.encode`` (a pure data transform Python 3 uses to write bytes at pickle protocol 2).
dicts, lists, bytes, str and ints are pickle opcodes and need no global lookup. Any other global (the
``os.system`` of a malicious file) is refused before anything is called.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.memory import InMemoryDataset, resolve_source
from shared.errors import InvalidArgument, NotFound

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# (module, name) pairs a CIFAR batch may reference. The published files were written by Python 2 numpy
# ("numpy.core"); numpy 2 writes "numpy._core". Both resolve to numpy._core.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def safe_unpickle(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle CIFAR-style data (Python 2 pickles read with bytes keys) allowing only numpy arrays."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InvalidArgument(f"{source}: not a valid CIFAR pickle: {exc}") from exc


def _get(d: dict, key: str) -> Any:
    """Python 2 pickles have bytes keys, Python 3 ones str keys."""
    if key in d:
        return d[key]
    return d.get(key.encode())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise NotFound(f"CIFAR file {path} does not exist")
    obj = safe_unpickle(path.read_bytes(), str(path))
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def read_cifar_batch(path: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    path = Path(path)
    batch = _load(path)
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise InvalidArgument(f"{path}: 'data' must be a uint8 array (N, 3072), got {shape}")
    if labels is None or len(labels) != len(data):
        raise InvalidArgument(f"{path}: {len(data)} images but {0 if labels is None else len(labels)} labels")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidArgument(f"{path}: labels must lie in [0, {num_classes})")
    # Rows are the 1024 red, then green, then blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(root: str | Path, *, store_url: str | None = None,
                 cache_dir: str | Path | None = None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train 50k, test 10k) from the directory of python batches (``cifar-10-batches-py``).

    ``root`` is a key prefix in the store when ``store_url`` is given.
    """
    local = resolve_source(root, store_url, cache_dir)
    classes = CIFAR10_CLASSES
    if (local / META).is_file():
        names = _get(_load(local / META), "label_names")
        if not isinstance(names, list) or not names:
            raise InvalidArgument(f"{local / META}: 'label_names' must be a non-empty list")
        classes = [_text(n) for n in names]
    parts = [read_cifar_batch(local / name, len(classes)) for name in TRAIN_BATCHES]
    train = InMemoryDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                            classes, "cifar10-train")
    images, labels = read_cifar_batch(local / TEST_BATCH, len(classes))
    return train, InMemoryDataset(images, labels, classes, "cifar10-test")
