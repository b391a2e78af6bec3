"""Handwritten-style digits in MNIST's own IDX format (a drop-in for the real files).

Each digit is drawn with a system font (DejaVu variants when present, else PIL's bundled font)
at a random stroke width, then distorted by a random affine (rotation, shear, scale) and an
elastic field (smoothed random displacements), and finally normalised the way MNIST was: the
ink's bounding box is fitted into 20x20 keeping its aspect ratio, and placed in 28x28 so its
centre of mass is at the centre. Labels cycle 0-9, so both splits are exactly balanced.

The IDX files are not shardable, so this job renders in a process pool and publishes the four
files itself (``run``) instead of going through services.render.shards.
"""
from __future__ import annotations

import gzip
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import center_of_mass, map_coordinates

from services.render.logos import load_font, system_fonts
from services.render.shards import ProgressFn
from shared.errors import AlreadyExists, InvalidArgument
from shared.logs import get_logger
from shared.parallel import pool_context
from shared.storage import ArtifactStore, Manifest

log = get_logger(__name__)

GENERATOR_VERSION = "1"
CANVAS = 56
_GRID = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float64)
_CHUNK = 2500  # digits per pool task
_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 1),
           "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 2)}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">HBB{array.ndim}I", 0, 0x08, array.ndim, *array.shape) + array.tobytes()


def _digit_fonts() -> tuple[str | None, ...]:
    fonts = system_fonts()
    preferred = tuple(f for f in fonts if "dejavu" in f.lower()) or fonts
    return preferred or (None,)


def mnist_normalize(ink: np.ndarray) -> np.ndarray:
    """Fit the ink's bounding box into 20x20 (aspect kept) and centre its mass in 28x28."""
    ys, xs = np.nonzero(ink > 10)
    if len(ys) == 0:
        return np.zeros((28, 28), np.uint8)
    crop = ink[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float64)
    cy, cx = center_of_mass(small)
    out = np.zeros((28, 28))
    top, left = int(round(14 - cy)), int(round(14 - cx))
    top, left = min(max(top, 0), 28 - nh), min(max(left, 0), 28 - nw)
    out[top: top + nh, left: left + nw] = small
    return np.clip(out, 0, 255).astype(np.uint8)


def render_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 digit (white on black, like MNIST)."""
    fonts = _digit_fonts()
    font = load_font(fonts[rng.integers(len(fonts))], int(rng.choice([34, 38, 42])))
    im = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(im)
    stroke = int(rng.integers(0, 3))
    # Centred by font metrics only: mnist_normalize recentres by the ink anyway.
    draw.text((CANVAS / 2, CANVAS / 2), str(label), font=font, fill=255, anchor="mm",
              stroke_width=stroke, stroke_fill=255)
    # Affine about the centre: PIL maps output -> input, so build the inverse matrix.
    angle, shear = np.radians(rng.uniform(-15, 15)), rng.uniform(-0.3, 0.3)
    sx, sy = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
    forward = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ \
        np.array([[1, shear], [0, 1]]) @ np.diag([sx, sy])
    inv = np.linalg.inv(forward)
    c = CANVAS / 2
    offset = np.array([c, c]) - inv @ np.array([c, c])
    im = im.transform((CANVAS, CANVAS), Image.Transform.AFFINE,
                      (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]),
                      resample=Image.Resampling.BILINEAR)
    # Elastic distortion: a smooth random displacement field wobbles the strokes. Upsampling a
    # coarse 6x6 noise grid bicubically gives the same smoothness as Gaussian-filtering per-pixel
    # noise, at a fraction of the cost.
    arr = np.asarray(im, dtype=np.float32)
    amplitude = rng.uniform(1.5, 3.0)
    dy, dx = (np.asarray(Image.fromarray(rng.uniform(-1, 1, (6, 6)).astype(np.float32), "F")
                         .resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)) * amplitude for _ in range(2))
    warped = map_coordinates(arr, [_GRID[0] + dy, _GRID[1] + dx], order=1, mode="constant")
    return mnist_normalize(np.clip(warped, 0, 255).astype(np.uint8))


def _render_chunk(task: tuple[int, int, int, int]) -> tuple[int, np.ndarray, np.ndarray]:
    seed, stream, start, stop = task
    labels = np.arange(start, stop) % 10
    images = np.stack([render_digit(int(labels[k]), np.random.default_rng([seed, stream, start + k]))
                       for k in range(stop - start)])
    return start, images, labels.astype(np.uint8)


@dataclass
class DigitsJob:
    """``train`` + ``test`` synthetic MNIST digits, published as the four (optionally .gz) IDX files."""

    train: int = 60_000
    test: int = 10_000
    seed: int = 0
    gzip: bool = False
    kind: str = field(default="digits", init=False)
    generator_version: str = field(default=GENERATOR_VERSION, init=False)

    def __post_init__(self) -> None:
        if self.train < 1 or self.test < 1:
            raise InvalidArgument(f"train ({self.train}) and test ({self.test}) must be >= 1")

    @property
    def total(self) -> int:
        """Items in both splits (every job has a total: run_job bounds failures by it)."""
        return self.train + self.test

    @property
    def config(self) -> dict[str, Any]:
        return {"train": self.train, "test": self.test, "gzip": self.gzip,
                "fonts": [f.rsplit("/", 1)[-1] if f else "PIL default" for f in _digit_fonts()]}

    def render_split(self, split: str, workers: int = 1, progress: ProgressFn | None = None,
                     done_before: int = 0) -> tuple[np.ndarray, np.ndarray]:
        n = self.train if split == "train" else self.test
        stream = _SPLITS[split][2]
        tasks = ((self.seed, stream, lo, min(lo + _CHUNK, n)) for lo in range(0, n, _CHUNK))
        n_tasks = -(-n // _CHUNK)
        images, labels = np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.uint8)
        total = self.train + self.test
        done = done_before
        if workers > 1 and n_tasks > 1:
            with pool_context().Pool(min(workers, n_tasks)) as pool:
                results = pool.imap_unordered(_render_chunk, tasks)
                for start, im, lab in results:
                    images[start: start + len(lab)], labels[start: start + len(lab)] = im, lab
                    done += len(lab)
                    if progress:
                        progress(done, total, {"split": split})
        else:
            for task in tasks:
                start, im, lab = _render_chunk(task)
                images[start: start + len(lab)], labels[start: start + len(lab)] = im, lab
                done += len(lab)
                if progress:
                    progress(done, total, {"split": split})
        return images, labels

    def run(self, store: ArtifactStore, prefix: str, *, workers: int = 1, resume: bool = False,
            progress: ProgressFn | None = None) -> Manifest:
        """Render both splits and publish the IDX files. Rendering takes seconds, so an interrupted
        run is simply redone (``resume`` accepted for a uniform interface)."""
        prefix = prefix.strip("/")
        if store.is_published(prefix):
            raise AlreadyExists(f"{prefix!r} is already published in {store.url}; choose another --out")
        t0 = time.perf_counter()
        files: dict[str, bytes] = {}
        counts: dict[str, list[int]] = {}
        for split, (images_name, labels_name, _) in _SPLITS.items():
            images, labels = self.render_split(split, workers, progress, done_before=0 if split == "train"
                                               else self.train)
            counts[split] = np.bincount(labels, minlength=10).tolist()
            for name, array in ((images_name, images), (labels_name, labels)):
                data = idx_bytes(array)
                # mtime=0 keeps the .gz bytes a pure function of the content (reproducible digests).
                files[name + (".gz" if self.gzip else "")] = gzip.compress(data, mtime=0) if self.gzip else data
        meta = {"kind": self.kind, "generator_version": self.generator_version, "seed": self.seed,
                "total": self.train + self.test,
                "config": self.config, "format": "mnist-idx", "class_counts": counts,
                "render_seconds": round(time.perf_counter() - t0, 3)}
        log.info("digits rendered", extra={"prefix": prefix, **{k: sum(v) for k, v in counts.items()},
                                           "seconds": meta["render_seconds"]})
        return store.publish(prefix, files, meta=meta)
