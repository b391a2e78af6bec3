"""A rendered 10-class 32x32 RGB dataset in CIFAR-10's own "python version" format (a drop-in for the real
``cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``, ``batches.meta``).

Each class is a shape (disc, ring, square, triangle, cross, star, ellipse, stripes, checker, dot pair) drawn
with a soft edge at a random position, scale, rotation and colour over a cluttered background: a colour
gradient, a low-frequency texture, random distractor strokes, noise and a global contrast/brightness change.
Colour carries no class information and objects are small, so the task is learnable but not trivial: a
small CNN clearly beats chance on 1,000 samples and clearly improves with 10,000 — what a sample-efficiency
study needs to show anything. Rendering is vectorised over chunks of images (no per-pixel Python), and every
image's randomness comes from (seed, split, index) so worker counts never change the bytes.
"""
from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.render.shards import ProgressFn
from shared.errors import AlreadyExists, InvalidArgument
from shared.logs import get_logger
from shared.parallel import pool_context
from shared.storage import ArtifactStore, Manifest

log = get_logger(__name__)

GENERATOR_VERSION = "1"
CLASSES = ("disc", "ring", "square", "triangle", "cross", "star", "ellipse", "stripes", "checker", "dots")
SIZE = 32
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_CHUNK = 2000
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _rotated(cx, cy, theta):
    """Pixel coordinates relative to each image's centre (cx, cy), rotated by -theta: (N, H, W) each."""
    dx, dy = _XX[None] - cx[:, None, None], _YY[None] - cy[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    return c * dx + s * dy, -s * dx + c * dy


def _shape_sdf(cls: int, x, y, r, aspect):
    """Signed distance-like field (> 0 inside) of class ``cls`` at scale ``r`` (N, 1, 1), in pixels."""
    rad = np.hypot(x, y)
    if cls == 0:
        return r - rad
    if cls == 1:
        return 0.28 * r - np.abs(rad - 0.75 * r)
    if cls == 2:
        return 0.8 * r - np.maximum(np.abs(x), np.abs(y))
    if cls == 3:
        # Three half-planes of an equilateral triangle with in-radius 0.5 r.
        d = [0.5 * r - (np.cos(a) * x + np.sin(a) * y) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3,
                                                                  np.pi / 2 + 4 * np.pi / 3)]
        return np.minimum(np.minimum(d[0], d[1]), d[2])
    if cls == 4:
        arm = 0.3 * r
        return np.maximum(np.minimum(arm - np.abs(x), r - np.abs(y)), np.minimum(arm - np.abs(y), r - np.abs(x)))
    if cls == 5:
        return r * (0.55 + 0.4 * np.cos(5 * np.arctan2(y, x))) - rad
    if cls == 6:
        return r * (1 - np.hypot(x / r, y / (r * aspect))) * np.minimum(1, aspect)
    if cls in (7, 8):
        inside = 0.85 * r - np.maximum(np.abs(x), np.abs(y))
        period = np.maximum(r / 2.2, 2.2)
        wave = np.sin(np.pi * y / period) if cls == 7 else np.sin(np.pi * x / period) * np.sin(np.pi * y / period)
        return np.minimum(inside, 1.5 * wave)
    offset = 0.55 * r
    return np.maximum(0.38 * r - np.hypot(x - offset, y), 0.38 * r - np.hypot(x + offset, y))


def render_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 32, 32, 3) images of ``labels``."""
    n = len(labels)
    f32 = np.float32
    # Background: a random two-colour gradient plus a low-frequency texture.
    c0 = rng.uniform(0, 1, (n, 3)).astype(f32)
    c1 = np.clip(c0 + rng.uniform(-0.35, 0.35, (n, 3)), 0, 1).astype(f32)
    angle = rng.uniform(0, 2 * np.pi, n).astype(f32)
    t = ((np.cos(angle)[:, None, None] * _XX + np.sin(angle)[:, None, None] * _YY) / SIZE)[..., None]
    img = c0[:, None, None] * (1 - t) + c1[:, None, None] * t
    fx, fy = rng.uniform(0.1, 0.6, n).astype(f32), rng.uniform(0.1, 0.6, n).astype(f32)
    phase = rng.uniform(0, 2 * np.pi, n).astype(f32)
    texture = np.sin(fx[:, None, None] * _XX + fy[:, None, None] * _YY + phase[:, None, None])
    img += (rng.uniform(0, 0.15, n).astype(f32)[:, None, None] * texture)[..., None]
    # A distractor: a random thin stroke of a random colour.
    for _ in range(1):
        sx, sy = _rotated(rng.uniform(0, SIZE, n).astype(f32), rng.uniform(0, SIZE, n).astype(f32),
                          rng.uniform(0, np.pi, n).astype(f32))
        length = rng.uniform(3, 12, n).astype(f32)[:, None, None]
        stroke = np.clip(0.9 - np.abs(sy), 0, 1) * (np.abs(sx) < length)
        alpha = (stroke * rng.uniform(0.2, 0.6, n).astype(f32)[:, None, None])[..., None]
        img = img * (1 - alpha) + rng.uniform(0, 1, (n, 1, 1, 3)).astype(f32) * alpha
    # The object: its class's shape at a random place, scale, rotation and colour, with a soft edge.
    r = rng.uniform(6.5, 12, n).astype(f32)
    cx = rng.uniform(r, SIZE - r).astype(f32)
    cy = rng.uniform(r, SIZE - r).astype(f32)
    x, y = _rotated(cx, cy, rng.uniform(0, 2 * np.pi, n).astype(f32))
    aspect = rng.uniform(0.35, 0.6, n).astype(f32)[:, None, None]
    mask = np.zeros((n, SIZE, SIZE), f32)
    for cls in range(len(CLASSES)):
        sel = labels == cls
        if sel.any():
            sdf = _shape_sdf(cls, x[sel], y[sel], r[sel][:, None, None], aspect[sel])
            mask[sel] = np.clip(sdf / rng.uniform(0.6, 1.6, (int(sel.sum()), 1, 1)) + 0.5, 0, 1)
    colour = rng.uniform(0, 1, (n, 1, 1, 3)).astype(f32)
    # An object must stand out from the background under it: too close in brightness, its colour is inverted.
    luma = np.array([0.299, 0.587, 0.114], f32)
    under = (img * mask[..., None]).sum((1, 2)) / np.maximum(mask.sum((1, 2))[:, None], 1e-3)
    faint = np.abs((colour[:, 0, 0] - under) @ luma) < 0.25
    colour[faint] = 1 - colour[faint]
    img = img * (1 - mask[..., None]) + colour * mask[..., None]
    # Global contrast and brightness, then sensor noise.
    contrast = rng.uniform(0.6, 1.2, (n, 1, 1, 1)).astype(f32)
    img = (img - 0.5) * contrast + 0.5 + rng.uniform(-0.15, 0.15, (n, 1, 1, 1)).astype(f32)
    img += rng.normal(0, 0.05, img.shape).astype(f32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _render_chunk(task: tuple[int, int, int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    seed, split, start, stop = task
    rng = np.random.default_rng([seed, split, start])
    labels = (np.arange(start, stop) % len(CLASSES)).astype(np.int64)  # exactly balanced splits
    return start, render_images(labels, rng), labels


def batch_bytes(images: np.ndarray, labels: np.ndarray, name: str) -> bytes:
    """One CIFAR python batch: a pickled dict with ``data`` (N, 3072) uint8 in CHW order and ``labels``."""
    data = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))
    return pickle.dumps({"batch_label": name, "labels": labels.tolist(), "data": data,
                         "filenames": [f"{name}_{i:05d}.png" for i in range(len(labels))]}, protocol=4)


@dataclass
class CifarSynthJob:
    """``train`` + ``test`` rendered images in CIFAR-10's python-batch format (5 train batches, 1 test)."""

    train: int = 50_000
    test: int = 10_000
    seed: int = 0
    kind: str = field(default="cifar-synth", init=False)
    generator_version: str = field(default=GENERATOR_VERSION, init=False)

    def __post_init__(self) -> None:
        if self.train < len(TRAIN_FILES) or self.test < 1:
            raise InvalidArgument(f"train ({self.train}) must be >= {len(TRAIN_FILES)} and test ({self.test}) >= 1")

    def render_split(self, split: int, n: int, workers: int, report) -> tuple[np.ndarray, np.ndarray]:
        tasks = ((self.seed, split, lo, min(lo + _CHUNK, n)) for lo in range(0, n, _CHUNK))
        n_tasks = -(-n // _CHUNK)
        images, labels = np.empty((n, SIZE, SIZE, 3), np.uint8), np.empty(n, np.int64)
        with contextlib.ExitStack() as stack:
            if workers > 1 and n_tasks > 1:
                pool = stack.enter_context(pool_context().Pool(min(workers, n_tasks)))
                chunks = pool.imap_unordered(_render_chunk, tasks)
            else:
                chunks = map(_render_chunk, tasks)
            # Each chunk goes straight into the split's array: the split is held once, not twice.
            for start, im, lab in chunks:
                images[start: start + len(lab)], labels[start: start + len(lab)] = im, lab
                report(len(lab))
        return images, labels

    def run(self, store: ArtifactStore, prefix: str, *, workers: int = 1, resume: bool = False,
            progress: ProgressFn | None = None) -> Manifest:
        """Render both splits and publish the batches. Rendering takes seconds, so an interrupted run is
        simply redone (``resume`` accepted for a uniform interface)."""
        prefix = prefix.strip("/")
        if store.is_published(prefix):
            raise AlreadyExists(f"{prefix!r} is already published in {store.url}; choose another --out")
        t0 = time.perf_counter()
        total, done = self.train + self.test, [0]

        def report(n: int) -> None:
            done[0] += n
            if progress:
                progress(done[0], total, {})

        train_x, train_y = self.render_split(1, self.train, workers, report)
        test_x, test_y = self.render_split(2, self.test, workers, report)
        # Training samples are shuffled across the five batches, as in the real files.
        order = np.random.default_rng([self.seed, 3]).permutation(self.train)
        files = {name: batch_bytes(train_x[part], train_y[part], name)
                 for name, part in zip(TRAIN_FILES, np.array_split(order, len(TRAIN_FILES)), strict=True)}
        files["test_batch"] = batch_bytes(test_x, test_y, "test_batch")
        files["batches.meta"] = pickle.dumps({"label_names": list(CLASSES), "num_cases_per_batch": _CHUNK,
                                              "num_vis": SIZE * SIZE * 3}, protocol=4)
        meta = {"kind": self.kind, "generator_version": self.generator_version, "seed": self.seed, "total": total,
                "config": {"train": self.train, "test": self.test, "classes": list(CLASSES)},
                "format": "cifar-10-python", "render_seconds": round(time.perf_counter() - t0, 3)}
        log.info("cifar-format images rendered", extra={"prefix": prefix, "train": self.train, "test": self.test,
                                                        "seconds": meta["render_seconds"]})
        return store.publish(prefix, files, meta=meta)

    @property
    def total(self) -> int:
        """Items in both splits (every job has a total: run_job bounds failures by it)."""
        return self.train + self.test

    @property
    def config(self) -> dict[str, Any]:
        return {"train": self.train, "test": self.test}
