"""Procedural logo images in 4 classes (simple, text, gradient, complex), as an image folder.

Layout: ``<split>/<class>/<id>.png`` with splits ``train``, ``val`` and (when ``test_per_class`` > 0)
``test``; items ``[0, 4 * train_per_class)`` are train, the next ``4 * val_per_class`` val, the rest test,
and item ``i`` is class ``i % 4``. A test split leaves train and val byte for byte as they were.

What separates the classes (what a classifier has to learn):
- simple: 1-3 flat-coloured geometric shapes on a plain background;
- text: a word in a system font (or PIL's bundled one), flat colours, at most an underline;
- gradient: a linear or radial colour gradient, optionally with one flat shape on it;
- complex: a gradient or striped background, 3-7 shapes and a word together.
Each image depends only on (seed, item index) and the fonts found on the machine.
"""
from __future__ import annotations

import functools
import io
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from shared.errors import InvalidArgument

CLASSES = ("simple", "text", "gradient", "complex")
GENERATOR_VERSION = "1"
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")


@functools.lru_cache(maxsize=1)
def system_fonts() -> tuple[str, ...]:
    """TrueType fonts on this machine, sorted so a seed picks the same font on the same machine."""
    found = []
    for root in FONT_DIRS:
        if Path(root).is_dir():
            found += [str(p) for p in Path(root).rglob("*.ttf")]
    # Symbol/icon fonts have no Latin glyphs; their words would render as boxes.
    return tuple(sorted(p for p in found if "glyph" not in p.lower() and "math" not in p.lower()))


@functools.lru_cache(maxsize=256)
def load_font(path: str | None, size: int) -> ImageFont.ImageFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


def pick_font(rng: np.random.Generator, size: int) -> ImageFont.ImageFont:
    fonts = system_fonts()
    return load_font(fonts[rng.integers(len(fonts))] if fonts else None, size)


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _contrasting(rng: np.random.Generator, background: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        c = _color(rng)
        if sum(abs(a - b) for a, b in zip(c, background, strict=True)) > 200:
            return c


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = np.array(_color(rng), float), np.array(_color(rng), float)
    while np.abs(a - b).sum() < 200:  # a barely visible gradient would look like a flat background
        b = np.array(_color(rng), float)
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = x * np.cos(angle) + y * np.sin(angle)
        t = (t - t.min()) / (t.max() - t.min())
    else:
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.clip(np.hypot(x - cx, y - cy) / rng.uniform(0.5, 1.0), 0, 1)
    return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8), "RGB")


def _shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, fill, outline=None) -> None:
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    r = rng.uniform(0.1, 0.3) * size
    box = [cx - r, cy - r, cx + r, cy + r]
    kind = rng.integers(4)
    width = int(rng.integers(2, 6)) if outline else 0
    if kind == 0:
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif kind == 1:
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif kind == 2:
        draw.regular_polygon((cx, cy, r), int(rng.integers(3, 9)), rotation=float(rng.uniform(0, 360)),
                             fill=fill, outline=outline, width=max(width, 1))
    else:
        draw.rounded_rectangle(box, radius=r * 0.3, fill=fill, outline=outline, width=width)


def _word(rng: np.random.Generator) -> str:
    letters = string.ascii_uppercase if rng.random() < 0.6 else string.ascii_letters
    return "".join(rng.choice(list(letters), int(rng.integers(2, 8))))


def _text(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, fill, scale: float = 1.0) -> None:
    word = _word(rng)
    font = pick_font(rng, int(size * scale * rng.uniform(0.12, 0.22)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    w, h = right - left, bottom - top
    x = rng.uniform(0.05 * size, max(0.05 * size, size * 0.95 - w)) - left
    y = rng.uniform(0.1 * size, max(0.1 * size, size * 0.9 - h)) - top
    draw.text((x, y), word, font=font, fill=fill)
    if rng.random() < 0.3:
        draw.line([(x + left, y + bottom + 4), (x + right, y + bottom + 4)], fill=fill, width=3)


def draw_logo(label: int, rng: np.random.Generator, size: int) -> Image.Image:
    name = CLASSES[label]
    if name == "simple":
        bg = _color(rng)
        im = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            _shape(draw, rng, size, _contrasting(rng, bg))
    elif name == "text":
        bg = _color(rng)
        im = Image.new("RGB", (size, size), bg)
        _text(ImageDraw.Draw(im), rng, size, _contrasting(rng, bg), scale=1.3)
    elif name == "gradient":
        im = _gradient(rng, size)
        if rng.random() < 0.4:
            _shape(ImageDraw.Draw(im), rng, size, _color(rng))
    else:
        if rng.random() < 0.5:
            im = _gradient(rng, size)
        else:
            im = Image.new("RGB", (size, size), _color(rng))
            draw = ImageDraw.Draw(im)
            step, stripe = int(rng.integers(8, 24)), _color(rng)
            for x0 in range(-size, size, step * 2):
                draw.polygon([(x0, 0), (x0 + step, 0), (x0 + step + size, size), (x0 + size, size)], fill=stripe)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 8))):
            _shape(draw, rng, size, _color(rng), outline=_color(rng) if rng.random() < 0.5 else None)
        _text(draw, rng, size, _color(rng))
    return im


@dataclass
class LogoJob:
    """``train_per_class`` + ``val_per_class`` + ``test_per_class`` logos per class; see services.render.shards
    for the contract."""

    train_per_class: int = 200
    val_per_class: int = 50
    test_per_class: int = 0
    seed: int = 0
    image_size: int = 224
    shard_size: int = 200
    kind: str = field(default="logos", init=False)
    generator_version: str = field(default=GENERATOR_VERSION, init=False)

    def __post_init__(self) -> None:
        if self.train_per_class < 1 or self.val_per_class < 0 or self.test_per_class < 0:
            raise InvalidArgument("train_per_class must be >= 1, val_per_class and test_per_class >= 0")
        if not 32 <= self.image_size <= 1024:
            raise InvalidArgument(f"image_size must be in 32..1024, got {self.image_size}")

    @property
    def total(self) -> int:
        return len(CLASSES) * (self.train_per_class + self.val_per_class + self.test_per_class)

    @property
    def config(self) -> dict[str, Any]:
        config = {"classes": list(CLASSES), "train_per_class": self.train_per_class,
                  "val_per_class": self.val_per_class, "image_size": self.image_size,
                  "fonts": [Path(f).name for f in system_fonts()]}
        if self.test_per_class:  # absent when 0, so datasets rendered before the test split resume as they were
            config["test_per_class"] = self.test_per_class
        return config

    def item_path(self, index: int) -> str:
        bound = len(CLASSES) * self.train_per_class
        split = "train" if index < bound else "val" if index < bound + len(CLASSES) * self.val_per_class else "test"
        return f"{split}/{CLASSES[index % len(CLASSES)]}/{index:06d}.png"

    def render_item(self, index: int) -> bytes:
        im = draw_logo(index % len(CLASSES), np.random.default_rng([self.seed, 3, index]), self.image_size)
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=3)
        return buf.getvalue()

    def render_shard(self, index: int, start: int, stop: int) -> dict[str, bytes]:
        return {self.item_path(i): self.render_item(i) for i in range(start, stop)}

    def shard_info(self, index: int, start: int, stop: int, files: dict[str, bytes]) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for rel in files:
            split, cls, _ = rel.split("/")
            counts[f"{split}/{cls}"] = counts.get(f"{split}/{cls}", 0) + 1
        return {"counts": counts}

    def summarize(self, records: list[dict]) -> dict[str, Any]:
        splits: dict[str, dict[str, int]] = {}
        for record in records:
            for key, n in record["info"]["counts"].items():
                split, cls = key.split("/")
                splits.setdefault(split, dict.fromkeys(CLASSES, 0))[cls] += n
        return {"layout": "image_folder", "splits": splits}
