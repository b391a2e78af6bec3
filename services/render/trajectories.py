"""Multi-camera trajectory videos: a shaded ball moving in 3D, seen by 4 fixed cameras.

Four balanced classes of motion (Linear, Circular, Helical, Parabolic). A sample is a uint8
tensor (cameras=4, frames=32, 3, 64, 64) with labels: ``class_label`` (0-3), the ball's centre
at every rendered frame (``positions``), ``future_position`` = the centre 5 frames after the
last one (frame index 36 counting from 0, i.e. "frame 37"), and the camera parameters.

Shard files (``shards/<index>.videos.npy.zst`` and ``shards/<index>.labels.npy``): the videos
are one zstd stream that decompresses to a plain ``.npy`` of shape (n, 4, 32, 3, 64, 64), so a
reader can stream it sample by sample; the labels are a structured ``.npy`` (see LABEL_DTYPE).
Frames are dark with a static ground grid, so consecutive frames are nearly identical and zstd
shrinks them ~30-60x; rendering is vectorised over a batch of samples (no per-pixel Python).
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from shared.errors import InvalidArgument

CLASSES = ("Linear", "Circular", "Helical", "Parabolic")
CAMERAS, FRAMES, SIZE = 4, 32, 64
FUTURE_OFFSET = 5
FPS = 15.0
BALL_RADIUS = 0.25
# Every trajectory stays inside this box (world units, z up; the ground is z=0).
BOX_XY, Z_MIN, Z_MAX = 1.4, 0.35, 1.9
GENERATOR_VERSION = "1"
SAMPLE_SHAPE = (CAMERAS, FRAMES, 3, SIZE, SIZE)
LABEL_DTYPE = np.dtype([
    ("index", "<i8"),
    ("class_label", "<i8"),
    ("future_position", "<f4", (3,)),
    ("positions", "<f4", (FRAMES, 3)),
    ("intrinsics", "<f4", (CAMERAS, 3, 3)),
    ("extrinsics", "<f4", (CAMERAS, 3, 4)),  # world -> camera [R | t]; camera x right, y down, z forward
    ("color", "u1", (3,)),
])
_STEPS = FRAMES + FUTURE_OFFSET  # frames 0..31 are rendered, frame 36 is the prediction target
_BATCH = 25  # samples rendered per vectorised call: amortises numpy overhead, bounds memory


def _look_at(center: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    forward = target - center
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    return rot, -rot @ center


def _background(K: np.ndarray, rot: np.ndarray, center: np.ndarray) -> np.ndarray:
    """A faint ground grid (0.5-unit lines on a 6x6 floor) under a dark sky, as float (H, W)."""
    v, u = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    pix = np.stack([u, v, np.ones_like(u)], -1)
    rays = pix @ np.linalg.inv(K).T @ rot  # camera rays in world coordinates
    dz = rays[..., 2]
    ground = dz < -1e-6
    dist = np.where(ground, -center[2] / np.minimum(dz, -1e-6), 0.0)
    hit = center[:2] + rays[..., :2] * dist[..., None]
    on_floor = ground & (np.abs(hit).max(-1) <= 3.0)
    to_line = np.abs(hit / 0.5 - np.round(hit / 0.5)).min(-1) * 0.5
    width = np.maximum(0.012 * dist, 0.02)  # roughly one pixel's footprint, so far lines do not alias
    line = np.clip(1.5 - to_line / width, 0, 1) * np.exp(-dist / 10)
    return np.where(ground, np.where(on_floor, 22 + 45 * line, 14), 6 + 8 * v / SIZE)


@functools.lru_cache(maxsize=4)
def camera_rig(seed: int) -> dict[str, np.ndarray]:
    """The dataset's 4 cameras (one rig per seed, around the scene) and their background images."""
    rng = np.random.default_rng([seed, 0])
    intrinsics, extrinsics, backgrounds = [], [], []
    for cam in range(CAMERAS):
        azimuth = np.pi / 4 + cam * np.pi / 2 + rng.uniform(-0.2, 0.2)
        distance, height = rng.uniform(4.2, 5.0), rng.uniform(2.0, 3.0)
        center = np.array([distance * np.cos(azimuth), distance * np.sin(azimuth), height])
        target = np.array([0.0, 0.0, 0.9]) + rng.uniform(-0.15, 0.15, 3)
        rot, trans = _look_at(center, target)
        focal = rng.uniform(0.95, 1.05) * SIZE / (2 * np.tan(np.radians(45) / 2))
        K = np.array([[focal, 0, SIZE / 2], [0, focal, SIZE / 2], [0, 0, 1.0]])
        intrinsics.append(K)
        extrinsics.append(np.concatenate([rot, trans[:, None]], 1))
        backgrounds.append(_background(K, rot, center))
    tint = np.array([0.9, 1.0, 1.1])[None, :, None, None]  # a cool tint so the channels differ
    bg = np.clip(np.stack(backgrounds)[:, None] * tint + 0.5, 0, 255).astype(np.uint8)
    return {"intrinsics": np.stack(intrinsics), "extrinsics": np.stack(extrinsics), "background": bg}


# ---- motion laws: positions at frames 0.._STEPS-1 ----


def _in_box(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    return np.stack([rng.uniform(-BOX_XY, BOX_XY, n), rng.uniform(-BOX_XY, BOX_XY, n),
                     rng.uniform(Z_MIN, Z_MAX, n)], -1)


def _linear(rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
    start = _in_box(rng)[0]
    end = _in_box(rng)[0]
    while np.linalg.norm(end - start) < 1.0:
        end = _in_box(rng)[0]
    return start + (end - start) * (k / (_STEPS - 1))[:, None]


def _circle(rng: np.random.Generator, k: np.ndarray, radius: float, turns: tuple[float, float]) -> np.ndarray:
    sweep = rng.uniform(*turns) * np.pi * rng.choice([-1.0, 1.0])
    theta = rng.uniform(0, 2 * np.pi) + sweep * k / (_STEPS - 1)
    return np.stack([radius * np.cos(theta), radius * np.sin(theta), np.zeros_like(theta)], -1)


def _circular(rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
    center = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), rng.uniform(0.8, 1.4)])
    ring = _circle(rng, k, rng.uniform(0.6, 1.0), (1.0, 2.0))
    # A tilted plane so circles are not all horizontal (tilt about a random horizontal axis).
    tilt, axis_angle = rng.uniform(-0.35, 0.35), rng.uniform(0, np.pi)
    a = np.array([np.cos(axis_angle), np.sin(axis_angle), 0.0])
    skew = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    rot = np.eye(3) + np.sin(tilt) * skew + (1 - np.cos(tilt)) * skew @ skew
    return center + ring @ rot.T


def _helical(rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
    center = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), 0.0])
    low = rng.uniform(0.4, 0.7)
    high = low + rng.uniform(0.7, 1.1)
    z0, z1 = (low, high) if rng.random() < 0.5 else (high, low)
    path = center + _circle(rng, k, rng.uniform(0.5, 1.0), (1.5, 3.0))
    path[:, 2] = z0 + (z1 - z0) * k / (_STEPS - 1)
    return path


def _parabolic(rng: np.random.Generator, k: np.ndarray) -> np.ndarray:
    duration = (_STEPS - 1) / FPS
    gravity = rng.uniform(0.8, 1.4)
    while True:
        start = np.array([rng.uniform(-1.3, 1.3), rng.uniform(-1.3, 1.3)])
        heading = rng.uniform(0, 2 * np.pi)
        end = start + rng.uniform(1.2, 2.4) * np.array([np.cos(heading), np.sin(heading)])
        if np.abs(end).max() <= BOX_XY:
            break
    z0, z1 = rng.uniform(Z_MIN, 0.8), rng.uniform(Z_MIN, 0.8)
    vz = (z1 - z0 + 0.5 * gravity * duration**2) / duration
    t = k / FPS
    xy = start + (end - start) * (t / duration)[:, None]
    return np.concatenate([xy, (z0 + vz * t - 0.5 * gravity * t**2)[:, None]], 1)


MOTIONS = (_linear, _circular, _helical, _parabolic)


def sample_trajectory(seed: int, index: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(class, positions at all _STEPS frames, colour) of item ``index``: a pure function of both."""
    label = index % len(CLASSES)  # exact balance in every run of 4 consecutive items
    rng = np.random.default_rng([seed, 1, index])
    positions = MOTIONS[label](rng, np.arange(_STEPS, dtype=np.float64))
    color = rng.uniform(90, 255, 3)
    return label, positions, color


def render_batch(
    rig: dict[str, np.ndarray], positions: np.ndarray, colors: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Splat a shaded sphere into every (sample, camera, frame): (B, F, 3) -> (B, 4, F, 3, H, W) uint8.

    ``out`` (B or more samples) is reused when given: refilling warm memory is several times
    cheaper than faulting in a fresh 40 MB array per batch.
    """
    B, F, _ = positions.shape
    out = np.empty((B, CAMERAS, F, 3, SIZE, SIZE), np.uint8) if out is None else out[:B]
    out[...] = rig["background"][None, :, None]
    rot, trans = rig["extrinsics"][:, :, :3], rig["extrinsics"][:, :, 3]
    cam = np.einsum("cij,bfj->bcfi", rot, positions) + trans[None, :, None, :]
    depth = np.maximum(cam[..., 2], 0.1)
    focal = rig["intrinsics"][:, 0, 0][None, :, None]
    u = focal * cam[..., 0] / depth + SIZE / 2
    v = focal * cam[..., 1] / depth + SIZE / 2
    radius = focal * BALL_RADIUS / depth  # perspective: nearer balls are bigger
    reach = int(np.ceil(min(radius.max(), 14.0))) + 1
    offsets = np.arange(-reach, reach + 1, dtype=np.float32)
    P = len(offsets)
    px = (np.floor(u)[..., None] + offsets).astype(np.float32)  # (B, C, F, P) pixel columns
    py = (np.floor(v)[..., None] + offsets).astype(np.float32)
    inv_r = (1.0 / radius)[..., None].astype(np.float32)
    dx = (px + 0.5 - u[..., None].astype(np.float32)) * inv_r  # offsets in units of the radius
    dy = (py + 0.5 - v[..., None].astype(np.float32)) * inv_r
    d2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2  # (B, C, F, P, P)
    hit = d2 < (((radius + 0.5) / radius) ** 2)[..., None, None]
    hit &= ((px >= 0) & (px < SIZE))[..., None, :]
    hit &= ((py >= 0) & (py < SIZE))[..., :, None]
    flat = np.flatnonzero(hit)
    xi, rest = flat % P, flat // P
    yi, bcf = rest % P, rest // P
    d2h = d2.reshape(-1)[flat]
    r = radius.reshape(-1)[bcf].astype(np.float32)
    alpha = np.clip((1 - np.sqrt(d2h)) * r + 0.5, 0, 1)  # one-pixel soft edge
    ndx, ndy = dx.reshape(-1, P)[bcf, xi], dy.reshape(-1, P)[bcf, yi]
    nz = np.sqrt(np.clip(1 - d2h, 0, 1))
    # Lambert shading from a light up-left in front of each camera, plus ambient.
    shade = 0.25 + 0.75 * np.clip(-0.5 * ndx - 0.6 * ndy + 0.62 * nz, 0, 1)
    X = px.reshape(-1, P)[bcf, xi].astype(np.int64)
    Y = py.reshape(-1, P)[bcf, yi].astype(np.int64)
    base = bcf * (3 * SIZE * SIZE) + Y * SIZE + X
    sample = bcf // (CAMERAS * F)
    pixels = out.reshape(-1)
    for ch in range(3):
        idx = base + ch * SIZE * SIZE
        old = pixels[idx].astype(np.float32)
        pixels[idx] = (old + alpha * (colors[sample, ch] * shade - old) + 0.5).astype(np.uint8)
    return out


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def shard_names(index: int) -> tuple[str, str]:
    return f"shards/{index:05d}.videos.npy.zst", f"shards/{index:05d}.labels.npy"


@dataclass
class TrajectoryJob:
    """A trajectory dataset of ``total`` samples; see services.render.shards for the job contract."""

    total: int = 10_000
    seed: int = 0
    shard_size: int = 250
    zstd_level: int = 3
    kind: str = field(default="trajectories", init=False)
    generator_version: str = field(default=GENERATOR_VERSION, init=False)

    def __post_init__(self) -> None:
        if self.total < 1 or self.shard_size < 1:
            raise InvalidArgument(f"total ({self.total}) and shard_size ({self.shard_size}) must be >= 1")
        if not 1 <= self.zstd_level <= 19:
            raise InvalidArgument(f"zstd_level must be in 1..19, got {self.zstd_level}")

    @property
    def config(self) -> dict[str, Any]:
        return {
            "classes": list(CLASSES), "cameras": CAMERAS, "frames": FRAMES, "image_size": SIZE,
            "future_offset": FUTURE_OFFSET, "fps": FPS, "ball_radius": BALL_RADIUS, "zstd_level": self.zstd_level,
        }

    def render_items(self, start: int, stop: int, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(videos (n, 4, 32, 3, 64, 64) uint8, labels LABEL_DTYPE) for items [start, stop)."""
        rig = camera_rig(self.seed)
        labels = np.zeros(stop - start, LABEL_DTYPE)
        steps = np.zeros((stop - start, _STEPS, 3))
        for row, index in enumerate(range(start, stop)):
            label, positions, color = sample_trajectory(self.seed, index)
            steps[row] = positions
            labels["index"][row], labels["class_label"][row] = index, label
            labels["color"][row] = np.round(color)
        labels["positions"] = steps[:, :FRAMES]
        labels["future_position"] = steps[:, FRAMES + FUTURE_OFFSET - 1]
        labels["intrinsics"] = rig["intrinsics"]
        labels["extrinsics"] = rig["extrinsics"]
        videos = render_batch(rig, steps[:, :FRAMES], labels["color"].astype(np.float32), out)
        return videos, labels

    def render_shard(self, index: int, start: int, stop: int) -> dict[str, bytes]:
        n = stop - start
        compressed = io.BytesIO()
        all_labels = []
        buffer = np.empty((min(_BATCH, n), *SAMPLE_SHAPE), np.uint8)
        with zstandard.ZstdCompressor(level=self.zstd_level).stream_writer(compressed, closefd=False) as out:
            out.write(_npy_header((n, *SAMPLE_SHAPE), np.uint8))
            for lo in range(start, stop, _BATCH):
                videos, labels = self.render_items(lo, min(lo + _BATCH, stop), buffer)
                out.write(memoryview(videos.reshape(-1)))
                all_labels.append(labels)
        labels_buf = io.BytesIO()
        np.save(labels_buf, np.concatenate(all_labels), allow_pickle=False)
        videos_name, labels_name = shard_names(index)
        return {videos_name: compressed.getvalue(), labels_name: labels_buf.getvalue()}

    def shard_info(self, index: int, start: int, stop: int, files: dict[str, bytes]) -> dict[str, Any]:
        videos_name, labels_name = shard_names(index)
        labels = np.load(io.BytesIO(files[labels_name]), allow_pickle=False)
        counts = np.bincount(labels["class_label"], minlength=len(CLASSES))
        return {"videos": videos_name, "labels": labels_name, "samples": stop - start,
                "class_counts": {name: int(c) for name, c in zip(CLASSES, counts, strict=True)}}

    def summarize(self, records: list[dict]) -> dict[str, Any]:
        totals = dict.fromkeys(CLASSES, 0)
        for record in records:
            for name, count in record["info"]["class_counts"].items():
                totals[name] += count
        rig = camera_rig(self.seed)
        return {
            "num_samples": sum(r["info"]["samples"] for r in records),
            "class_distribution": totals,
            "sample_shape": list(SAMPLE_SHAPE),
            "format": "zstd-compressed .npy videos + structured .npy labels per shard",
            "cameras_params": {"intrinsics": rig["intrinsics"].tolist(), "extrinsics": rig["extrinsics"].tolist()},
            "shards": [{"index": r["index"], "start": r["start"], "stop": r["stop"], **r["info"]} for r in records],
        }

    def estimate_bytes(self) -> int:
        """Dataset size extrapolated from rendering the first (up to) 50 items."""
        n = min(50, self.total)
        files = self.render_shard(0, 0, n)
        return int(sum(len(b) for b in files.values()) * self.total / n)

