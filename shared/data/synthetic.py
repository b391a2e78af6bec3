"""Synthetic seven-segment digits: MNIST-shaped data in milliseconds, for demos, tests and benchmarks.

Each digit is drawn as soft strokes at a random position, scale, stroke width and slant, with noise, so it
is clearly learnable yet not trivial. (``trainyard render digits`` draws font-based, MNIST-normalised digits
for datasets that should look like the real thing.)
"""
from __future__ import annotations

import numpy as np
import torch

# Seven-segment strokes per digit: (x0, y0, x1, y1) in a unit box. Clearly separable, digit-like shapes.
_SEGMENTS = {
    "a": (0, 0, 1, 0), "b": (1, 0, 1, 0.5), "c": (1, 0.5, 1, 1), "d": (0, 1, 1, 1),
    "e": (0, 0.5, 0, 1), "f": (0, 0, 0, 0.5), "g": (0, 0.5, 1, 0.5),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def synthetic_digits(n: int, seed: int = 0, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seven-segment digit images (N, 1, size, size) uint8 with random placement, scale, stroke
    width, slant and noise, plus their labels. Used for demos, tests and benchmarks (no downloads)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    f32 = np.float32
    w = (rng.uniform(0.3, 0.45, n) * size).astype(f32)
    h = (rng.uniform(0.55, 0.7, n) * size).astype(f32)
    x0 = rng.uniform(0.1 * size, size - w - 0.1 * size).astype(f32)
    y0 = rng.uniform(0.1 * size, size - h - 0.1 * size).astype(f32)
    slant = rng.uniform(-0.2, 0.2, n).astype(f32)
    width = rng.uniform(1.0, 2.0, n).astype(f32)
    out = np.empty((n, size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(f32)
    segments = np.array([[seg in _DIGITS[label] for seg in _SEGMENTS] for label in range(10)], f32)
    # Chunks keep the (chunk, H, W) temporaries in cache-friendly sizes.
    for lo in range(0, n, 1024):
        sl = slice(lo, min(n, lo + 1024))
        col = lambda v, sl=sl: v[sl, None, None]  # noqa: E731 - per-image scalars broadcast over the pixel grid
        img = np.zeros((sl.stop - sl.start, size, size), f32)
        for k, (sx0, sy0, sx1, sy1) in enumerate(_SEGMENTS.values()):
            ax, ay = x0 + sx0 * w + slant * (1 - sy0) * h, y0 + sy0 * h
            bx, by = x0 + sx1 * w + slant * (1 - sy1) * h, y0 + sy1 * h
            abx, aby = bx - ax, by - ay
            # Distance from every pixel to the segment AB, turned into a soft stroke of the image's width.
            t = np.clip(((xx - col(ax)) * col(abx) + (yy - col(ay)) * col(aby))
                        / col(np.maximum(abx * abx + aby * aby, 1e-6)), 0, 1)
            d = np.hypot(xx - (col(ax) + t * col(abx)), yy - (col(ay) + t * col(aby)))
            on = segments[labels[sl], k][:, None, None]
            np.maximum(img, np.clip(col(width) + 0.5 - d, 0, 1) * on, out=img)
        img += rng.normal(0, 0.08, img.shape).astype(f32)
        out[sl] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return torch.from_numpy(out).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
