"""CIFAR-10 and CIFAR-100 in their published "python version" format: pickled batches.

Why a pickle reader at all when the design forbids unpickling untrusted data: the published format
IS pickle (CIFAR-10: ``data_batch_1..5``, ``test_batch``, ``batches.meta``; CIFAR-100: ``train``,
``test``, ``meta``), and there is no other official encoding. So the batches are read with a
restricted Unpickler whose ``find_class`` allows only what these files reconstruct: numpy's array
rebuild functions, ``numpy.ndarray``, ``numpy.dtype``, and ``_codecs.encode`` (a pure data transform
Python 3 uses to write bytes at pickle protocol 2). dicts, lists, bytes, str and ints are pickle
opcodes and need no global lookup. Any other global (the ``os.system`` of a malicious file) is refused
before anything is called.
"""
from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared.data.memory import InMemoryDataset, resolve_source
from shared.errors import InvalidArgument, NotFound

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_TRAIN, CIFAR100_TEST, CIFAR100_META = "train", "test", "meta"
# CIFAR-100's two label sets: 100 fine classes, grouped into 20 coarse superclasses.
CIFAR100_LABEL_SETS = ("fine", "coarse")

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


def read_cifar_batch(path: str | Path, num_classes: int = 10,
                     label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    ``label_key``: ``labels`` in CIFAR-10, ``fine_labels`` or ``coarse_labels`` in CIFAR-100.
    """
    path = Path(path)
    batch = _load(path)
    data, labels = _get(batch, "data"), _get(batch, label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise InvalidArgument(f"{path}: 'data' must be a uint8 array (N, 3072), got {shape}")
    if labels is None:
        raise InvalidArgument(f"{path}: no {label_key!r} in the batch")
    if len(labels) != len(data):
        raise InvalidArgument(f"{path}: {len(data)} images but {len(labels)} {label_key}")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidArgument(f"{path}: {label_key} must lie in [0, {num_classes})")
    # Rows are the 1024 red, then green, then blue values, each row-major 32x32.
    return data.reshape(-1, 3, 32, 32), labels


def _label_names(path: Path, key: str) -> list[str]:
    names = _get(_load(path), key)
    if not isinstance(names, list) or not names:
        raise InvalidArgument(f"{path}: {key!r} must be a non-empty list")
    return [_text(n) for n in names]


def _read_split(local: Path, files: list[str], classes: list[str], label_key: str, name: str) -> InMemoryDataset:
    parts = [read_cifar_batch(local / f, len(classes), label_key) for f in files]
    return InMemoryDataset(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                           classes, name)


def read_cifar10(root: str | Path, *, store_url: str | None = None,
                 cache_dir: str | Path | None = None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train 50k, test 10k) from the directory of python batches (``cifar-10-batches-py``).

    ``root`` is a key prefix in the store when ``store_url`` is given.
    """
    local = resolve_source(root, store_url, cache_dir)
    classes = _label_names(local / META, "label_names") if (local / META).is_file() else CIFAR10_CLASSES
    return (_read_split(local, TRAIN_BATCHES, classes, "labels", "cifar10-train"),
            _read_split(local, [TEST_BATCH], classes, "labels", "cifar10-test"))


def read_cifar100(root: str | Path, *, labels: Literal["fine", "coarse"] = "fine", store_url: str | None = None,
                  cache_dir: str | Path | None = None) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train 50k, test 10k) from ``cifar-100-python`` (``train``, ``test``, ``meta``), labelled with the
    ``fine`` (100 classes) or ``coarse`` (20 superclasses) label set.

    ``meta`` is required: unlike CIFAR-10's ten, the 120 label names are not worth a copy in the code.
    ``root`` is a key prefix in the store when ``store_url`` is given.
    """
    if labels not in CIFAR100_LABEL_SETS:
        raise InvalidArgument(f"CIFAR-100 labels must be one of {', '.join(CIFAR100_LABEL_SETS)}, got {labels!r}")
    local = resolve_source(root, store_url, cache_dir)
    classes = _label_names(local / CIFAR100_META, f"{labels}_label_names")
    key = f"{labels}_labels"
    return (_read_split(local, [CIFAR100_TRAIN], classes, key, f"cifar100-{labels}-train"),
            _read_split(local, [CIFAR100_TEST], classes, key, f"cifar100-{labels}-test"))
