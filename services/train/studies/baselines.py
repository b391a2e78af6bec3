"""A non-neural baseline for image classification: hand-made image features and a scikit-learn classifier.

It stands in for the "rule-based classifier" a study compares its networks against: colour count, colour
statistics, gradient statistics, edge density and a text-likeness measure, computed from the uint8 images
the engine trains on (``DataBundle.split``), fed to a gradient-boosted tree ensemble.

    model = fit_feature_baseline(train_x, train_y, seed=0)
    metrics = probability_metrics(model.predict_proba(val_x), val_y, classes, "val")

Every image is first resized to ``WORK_SIZE`` x ``WORK_SIZE``, so the features (their number and, up to
resampling, their values) do not depend on the input resolution; ``FEATURE_NAMES`` names the columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.ensemble import RandomForestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.errors import InvalidArgument

# Below the sizes logo studies render (64-224 px), so every such input is shrunk, and then smoothed with a
# 3x3 binomial filter: a drawn edge spans two or three working pixels whether the resize blended it or
# (an input of exactly WORK_SIZE) nothing did. At 64 px without the filter, a forest fitted on 64 px logos
# scored 72-76% on 128 px ones; with both, 99-100%.
WORK_SIZE = 48
_BINOMIAL = (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16).expand(3, 1, 3, 3)
# Images are featurised this many at a time: the float copies of a whole split could be gigabytes.
_CHUNK = 512
# Colours are quantised to 8 levels per channel (512 colours): coarse enough that the blended pixels
# a resize puts on a shape's border do not count as colours of their own, fine enough to separate flat fills.
_LEVELS_BITS = 3
# Per-pixel gradient magnitude (largest over the channels, in uint8 steps per working pixel). At 48 px a
# rendered colour gradient changes by ~1-10 steps per pixel, a drawn edge (blurred over 2-3 pixels) by 20+.
_MAG_BINS = (0.5, 2.0, 5.0, 10.0, 20.0, 50.0)
_SMOOTH = (0.5, 10.0)  # nonzero but this small: the inside of a colour gradient
_EDGE = 20.0  # a drawn edge (shape border, letter stroke)
_THIN = 3  # a run between two edges this short (working pixels) is a stroke: letters, thin outlines
_BAND = WORK_SIZE // 4  # rows in the band text is looked for in
_BUSY = 6  # edges a row of text crosses at least; a row through a shape crosses 2 (4 with an outline)

FEATURE_NAMES: tuple[str, ...] = (
    # colour count: log(1 + distinct quantised colours), colours covering over 1% / 5% of the image, the
    # share of the 1, 2, 3 commonest colours, the entropy of the colour histogram (bits)
    "colours_any", "colours_over_1pct", "colours_over_5pct",
    "top1_colour_share", "top2_colour_share", "top3_colour_share", "colour_entropy",
    # colour statistics: per-channel mean and spread, saturation, spread of brightness (0..1 scale)
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b",
    "saturation_mean", "saturation_std", "luma_std",
    # gradient statistics: the share of pixels per magnitude bin, mean / spread / 90th percentile of the
    # magnitude, the share of smooth pixels (overall and among those not flat), their direction coherence
    *(f"grad_share_{lo:g}_{hi:g}" for lo, hi in zip((0.0, *_MAG_BINS), (*_MAG_BINS, math.inf), strict=True)),
    "grad_mean", "grad_std", "grad_p90", "smooth_share", "smooth_of_nonflat", "smooth_coherence",
    # edge density: the share of pixels on a drawn edge
    "edge_density",
    # text-likeness: edges crossed by the busiest row and by the 8 busiest (per pixel of width), the share of
    # rows crossing _BUSY edges or more, the share of edge pixels in the densest band of _BAND rows, the share
    # of pixels in thin runs, and that per edge pixel
    "row_transitions_max", "row_transitions_top8", "rows_busy", "edge_band_share",
    "thin_run_share", "thin_of_edges",
)


def _as_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InvalidArgument(f"images must be uint8 N x C x H x W with C 1 or 3, got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise InvalidArgument(f"no images to featurise: shape {tuple(x.shape)}")
    return x


def _window_any(edges: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Whether ``edges`` (..., L, bool) has a True in [j + lo, j + hi) for every position j (out of range
    counts as False), via a cumulative sum so it costs the same for any window."""
    length = edges.shape[-1]
    cs = F.pad(edges.to(torch.int32).cumsum(-1), (1, 0))
    j = torch.arange(length)
    a, b = (j + lo).clamp(0, length), (j + hi).clamp(0, length)
    return (cs[..., b] - cs[..., a]) > 0


def _features(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    # Antialiased bilinear resampling averages when shrinking and interpolates when enlarging.
    img = F.interpolate(x.float(), size=(WORK_SIZE, WORK_SIZE), mode="bilinear", antialias=True,
                        align_corners=False).clamp_(0, 255)
    img = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), _BINOMIAL, groups=3)
    pixels = WORK_SIZE * WORK_SIZE
    out: list[torch.Tensor] = []

    # Colour count: a histogram of quantised colours per image, all images in one bincount.
    q = img.round().to(torch.int64) >> (8 - _LEVELS_BITS)
    levels = 1 << _LEVELS_BITS
    code = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    ncol = levels ** 3
    code = code.view(n, -1) + torch.arange(n).unsqueeze(1) * ncol
    share = torch.bincount(code.view(-1), minlength=n * ncol).view(n, ncol).float() / pixels
    top = share.sort(dim=1, descending=True).values
    entropy = -(share * share.clamp(min=1e-12).log2()).sum(1)
    out += [(share > 0).sum(1).float().log1p(), (share > 0.01).sum(1).float(), (share > 0.05).sum(1).float(),
            top[:, 0], top[:, :2].sum(1), top[:, :3].sum(1), entropy]

    # Colour statistics, on a 0..1 scale.
    unit = img / 255
    flat = unit.flatten(2)
    hi, lo = unit.max(1).values, unit.min(1).values
    saturation = ((hi - lo) / hi.clamp(min=1e-6)).flatten(1)
    luma = (0.299 * unit[:, 0] + 0.587 * unit[:, 1] + 0.114 * unit[:, 2]).flatten(1)
    out += [*flat.mean(2).unbind(1), *flat.std(2).unbind(1), saturation.mean(1), saturation.std(1), luma.std(1)]

    # Gradients: forward differences per channel on the common (W-1) x (W-1) grid; the magnitude is the
    # largest over the channels, so a change of hue at constant brightness still counts.
    dx = img[:, :, :-1, 1:] - img[:, :, :-1, :-1]
    dy = img[:, :, 1:, :-1] - img[:, :, :-1, :-1]
    mag = (dx.square() + dy.square()).sqrt().max(1).values.flatten(1)
    bins = torch.bucketize(mag, torch.tensor(_MAG_BINS), right=True)
    hist = F.one_hot(bins, len(_MAG_BINS) + 1).float().mean(1)
    smooth = (mag > _SMOOTH[0]) & (mag <= _SMOOTH[1])
    nonflat = (mag > _SMOOTH[0]).float().sum(1)
    # Coherence of the structure tensor summed over smooth pixels: 1 when they all change along one
    # direction (a linear gradient), lower for a radial one, ~0 for unstructured texture.
    w = smooth.view(n, 1, WORK_SIZE - 1, WORK_SIZE - 1).float()
    jxx, jyy, jxy = ((a * b * w).sum((1, 2, 3)) for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    coherence = ((jxx - jyy).square() + 4 * jxy.square()).sqrt() / (jxx + jyy).clamp(min=1e-6)
    out += [*hist.unbind(1), mag.mean(1), mag.std(1), mag.quantile(0.9, dim=1), smooth.float().mean(1),
            smooth.float().sum(1) / nonflat.clamp(min=1), coherence]

    # Edge density.
    strong = (mag > _EDGE).float()
    out.append(strong.mean(1))

    # Text-likeness. Connected-component counts would need a per-image labelling pass; run statistics
    # along rows and columns are batch-wide tensor ops and see the same thing: a word is a horizontal band
    # of rows crossed by many edges, enclosing short runs (letter strokes and the gaps between them), where
    # a shape's row meets two to four edges and encloses a long run.
    ex = (dx.abs().max(1).values > _EDGE)  # N x (W-1) x (W-1): an edge between pixel j and j+1 along x
    ey = (dy.abs().max(1).values > _EDGE)
    row_tr = ex.float().sum(2)  # transitions per row
    per_row = strong.view(n, WORK_SIZE - 1, WORK_SIZE - 1).sum(2)  # edge pixels per row
    band = F.avg_pool1d(per_row.unsqueeze(1), _BAND, stride=1).squeeze(1) * _BAND
    # A pixel sits in a thin run when edges lie within _THIN on both of its sides (along x or along y).
    thin_x = _window_any(ex, -_THIN, 0) & _window_any(ex, 0, _THIN)
    thin_y = (_window_any(ey.transpose(1, 2), -_THIN, 0) & _window_any(ey.transpose(1, 2), 0, _THIN)).transpose(1, 2)
    thin = (thin_x | thin_y).float().flatten(1)
    out += [row_tr.max(1).values / (WORK_SIZE - 1), row_tr.topk(8, dim=1).values.mean(1) / (WORK_SIZE - 1),
            (row_tr >= _BUSY).float().mean(1), band.max(1).values / per_row.sum(1).clamp(min=1),
            thin.mean(1), thin.sum(1) / strong.sum(1).clamp(min=1)]
    return torch.stack(out, dim=1)


def image_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 images (N x C x H x W, C 1 or 3, any H and W) -> N x len(FEATURE_NAMES) float32 features.

    Grey images are treated as RGB with equal channels, so one fitted model takes both.
    """
    x = _as_batch(images)
    with torch.inference_mode():
        feats = torch.cat([_features(chunk) for chunk in x.split(_CHUNK)])
    return feats.numpy().astype(np.float32)


@dataclass
class FeatureBaseline:
    """A fitted feature classifier: ``image_features`` then ``pipeline`` (scikit-learn)."""

    pipeline: Pipeline
    num_classes: int

    def predict_proba(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 N x C x H x W images -> N x num_classes class probabilities (rows sum to 1)."""
        probs = self.pipeline.predict_proba(image_features(images))
        # Columns follow the labels seen in training; a class absent there gets probability 0.
        out = np.zeros((len(probs), self.num_classes))
        out[:, self.pipeline.classes_] = probs
        return out


def _labels(y: torch.Tensor | np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InvalidArgument(f"{what} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) != n:
        raise InvalidArgument(f"{n} images but {len(labels)} {what}")
    if n and labels.min() < 0:
        raise InvalidArgument(f"{what} must be >= 0")
    return labels.astype(np.int64)


def fit_feature_baseline(train_x: torch.Tensor | np.ndarray, train_y: torch.Tensor | np.ndarray, seed: int,
                         *, num_classes: int | None = None) -> FeatureBaseline:
    """Fit the feature classifier on uint8 N x C x H x W images and their labels (0..K-1); ``num_classes``
    defaults to the largest label + 1.

    The classifier is a random forest: on rendered logos it matched gradient boosting (100% validation
    accuracy from 400 logos a class, 99% from 100) where logistic regression was 0.5-1 point lower at 100 a
    class, and it fits in about a second on one core, where HistGradientBoosting's OpenMP fit took 1-37 s
    on a shared two-core machine. The scaler leaves a forest's splits unchanged.
    """
    x = _as_batch(train_x)
    y = _labels(train_y, x.shape[0], "labels")
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if k <= y.max():
        raise InvalidArgument(f"num_classes={num_classes} but the labels go up to {int(y.max())}")
    if len(np.unique(y)) < 2:
        raise InvalidArgument("the training labels hold a single class; a classifier needs at least two")
    forest = RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1)
    pipeline = make_pipeline(StandardScaler(), forest).fit(image_features(x), y)
    return FeatureBaseline(pipeline, k)
