"""Batched augmentation of uint8 image batches, as tensor ops on the whole batch at once.

Order: random crop with padding and horizontal flip on uint8 (cheap gathers), then float in [0, 1],
rotation (affine_grid), colour jitter, random grayscale, and last mixup/cutmix. Every random draw
takes the caller's ``torch.Generator`` (on the batch's device), so a seed replays a run exactly.
Normalisation is separate (``shared.preprocess``): mixing and per-channel affine normalisation commute.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InvalidArgument

# Per-channel mean / std in [0, 1] units.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's convert("L")


class AugmentConfig(BaseModel):
    """What to apply; everything off by default. Probabilities are per sample except ``mix_prob``."""

    model_config = ConfigDict(extra="forbid")

    crop_padding: int = Field(0, ge=0)
    padding_mode: Literal["zeros", "edge"] = "zeros"
    hflip: float = Field(0.0, ge=0, le=1)
    rotate_deg: float = Field(0.0, ge=0, le=180)
    brightness: float = Field(0.0, ge=0)
    contrast: float = Field(0.0, ge=0)
    saturation: float = Field(0.0, ge=0)
    grayscale: float = Field(0.0, ge=0, le=1)
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    mix_prob: float = Field(1.0, ge=0, le=1)

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @classmethod
    def preset(cls, name: str) -> AugmentConfig:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise InvalidArgument(f"unknown augmentation preset {name!r}; choose one of "
                                  f"{', '.join(PRESETS)}") from None


PRESETS: dict[str, dict] = {
    "none": {},
    "mnist": {"crop_padding": 2, "rotate_deg": 10},
    "cifar": {"crop_padding": 4, "hflip": 0.5},
    "cifar_strong": {"crop_padding": 4, "hflip": 0.5, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2,
                     "mixup_alpha": 0.2, "cutmix_alpha": 1.0},
    "logo": {"crop_padding": 8, "padding_mode": "edge", "hflip": 0.5, "rotate_deg": 15, "brightness": 0.2,
             "contrast": 0.2, "saturation": 0.2, "grayscale": 0.1},
}


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device).mul_(high - low).add_(low)


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator, mode: str = "zeros") -> torch.Tensor:
    """Pad by ``padding`` on every side and crop back to the input size at a random offset per sample."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    pad = (padding,) * 4
    # replicate-padding is only implemented for float tensors
    xp = F.pad(x.float(), pad, mode="replicate").to(x.dtype) if mode == "edge" else F.pad(x, pad)
    hp, wp = h + 2 * padding, w + 2 * padding
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=g, device=x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, flat).reshape(b, c, h, w)


def random_hflip(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def random_rotate(x: torch.Tensor, max_deg: float, g: torch.Generator) -> torch.Tensor:
    """Rotate each float image by an angle uniform in [-max_deg, max_deg]; corners fill with zeros."""
    b = x.shape[0]
    angle = _uniform(b, -max_deg, max_deg, g, x.device) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of float RGB images."""
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def color_jitter(x: torch.Tensor, brightness: float, contrast: float, saturation: float,
                 g: torch.Generator) -> torch.Tensor:
    """Per-sample factors uniform in [1 - s, 1 + s]; saturation only applies to 3-channel images."""
    b = x.shape[0]
    if brightness:
        f = _uniform(b, max(0.0, 1 - brightness), 1 + brightness, g, x.device).view(b, 1, 1, 1)
        x = (x * f).clamp_(0, 1)
    if contrast:
        f = _uniform(b, max(0.0, 1 - contrast), 1 + contrast, g, x.device).view(b, 1, 1, 1)
        lum = _gray(x) if x.shape[1] == 3 else x
        m = lum.mean((1, 2, 3), keepdim=True)
        x = ((x - m) * f + m).clamp_(0, 1)
    if saturation and x.shape[1] == 3:
        f = _uniform(b, max(0.0, 1 - saturation), 1 + saturation, g, x.device).view(b, 1, 1, 1)
        gray = _gray(x)
        x = ((x - gray) * f + gray).clamp_(0, 1)
    return x


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=g, device=x.device) < p
    if x.shape[1] != 3:
        return x
    return torch.where(mask[:, None, None, None], _gray(x).expand_as(x), x)


def _beta(alpha: float, g: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; seed numpy from the torch generator instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device).item())
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              mix_prob: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix (one of the two per batch, chosen at random when both are on).

    Returns the mixed images and soft targets (B, num_classes) whose rows sum to 1; with probability
    1 - ``mix_prob`` the batch passes unmixed with one-hot targets.
    """
    b, _, h, w = x.shape
    target = F.one_hot(y, num_classes).to(x.dtype)
    draws = torch.rand(2, generator=g, device=x.device).tolist()
    perm = torch.randperm(b, generator=g, device=x.device)
    if draws[0] >= mix_prob or b < 2:
        return x, target
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or draws[1] < 0.5)
    lam = _beta(cutmix_alpha if use_cutmix else mixup_alpha, g)
    if use_cutmix:
        ratio = math.sqrt(1 - lam)
        ch, cw = int(h * ratio), int(w * ratio)
        cy = int(torch.randint(0, h, (1,), generator=g, device=x.device).item())
        cx = int(torch.randint(0, w, (1,), generator=g, device=x.device).item())
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
        x = x.clone()
        x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)  # the box was clipped: weigh by its real area
    else:
        x = x * lam + x[perm] * (1 - lam)
    return x, target * lam + target[perm] * (1 - lam)


class BatchAugment:
    """Callable ``(x_uint8, y, generator) -> (x_float01, y or soft targets)`` for one configuration."""

    def __init__(self, config: AugmentConfig, num_classes: int | None = None):
        if config.mixes and not num_classes:
            raise InvalidArgument("mixup/cutmix need num_classes for their soft targets")
        self.config = config
        self.num_classes = num_classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise InvalidArgument(f"augmentation takes uint8 (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        c = self.config
        x = random_crop(x, c.crop_padding, g, c.padding_mode)
        if c.hflip:
            x = random_hflip(x, c.hflip, g)
        x = x.float().div_(255)
        if c.rotate_deg:
            x = random_rotate(x, c.rotate_deg, g)
        if c.brightness or c.contrast or c.saturation:
            x = color_jitter(x, c.brightness, c.contrast, c.saturation, g)
        if c.grayscale:
            x = random_grayscale(x, c.grayscale, g)
        if c.mixes:
            x, y = mix_batch(x, y, self.num_classes, c.mixup_alpha, c.cutmix_alpha, c.mix_prob, g)
        return x, y
