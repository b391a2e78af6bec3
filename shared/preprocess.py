"""uint8 images -> the float batch a model expects. One module for training, evaluation, benchmarking and
serving, so the numbers a served model sees are the numbers it was trained on.

The steps, always in this order:
1. channels matched on uint8: RGBA drops alpha, 1 channel is repeated, RGB -> 1 channel is ITU-R 601 luma
   rounded back to uint8 (what PIL's ``convert("L")`` does to image-folder training data);
2. normalised as ``(x / 255 - mean) / std``, computed as one fused ``addcmul`` with precomputed constants;
3. resized in float to the model's input size when it differs (bilinear, antialiased when shrinking).
   Training upsamples small datasets this way on the device (CIFAR 32x32 -> 224 for ViTs), after
   augmentation, so serving a 32x32 image to such a model repeats exactly what training did.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from shared.errors import InvalidArgument

LUMA = (0.299, 0.587, 0.114)


class Normalizer:
    """Per-channel ``(x / 255 - mean) / std`` as one fused op, for uint8 or [0, 1] float batches."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: str | torch.device | None = None):
        if len(mean) != len(std) or not mean:
            raise InvalidArgument(f"normalization needs one mean and one std per channel, got {mean} / {std}")
        if min(std) <= 0:
            raise InvalidArgument(f"normalization std must be positive, got {std}")
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.channels = len(mean)
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / std_t)
        self.scale_u8 = 1.0 / (255.0 * std_t)
        self.scale_unit = 1.0 / std_t

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalised float32."""
        return torch.addcmul(self.shift, x_u8.float(), self.scale_u8)

    def from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """float (N, C, H, W) in [0, 1] (an augmented batch) -> normalised float32."""
        return torch.addcmul(self.shift, x, self.scale_unit)


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A float batch to (height, width); unchanged when it already has that size."""
    if x.shape[-2:] == (height, width):
        return x
    shrinking = x.shape[-2] > height or x.shape[-1] > width
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)


def match_channels(x_u8: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in 1, 3, 4 -> uint8 with ``channels`` channels (see the module docstring)."""
    c = x_u8.shape[1]
    if c == 4:  # RGBA: the alpha channel carries no class information
        x_u8, c = x_u8[:, :3], 3
    if c == channels:
        return x_u8
    if c == 1:
        return x_u8.expand(-1, channels, -1, -1)
    if channels == 1 and c == 3:
        luma = torch.tensor(LUMA, device=x_u8.device).view(1, 3, 1, 1)
        return (x_u8.float() * luma).sum(dim=1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise InvalidArgument(f"cannot feed {c}-channel images to a {channels}-channel model")


class Preprocessor:
    """The input pipeline of one model, from its ``input_size`` [C, H, W] and normalisation."""

    def __init__(self, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device | None = None):
        if len(input_size) != 3 or min(input_size) <= 0:
            raise InvalidArgument(f"model input_size must be [C, H, W], got {list(input_size)}")
        self.channels, self.height, self.width = (int(v) for v in input_size)
        if len(mean) != self.channels or len(std) != self.channels:
            raise InvalidArgument(f"normalization needs {self.channels} mean/std values, got {mean} / {std}")
        self.normalizer = Normalizer(mean, std, device)

    @classmethod
    def from_card(cls, card, device: str | torch.device | None = None) -> Preprocessor:
        """The pipeline a published model's card (``shared.modelcard.ModelCard``) describes."""
        return cls(card.input_size, card.normalization.mean, card.normalization.std, device)

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) of any size with 1, 3 or 4 channels -> the model's float input."""
        if x_u8.dtype != torch.uint8 or x_u8.dim() != 4:
            raise InvalidArgument(f"images must be uint8 [N, C, H, W], got {x_u8.dtype} {list(x_u8.shape)}")
        return self.resize(self.normalizer(match_channels(x_u8, self.channels)))

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self.normalizer(x_u8)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, self.height, self.width)
