"""Tensor decoding and image preprocessing for the Open Inference Protocol (KServe v2) server.

Three input forms reach a model, all turned into one float NCHW batch at the model's input size:
- ``images``  UINT8 NHWC, any height/width, 1, 3 or 4 channels: resized, channel-matched, normalised
  with the model card's mean/std here in the server;
- ``tensor``  FP32 NCHW exactly the model's input size, already preprocessed: passed through untouched
  (zero-copy from the request bytes);
- ``encoded`` BYTES, one encoded PNG/JPEG/... image per element: decoded with PIL, then as ``images``.

The resize and normalisation match what training did (PIL-style bilinear, rounded back to uint8, then
``(x / 255 - mean) / std`` computed as one addcmul like the engine's Normalizer), so a served model sees
the same numbers as in training.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidArgument

# The request's raw bytes are immutable and nothing downstream writes into an input tensor, so the
# zero-copy view over them is safe; torch would otherwise warn on every request.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
warnings.filterwarnings("ignore", message="The given buffer is not writable")

INPUT_IMAGES = "images"
INPUT_TENSOR = "tensor"
INPUT_ENCODED = "encoded"
INPUT_DATATYPES = {INPUT_IMAGES: "UINT8", INPUT_TENSOR: "FP32", INPUT_ENCODED: "BYTES"}
_NP_DTYPES = {"UINT8": np.uint8, "FP32": np.dtype("<f4")}
# Luma weights (ITU-R 601), the ones PIL's convert("L") uses.
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    """A numeric input's raw bytes as an array of ``shape``, checking the byte count (no copy)."""
    dtype = np.dtype(_NP_DTYPES[datatype])
    count = _element_count(name, shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidArgument(f"input {name!r}: {len(raw)} raw bytes, but {datatype} of shape {list(shape)} "
                              f"needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _element_count(name: str, shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


class Preprocessor:
    """Turns request inputs into the float NCHW batch one model expects (from its model card)."""

    def __init__(self, input_size: list[int], mean: list[float], std: list[float]):
        if len(input_size) != 3:
            raise InvalidArgument(f"model input_size must be [C, H, W], got {input_size}")
        self.channels, self.height, self.width = (int(v) for v in input_size)
        if len(mean) != self.channels or len(std) != self.channels:
            raise InvalidArgument(f"normalization needs {self.channels} mean/std values, got {mean} / {std}")
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1)
        self._shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1)

    # ---- the three input forms

    def from_tensor(self, arr: np.ndarray) -> torch.Tensor:
        """FP32 NCHW, already at the model's size and normalised: used as is."""
        expected = (self.channels, self.height, self.width)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != expected:
            raise InvalidArgument(f"input {INPUT_TENSOR!r} must be FP32 [N, {', '.join(map(str, expected))}] "
                                  f"(already preprocessed), got shape {list(arr.shape)}")
        if arr.shape[0] == 0:
            raise InvalidArgument(f"input {INPUT_TENSOR!r} has an empty batch")
        return torch.from_numpy(arr)

    def from_images(self, arr: np.ndarray) -> torch.Tensor:
        """UINT8 NHWC of any height/width with 1, 3 or 4 channels -> normalised float NCHW."""
        if arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
            raise InvalidArgument(f"input {INPUT_IMAGES!r} must be UINT8 [N, H, W, C] with C in 1, 3, 4, "
                                  f"got shape {list(arr.shape)}")
        if min(arr.shape[:3]) == 0:
            raise InvalidArgument(f"input {INPUT_IMAGES!r} has an empty dimension: {list(arr.shape)}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)  # a view: NCHW strides over the NHWC bytes
        return self.normalize(self._match_channels_u8(self._resize_u8(x)))

    def from_encoded(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded image files (PNG, JPEG, ...) -> normalised float NCHW."""
        if not blobs:
            raise InvalidArgument(f"input {INPUT_ENCODED!r} has no images")
        mode = "L" if self.channels == 1 else "RGB"
        out = np.empty((len(blobs), self.height, self.width, 1 if mode == "L" else 3), np.uint8)
        for i, blob in enumerate(blobs):
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    im = im.convert(mode)
                    if im.size != (self.width, self.height):
                        im = im.resize((self.width, self.height), Image.Resampling.BILINEAR)
                    out[i] = np.asarray(im).reshape(self.height, self.width, -1)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                raise InvalidArgument(f"input {INPUT_ENCODED!r} element {i} ({len(blob)} bytes) is not a "
                                      f"decodable image: {exc}") from None
        x = torch.from_numpy(out).permute(0, 3, 1, 2)
        return self.normalize(self._match_channels_u8(x))

    # ---- steps

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        # One fused op, the same arithmetic as training's Normalizer, so served logits match exactly.
        return torch.addcmul(self._shift, x_u8.float(), self._scale).contiguous()

    def _resize_u8(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] == self.height and x.shape[3] == self.width:
            return x
        # Antialiased bilinear is what PIL's BILINEAR resize (used for image-folder training data) does;
        # rounding back to uint8 keeps the values on the grid training saw.
        y = F.interpolate(x.float(), size=(self.height, self.width), mode="bilinear", align_corners=False,
                          antialias=True)
        return y.round_().clamp_(0, 255).to(torch.uint8)

    def _match_channels_u8(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == 4:  # RGBA: the alpha channel carries no class information
            x, c = x[:, :3], 3
        if c == self.channels:
            return x
        if c == 1:
            return x.expand(-1, self.channels, -1, -1)
        if self.channels == 1:
            luma = (x.float() * _LUMA).sum(dim=1, keepdim=True)
            return luma.round_().clamp_(0, 255).to(torch.uint8)
        raise InvalidArgument(f"cannot feed {c}-channel images to a {self.channels}-channel model")
