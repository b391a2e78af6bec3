"""Deterministic stratified subsets and splits (the 5k / 10k / 50k CIFAR-10 study)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from shared.errors import InvalidArgument


def _labels(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    arr = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgument("labels must be a 1-D sequence of integers")
    return arr.astype(np.int64)


def _class_orders(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """A seeded random order of each class's indices; subsets take prefixes of it."""
    rng = np.random.default_rng(seed)
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def _quotas(counts: dict[int, int], n: int) -> dict[int, int]:
    """Split ``n`` across classes in proportion to ``counts`` (largest remainder, so they sum to n)."""
    total = sum(counts.values())
    exact = {c: n * k / total for c, k in counts.items()}
    quota = {c: int(v) for c, v in exact.items()}
    # ties broken by class id so the result is deterministic
    by_remainder = sorted(counts, key=lambda c: (-(exact[c] - quota[c]), c))
    for c in by_remainder[: n - sum(quota.values())]:
        quota[c] += 1
    return quota


def stratified_subset(labels: Sequence[int] | np.ndarray | torch.Tensor, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` samples keeping the class proportions of ``labels``.

    The same seed always gives the same subset, and for balanced data (CIFAR-10) a smaller subset is
    contained in a larger one, so a sample-efficiency curve adds data rather than swapping it.
    """
    arr = _labels(labels)
    if not 0 < n <= len(arr):
        raise InvalidArgument(f"subset size must be in [1, {len(arr)}], got {n}")
    orders = _class_orders(arr, seed)
    quota = _quotas({c: len(idx) for c, idx in orders.items()}, n)
    picked = np.concatenate([orders[c][: quota[c]] for c in sorted(orders)])
    return np.sort(picked)


def stratified_split(labels: Sequence[int] | np.ndarray | torch.Tensor, val_fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted indices with ``val_fraction`` of every class (at least one when it has 2+)."""
    if not 0 < val_fraction < 1:
        raise InvalidArgument(f"val_fraction must be in (0, 1), got {val_fraction}")
    arr = _labels(labels)
    train, val = [], []
    for _, idx in sorted(_class_orders(arr, seed).items()):
        # a class with 2+ samples keeps at least one on each side
        k = min(max(int(round(len(idx) * val_fraction)), 1), len(idx) - 1) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
