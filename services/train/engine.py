"""The training engine: config in, trained + checkpointed + exported model out.

Hot-loop rule: nothing in the per-step path synchronises with the host or logs. Loss and correct counts
are accumulated as on-device tensors and read once per epoch; metrics, checkpoints, events, MLflow and
Prometheus all happen between epochs. bench/bench_train.py holds this to >= 90% of a bare PyTorch loop.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from services.train import checkpoint as ckpt
from services.train.config import DataConfig, TrainConfig
from services.train.events import EventWriter, default_events_path
from shared.config import config_hash
from shared.errors import Cancelled, FailedPrecondition, InvalidArgument
from shared.logs import get_logger

log = get_logger(__name__)

# The usual normalisation constants per data kind (shared.data.NORMALIZATION), when the config gives none.
_NORM_NAME = {"mnist": "mnist", "cifar10": "cifar10", "imagefolder": "imagenet"}


# ================================================================ data

@dataclass
class DataBundle:
    """The whole dataset as uint8 tensors in memory (N, C, H, W) with int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    version: str = ""
    resize: int | None = None  # upsample batches to this square size on the device (CIFAR -> 224 ViTs)

    @property
    def input_size(self) -> list[int]:
        c, h, w = self.train_x.shape[1:]
        return [c, self.resize, self.resize] if self.resize else [c, h, w]


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


def _synthetic(cfg: DataConfig, seed: int) -> DataBundle:
    size = cfg.image_size or 28
    if cfg.num_classes == 10 and cfg.channels == 1:
        tx, ty = synthetic_digits(cfg.train_size, seed=seed, size=size)
        vx, vy = synthetic_digits(cfg.val_size, seed=seed + 1, size=size)
    else:
        # Other shapes: one fixed random template per class plus noise; learnable, not trivial.
        g = torch.Generator().manual_seed(seed)
        templates = torch.rand(cfg.num_classes, cfg.channels, size, size, generator=g)

        def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.randint(0, cfg.num_classes, (n,), generator=g)
            x = 0.6 * templates[y] + 0.4 * torch.rand(n, cfg.channels, size, size, generator=g)
            return (x * 255).to(torch.uint8), y

        tx, ty = make(cfg.train_size)
        vx, vy = make(cfg.val_size)
    # Digits look like MNIST (dark background, thin strokes): MNIST's constants fit them.
    digits = cfg.num_classes == 10 and cfg.channels == 1
    if digits:
        from shared.data import NORMALIZATION

        mean, std = NORMALIZATION["mnist"]
    else:
        mean, std = [0.5] * cfg.channels, [0.25] * cfg.channels
    return DataBundle(tx, ty, vx, vy, [str(i) for i in range(cfg.num_classes)], list(mean), list(std))


def data_source(path: str) -> tuple[str, str | None]:
    """``(root, store_url)`` for the readers: a local dir (plain path or file://), ``s3://bucket/key/prefix``
    (a published dataset in that bucket), or ``store:key/prefix`` (in the platform's TRAINYARD_STORE)."""
    if path.startswith("store:"):
        from shared.settings import load_settings

        return path[len("store:"):].strip("/"), load_settings().store_url
    if path.startswith("s3://"):
        bucket, _, key = path[len("s3://"):].partition("/")
        if not bucket or not key.strip("/"):
            raise InvalidArgument(f"data.path {path} needs s3://bucket/key-prefix")
        return key.strip("/"), f"s3://{bucket}"
    if path.startswith("file://"):
        return path[len("file://"):], None
    if "://" in path:
        raise InvalidArgument(f"data.path {path}: use a local path, file://, s3://bucket/prefix or store:prefix")
    return path, None


def load_data(cfg: DataConfig, seed: int, cache_root: Path) -> DataBundle:
    """Read the configured dataset into memory, split validation, take the stratified subset."""
    if cfg.kind == "synthetic":
        bundle = _synthetic(cfg, seed)
    else:
        from shared import data as D

        root, store_url = data_source(cfg.path)
        src = {"store_url": store_url, "cache_dir": cache_root}
        if cfg.kind == "mnist":
            train, test = D.read_mnist(root, **src)
        elif cfg.kind == "cifar10":
            train, test = D.read_cifar10(root, **src)
        else:
            # Image folders are decoded at the target size up front; no per-batch resize later.
            splits = D.read_image_folder_splits(root, size=cfg.image_size or 224, **src)
            train = splits.get("train", splits.get("all"))
            test = next((splits[k] for k in ("val", "valid", "validation", "test") if k in splits), None)
        tx, ty = train.images, train.labels
        classes = list(train.classes)
        if cfg.val_split == "test" and test is not None and len(test.labels):
            vx, vy = test.images, test.labels
        else:
            # Hold out a stratified fraction of train, fixed by subset_seed so every run sees the same split.
            tr_idx, val_idx = (torch.as_tensor(i) for i in D.stratified_split(ty, cfg.val_fraction,
                                                                              seed=cfg.subset_seed))
            vx, vy, tx, ty = tx[val_idx], ty[val_idx], tx[tr_idx], ty[tr_idx]
        mean, std = D.NORMALIZATION[_NORM_NAME[cfg.kind]]
        bundle = DataBundle(tx, ty, vx, vy, classes, list(mean), list(std))
    if cfg.subset is not None:
        if cfg.subset > len(bundle.train_y):
            raise InvalidArgument(f"data.subset={cfg.subset} exceeds the {len(bundle.train_y)} training samples")
        if cfg.subset < len(bundle.train_y):
            from shared.data import stratified_subset

            idx = torch.as_tensor(stratified_subset(bundle.train_y, cfg.subset, seed=cfg.subset_seed))
            bundle.train_x, bundle.train_y = bundle.train_x[idx], bundle.train_y[idx]
    if cfg.image_size and tuple(bundle.train_x.shape[-2:]) != (cfg.image_size, cfg.image_size):
        # Kept small in memory (50k CIFAR at 224x224 would be 7.5 GB); each batch is upsampled on the device.
        bundle.resize = cfg.image_size
    if cfg.mean is not None:
        bundle.mean = list(cfg.mean)
    if cfg.std is not None:
        bundle.std = list(cfg.std)
    if len(bundle.mean) != bundle.train_x.shape[1] or len(bundle.std) != bundle.train_x.shape[1]:
        raise InvalidArgument(f"data.mean/std need {bundle.train_x.shape[1]} values (one per channel)")
    h = hashlib.sha256()
    for t in (bundle.train_x, bundle.train_y, bundle.val_x, bundle.val_y):
        h.update(t.contiguous().numpy().tobytes())
    bundle.version = h.hexdigest()[:16]
    return bundle


class Normalizer:
    """uint8 batch -> normalised float on the device in one fused step (evaluation's input path)."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, resize: int | None = None):
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, -1, 1, 1).to(device)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1).to(device)
        self.resize = resize

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        return resize_batch(torch.addcmul(self.shift, x_u8.float(), self.scale), self.resize)


def resize_batch(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# ================================================================ loss, optimiser, schedule

def class_weights(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    cw = cfg.loss.class_weights
    if cw == "none":
        return None
    if cw == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
        return counts.sum() / (num_classes * counts)
    if len(cw) != num_classes:
        raise InvalidArgument(f"loss.class_weights has {len(cw)} values for {num_classes} classes")
    return torch.tensor(cw, dtype=torch.float32)


class Criterion(torch.nn.Module):
    """Cross-entropy or focal loss, with class weights and label smoothing; accepts hard or soft targets."""

    def __init__(self, name: str, num_classes: int, weight: torch.Tensor | None, label_smoothing: float,
                 gamma: float):
        super().__init__()
        self.name, self.num_classes, self.smoothing, self.gamma = name, num_classes, label_smoothing, gamma
        self.register_buffer("weight", weight if weight is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.numel() else None
        if self.name == "ce":
            return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.smoothing)
        # Focal loss in its general (soft-target) form: -sum_c t_c w_c (1 - p_c)^gamma log p_c.
        logp = F.log_softmax(logits.float(), dim=1)
        if target.dim() == 1:
            target = F.one_hot(target, self.num_classes).to(logp.dtype)
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / self.num_classes
        term = target * (1 - logp.exp()).pow(self.gamma) * logp
        if weight is not None:
            term = term * weight
        return -term.sum(1).mean()


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    # All parameters, frozen ones included: a frozen parameter has no grad and is skipped, and unfreezing
    # later needs no new param group.
    params = list(model.parameters())
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)


class LRSchedule:
    """Per-epoch learning rate: warmup, then step/cosine as pure functions of the epoch, or plateau.

    Pure functions of the epoch make resume trivially exact; only plateau carries state (JSON-able).
    """

    def __init__(self, cfg: TrainConfig):
        self.s = cfg.scheduler
        self.base_lr = cfg.optimizer.lr
        self.epochs = cfg.epochs
        self.plateau_scale = 1.0
        self.best: float | None = None
        self.bad_epochs = 0

    def lr_at(self, epoch: int) -> float:
        """LR for 1-based ``epoch``."""
        s, e = self.s, epoch - 1
        if e < s.warmup_epochs:
            return self.base_lr * (e + 1) / (s.warmup_epochs + 1)
        e -= s.warmup_epochs
        if s.name == "step":
            return self.base_lr * s.gamma ** (e // s.step_size)
        if s.name == "cosine":
            span = max(1, self.epochs - s.warmup_epochs)
            return s.min_lr + (self.base_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * e / span))
        if s.name == "plateau":
            return max(s.min_lr, self.base_lr * self.plateau_scale)
        return self.base_lr

    def observe(self, metrics: dict[str, float]) -> None:
        """After an epoch: plateau tracks its metric (ignored for the others)."""
        if self.s.name != "plateau":
            return
        value = _metric(metrics, self.s.metric)
        if self.best is None or _improved(value, self.best, self.s.mode, self.s.threshold):
            self.best, self.bad_epochs = value, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.s.patience:
            self.plateau_scale *= self.s.factor
            self.bad_epochs = 0
            log.info("plateau: reducing lr", extra={"lr": self.base_lr * self.plateau_scale})

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, d: dict) -> None:
        self.plateau_scale, self.best, self.bad_epochs = d["plateau_scale"], d["best"], d["bad_epochs"]


def _metric(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise InvalidArgument(f"unknown metric {name!r}; one of {sorted(k for k in metrics if '/' not in k)}")
    return float(metrics[name])


def _improved(value: float, best: float, mode: str, min_delta: float) -> bool:
    return value < best - min_delta if mode == "min" else value > best + min_delta


# ================================================================ metrics

def _safe_name(name: str) -> str:
    return re.sub(r"[^\w\-. ]", "_", name)


def classification_metrics(confusion: torch.Tensor, classes: list[str], prefix: str = "val") -> dict[str, float]:
    """Macro + per-class precision/recall/F1 and per-class accuracy from a (true x pred) confusion matrix."""
    cm = confusion.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    present = support > 0  # macro averages over classes that occur in the split
    out = {
        f"{prefix}_precision": float(precision[present].mean()) if present.any() else 0.0,
        f"{prefix}_recall": float(recall[present].mean()) if present.any() else 0.0,
        f"{prefix}_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    for i, name in enumerate(classes):
        n = _safe_name(name)
        out[f"{prefix}_class_acc/{n}"] = float(recall[i])
        out[f"{prefix}_precision/{n}"] = float(precision[i])
        out[f"{prefix}_recall/{n}"] = float(recall[i])
        out[f"{prefix}_f1/{n}"] = float(f1[i])
    return out


# ================================================================ distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistInfo":
        # torchrun sets these; a plain `python -m services.train.worker` has none of them.
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def _all_reduce(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(t)
    return t


# ================================================================ engine

@dataclass
class RunResult:
    run_id: str
    mlflow_run_id: str | None
    state: str
    epochs_done: int
    history: list[dict[str, float]]
    best_metric: float | None
    best_epoch: int | None
    model_name: str | None = None
    model_version: int | None = None
    final_weights_sha256: str = ""
    message: str = ""
    timings: list[dict[str, float]] = field(default_factory=list)


class Engine:
    """Runs one training run end to end. Construct, then ``run()``.

    ``store``: an ArtifactStore (checkpoints, events, exported model); ``tracking``: False turns MLflow off
    (benchmarks of the bare engine), else ``tracking_uri`` (default from settings).
    """

    def __init__(self, cfg: TrainConfig, run_id: str, *, store=None, events_path: str | Path | None = None,
                 tracking: bool = True, tracking_uri: str | None = None, dist: DistInfo | None = None,
                 export: bool | None = None, stop_flag=None):
        from shared.settings import load_settings
        from shared.storage import open_store

        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", run_id):
            raise InvalidArgument(f"run id {run_id!r} must be 1-128 of [A-Za-z0-9_.-]")
        self.cfg = cfg
        self.run_id = run_id
        self.settings = load_settings()
        self.store = store if store is not None else open_store(self.settings.store_url)
        self.dist = dist or DistInfo.from_env()
        self.tracking = tracking
        self.tracking_uri = tracking_uri
        self.do_export = cfg.export.enabled if export is None else export
        self.stop_flag = stop_flag  # callable -> True when the run should stop (SIGTERM)
        self.events: EventWriter | None = None
        if self.dist.is_main:
            self.events = EventWriter(events_path or default_events_path(run_id), run_id, self.store)
        self.timings: list[dict[str, float]] = []

    # ------------------------------------------------------------ setup

    def _setup_runtime(self) -> torch.device:
        cfg = self.cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise FailedPrecondition("device=cuda but no CUDA device is available")
        device = torch.device(f"cuda:{self.dist.local_rank}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(device)
        if self.dist.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
        # Same seed on every rank: identical initial weights (DDP also broadcasts them) and identical
        # shuffles, which the loader then shards by rank.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        import random

        random.seed(cfg.seed)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif want_cuda:
            torch.backends.cudnn.benchmark = True
        self.amp = cfg.amp and device.type == "cuda"
        if cfg.amp and not self.amp:
            log.info("amp requested but the device is CPU: training in float32", extra={"run_id": self.run_id})
        return device

    def _build_model(self, num_classes: int, in_chans: int) -> tuple[torch.nn.Module, dict]:
        from shared.models import create_model

        model_kwargs = {"num_classes": num_classes, "in_chans": in_chans, **self.cfg.model.kwargs}
        model = create_model(self.cfg.model.name, pretrained_path=self.cfg.model.pretrained_path, **model_kwargs)
        return model, model_kwargs

    def _make_loader(self, data: DataBundle, device: torch.device):
        from shared.data import InMemoryDataset, InMemoryLoader
        from shared.data.augment import AugmentConfig as BatchAugmentConfig

        if self.cfg.batch_size % self.dist.world_size:
            raise InvalidArgument(f"batch_size {self.cfg.batch_size} is not divisible by the "
                                  f"{self.dist.world_size} processes")
        a = self.cfg.data.augment
        augment = BatchAugmentConfig(
            crop_padding=a.crop, hflip=0.5 if a.flip else 0.0, rotate_deg=a.rotation, brightness=a.color_jitter,
            contrast=a.color_jitter, saturation=a.color_jitter, grayscale=a.grayscale, mixup_alpha=a.mixup,
            cutmix_alpha=a.cutmix) if a.enabled else None
        # The loader shards one shared permutation by rank, so the per-rank batches of step k together are
        # exactly the single-process batch k: the global batch stays cfg.batch_size.
        loader = InMemoryLoader(
            InMemoryDataset(data.train_x, data.train_y, data.classes),
            batch_size=self.cfg.batch_size // self.dist.world_size, shuffle=True, augment=augment,
            seed=self.cfg.seed, drop_last=False, rank=self.dist.rank, world_size=self.dist.world_size,
            mean=data.mean, std=data.std, device=device,
        )
        if augment is None and data.train_x.numel() * 4 <= _PRENORMALIZE_MAX_BYTES:
            return _PreNormalized(loader, data, device)
        return loader

    # ------------------------------------------------------------ the run

    def run(self) -> RunResult:
        started = time.time()
        # Process-wide torch settings the run changes; restored so an in-process caller (tests, the
        # benchmark) is left as it was.
        saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
        try:
            return self._run()
        except BaseException as exc:
            state = "CANCELLED" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else "FAILED"
            if self.events is not None:
                self.events.state(state, message=f"{type(exc).__name__}: {exc}",
                                  elapsed_s=round(time.time() - started, 3))
            raise
        finally:
            if self.events is not None:
                self.events.close()
            torch.set_num_threads(saved[0])
            torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
            torch.backends.cudnn.benchmark = saved[3]

    def _run(self) -> RunResult:
        cfg, dist = self.cfg, self.dist
        device = self._setup_runtime()
        data = load_data(cfg.data, cfg.seed, self.settings.home / "cache" / "datasets")
        classes, num_classes = data.classes, len(data.classes)
        model, model_kwargs = self._build_model(num_classes, data.input_size[0])
        model.to(device)
        self._apply_freeze(model, epoch=1)
        optimizer = build_optimizer(cfg, model)
        schedule = LRSchedule(cfg)
        criterion = Criterion(cfg.loss.name, num_classes, class_weights(cfg, data.train_y, num_classes),
                              cfg.loss.label_smoothing, cfg.loss.focal_gamma).to(device)
        loader = self._make_loader(data, device)
        self._resize = data.resize
        # One scaler for the whole run (its scale adapts over many steps); checkpointed with the rest.
        self._scaler = torch.amp.GradScaler("cuda") if self.amp else None
        normalize = Normalizer(data.mean, data.std, device, data.resize)

        # ---- resume
        st: dict[str, Any] = {"history": [], "best_metric": None, "best_epoch": None, "es_best": None,
                              "es_bad_epochs": 0, "mlflow_run_id": None, "best_confusion": None,
                              "stopped": ""}
        start_epoch = 1
        resumed = self._find_resume()
        if resumed is not None:
            model.load_state_dict(resumed.model_state)
            optimizer.load_state_dict(resumed.optimizer_state)
            schedule.load_state_dict(resumed.state["schedule"])
            if self._scaler is not None and resumed.state.get("grad_scaler"):
                self._scaler.load_state_dict(resumed.state["grad_scaler"])
            for k in st:
                st[k] = resumed.state.get(k, st[k])
            start_epoch = resumed.epoch + 1
            self._apply_freeze(model, epoch=start_epoch)
            if dist.is_main:
                self._repair_best(resumed)
            # RNG last: everything above must not consume random numbers after the restore.
            resumed.restore_rng()
            log.info("resuming", extra={"run_id": self.run_id, "from_epoch": resumed.epoch})

        train_model = self._wrap(model, device)

        tracker = self._open_tracker(st, data) if dist.is_main else None
        prom = _PromGauges(cfg.experiment, self.run_id) if dist.is_main else None
        if self.events is not None:
            self.events.state("RUNNING", message="resumed" if resumed else "started",
                              mlflow_run_id=st["mlflow_run_id"], epoch=start_epoch - 1, epochs=cfg.epochs,
                              world_size=dist.world_size)
        try:
            if tracker is not None and resumed is None:
                self._log_start(tracker, model, data, model_kwargs)
            # A restart of a run that already stopped early goes straight to the finish.
            message = st["stopped"]
            epoch = start_epoch - 1
            for epoch in range(start_epoch, cfg.epochs + 1 if not message else start_epoch):
                if self.stop_flag is not None and self.stop_flag():
                    raise Cancelled(f"run {self.run_id} stopped before epoch {epoch}")
                if self._apply_freeze(model, epoch):
                    train_model = self._wrap(model, device)
                lr = schedule.lr_at(epoch)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if self.events is not None:
                    self.events.epoch_start(epoch, cfg.epochs)
                t0 = time.perf_counter()
                train_loss, train_acc, n_train = self._train_epoch(train_model, loader, optimizer, criterion,
                                                                   epoch)
                t1 = time.perf_counter()
                val_loss, confusion = self._evaluate(model, data.val_x, data.val_y, normalize, num_classes, device)
                t2 = time.perf_counter()
                val_acc = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
                metrics = {
                    "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
                    "overfit_gap": train_acc - val_acc, "lr": lr, "epoch_time": t2 - t0,
                    "train_time": t1 - t0, "samples_per_second": n_train / max(t1 - t0, 1e-9),
                    **classification_metrics(confusion, classes),
                }
                schedule.observe(metrics)
                improved = st["best_metric"] is None or _improved(
                    _metric(metrics, cfg.checkpoint.keep_best_metric), st["best_metric"], cfg.checkpoint.mode, 0.0)
                if improved:
                    st["best_metric"] = _metric(metrics, cfg.checkpoint.keep_best_metric)
                    st["best_epoch"] = epoch
                    st["best_confusion"] = confusion.tolist()
                if self._early_stop(st, metrics):
                    st["stopped"] = f"early stopped at epoch {epoch}: {cfg.early_stopping.metric} did not " \
                                    f"improve for {cfg.early_stopping.patience} epochs"
                st["history"].append({k: v for k, v in metrics.items() if "/" not in k} | {"epoch": epoch})
                t3 = time.perf_counter()
                if dist.is_main:
                    self._end_epoch(epoch, model, optimizer, schedule, st, metrics, improved, tracker, prom)
                t4 = time.perf_counter()
                self.timings.append({"epoch": epoch, "train": t1 - t0, "eval": t2 - t1, "overhead": t4 - t2,
                                     "checkpoint_and_logging": t4 - t3})
                if st["stopped"]:
                    message = st["stopped"]
                    log.info(message, extra={"run_id": self.run_id})
                    break
            result = RunResult(self.run_id, st["mlflow_run_id"], "SUCCEEDED", epoch, st["history"],
                               st["best_metric"], st["best_epoch"], message=message, timings=self.timings)
            result.final_weights_sha256 = hashlib.sha256(ckpt.state_dict_bytes(model)).hexdigest()
            if dist.is_main:
                self._finish(result, model, model_kwargs, data, st, tracker)
        except BaseException:
            if tracker is not None:
                tracker.__exit__(*sys.exc_info())
            raise
        if tracker is not None:
            tracker.close()
        if dist.enabled:
            torch.distributed.barrier()
        if self.events is not None:
            self.events.state("SUCCEEDED", message=message, mlflow_run_id=st["mlflow_run_id"],
                              epoch=result.epochs_done, epochs=cfg.epochs, model_uri=_model_uri(result),
                              metrics=_flat(st["history"][-1]) if st["history"] else {})
        return result

    def _wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        # DDP registers only parameters that require grad when it is built, so it is rebuilt whenever
        # the unfreeze schedule changes what trains.
        if not self.dist.enabled:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ------------------------------------------------------------ epoch pieces

    def _train_epoch(self, model, loader, optimizer, criterion, epoch: int) -> tuple[float, float, int]:
        from tqdm import tqdm

        model.train()
        loader.set_epoch(epoch)
        device = next(model.parameters()).device
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        scaler = self._scaler
        clip = self.cfg.grad_clip
        show = self.dist.is_main and os.environ.get("TRAINYARD_PROGRESS", "1") != "0" and sys.stderr.isatty()
        bar = tqdm(total=len(loader), desc=f"epoch {epoch}", file=sys.stderr, disable=not show, leave=False)
        for x, y in loader:
            x = resize_batch(x, self._resize)
            n = x.shape[0]
            if self.amp:
                with torch.autocast("cuda", dtype=torch.float16):
                    out = model(x)
                    loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                out = model(x)
                loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
            # On-device accumulation: no host sync per step.
            loss_sum += loss.detach() * n
            hard = y if y.dim() == 1 else y.argmax(1)  # mixup/cutmix give soft targets
            correct += (out.detach().argmax(1) == hard).sum()
            seen += n
            bar.update(1)
        bar.close()
        totals = _all_reduce(torch.stack([loss_sum, correct.double(),
                                          torch.tensor(float(seen), device=device, dtype=torch.float64)]),
                             self.dist).tolist()
        if not math.isfinite(totals[0]):
            raise FailedPrecondition(f"training diverged at epoch {epoch}: loss is {totals[0]}")
        return totals[0] / max(totals[2], 1), totals[1] / max(totals[2], 1), int(totals[2])

    @torch.inference_mode()
    def _evaluate(self, model, x_u8: torch.Tensor, y: torch.Tensor, normalize: Normalizer, num_classes: int,
                  device: torch.device) -> tuple[float, torch.Tensor]:
        """Plain (unweighted, unsmoothed) CE loss and the confusion matrix; each rank takes a strided shard
        and the sums are all-reduced, so every sample counts exactly once."""
        model.eval()
        bs = self.cfg.eval_batch_size or max(self.cfg.batch_size, 256)
        idx = torch.arange(self.dist.rank, len(y), self.dist.world_size)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
        for i in range(0, len(idx), bs):
            sel = idx[i:i + bs]
            xb = normalize(x_u8[sel].to(device, non_blocking=True))
            yb = y[sel].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                out = model(xb)
            loss_sum += F.cross_entropy(out.float(), yb, reduction="sum")
            confusion += torch.bincount(yb * num_classes + out.argmax(1), minlength=num_classes * num_classes)
        _all_reduce(loss_sum, self.dist)
        _all_reduce(confusion, self.dist)
        confusion = confusion.view(num_classes, num_classes).cpu()
        return float(loss_sum) / max(len(y), 1), confusion

    def _early_stop(self, st: dict, metrics: dict[str, float]) -> bool:
        es = self.cfg.early_stopping
        if not es.enabled:
            return False
        value = _metric(metrics, es.metric)
        if st["es_best"] is None or _improved(value, st["es_best"], es.mode, es.min_delta):
            st["es_best"], st["es_bad_epochs"] = value, 0
            return False
        st["es_bad_epochs"] += 1
        return st["es_bad_epochs"] >= es.patience

    def _stages_at(self, epoch: int) -> int | None:
        """Backbone stages trainable at ``epoch`` (None: no freezing configured)."""
        if not self.cfg.freeze_backbone:
            return None
        stages = 0
        for step in sorted(self.cfg.unfreeze, key=lambda s: s.epoch):
            if step.epoch <= epoch:
                stages = step.stages
        return stages

    def _apply_freeze(self, model: torch.nn.Module, epoch: int) -> bool:
        """Set which backbone stages train at ``epoch``; True when that changed."""
        stages = self._stages_at(epoch)
        if stages is None or stages == getattr(self, "_stages", None):
            return False
        from shared.models import unfreeze_stages

        trainable = unfreeze_stages(model, stages)
        self._stages = stages
        log.info("backbone stages trainable", extra={"run_id": self.run_id, "epoch": epoch, "stages": stages,
                                                      "trainable_params": trainable})
        return True

    # ------------------------------------------------------------ checkpoint, logging

    def _find_resume(self) -> ckpt.Checkpoint | None:
        prefix = ckpt.latest_checkpoint(self.store, self.run_id) if self.dist.is_main else None
        if self.dist.enabled:
            # Rank 0 decides (a listing on each rank could race a prune); the others load the same epoch.
            # NCCL only moves CUDA tensors; gloo takes CPU ones.
            dev = f"cuda:{self.dist.local_rank}" if torch.distributed.get_backend() == "nccl" else "cpu"
            epoch = torch.tensor([int(prefix.rsplit("-", 1)[1]) if prefix else -1], device=dev)
            torch.distributed.broadcast(epoch, src=0)
            prefix = ckpt.epoch_prefix(self.run_id, int(epoch)) if int(epoch) >= 0 else None
        return ckpt.load_checkpoint(self.store, prefix) if prefix else None

    def _repair_best(self, resumed: ckpt.Checkpoint) -> None:
        """A crash between publishing epoch-N and best/ leaves best/ unpublished: rebuild it from epoch-N."""
        best_epoch = resumed.state.get("best_epoch")
        prefix = ckpt.best_prefix(self.run_id)
        current = self.store.read_manifest(prefix).meta.get("epoch") if self.store.is_published(prefix) else None
        if best_epoch == resumed.epoch and current != best_epoch:
            files = {name: self.store.get_verified(resumed.prefix, name)
                     for name in self.store.read_manifest(resumed.prefix).files}
            ckpt.publish_best(self.store, self.run_id, files, resumed.epoch)

    def _end_epoch(self, epoch, model, optimizer, schedule, st, metrics, improved, tracker, prom) -> None:
        cfg = self.cfg
        if cfg.checkpoint.every_epoch or improved or epoch == cfg.epochs:
            state = {**st, "schedule": schedule.state_dict(), "config_hash": config_hash(cfg),
                     "grad_scaler": self._scaler.state_dict() if self._scaler is not None else None}
            prefix = ckpt.save_checkpoint(self.store, self.run_id, epoch, model, optimizer, state,
                                          best=improved, keep=cfg.checkpoint.keep_last)
            self.events.emit("checkpoint", epoch=epoch, prefix=prefix, best=improved)
        flat = _flat(metrics)
        self.events.epoch(epoch, cfg.epochs, flat)
        if tracker is not None:
            tracker.log_metrics(flat, step=epoch)
        if prom is not None:
            prom.push(epoch, metrics)
        log.info("epoch done", extra={"run_id": self.run_id, "epoch": epoch, "train_loss": metrics["train_loss"],
                                      "val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"],
                                      "samples_per_second": round(metrics["samples_per_second"], 1)})

    def _open_tracker(self, st: dict, data: DataBundle):
        if not self.tracking:
            return None
        from shared.tracking import Tracker, find_run_by_tag

        cfg = self.cfg
        mlflow_run_id = st["mlflow_run_id"]
        if mlflow_run_id is None:
            # Killed before its first checkpoint: the MLflow run may exist already; continue it.
            mlflow_run_id = find_run_by_tag(cfg.experiment, "trainyard_run_id", self.run_id,
                                            tracking_uri=self.tracking_uri)
        tags = {"trainyard_run_id": self.run_id, "model": cfg.model.name, **cfg.tags}
        tracker = Tracker(experiment=cfg.experiment, run_name=cfg.run_name or self.run_id,
                          tracking_uri=self.tracking_uri, tags=tags, run_id=mlflow_run_id,
                          config_hash=config_hash(cfg), dataset_version=data.version)
        tracker.start()
        st["mlflow_run_id"] = tracker.run_id
        return tracker

    def _log_start(self, tracker, model: torch.nn.Module, data: DataBundle, model_kwargs: dict) -> None:
        from shared.models import model_summary

        cfg = self.cfg
        params = cfg.model_dump(mode="json")
        params["data"]["train_samples"] = len(data.train_y)
        params["data"]["val_samples"] = len(data.val_y)
        params["world_size"] = self.dist.world_size
        tracker.log_params(params)
        tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        summary = model_summary(model, input_size=tuple(data.input_size))
        tracker.log_text(summary.to_text(), "model_summary.txt")
        tracker.set_tags({"num_params": sum(p.numel() for p in model.parameters())})

    def _finish(self, result: RunResult, model, model_kwargs: dict, data: DataBundle, st: dict, tracker) -> None:
        """Log the curves, confusion matrix and best model; publish + register the export."""
        cfg = self.cfg
        best_prefix = ckpt.best_prefix(self.run_id)
        best_bytes = self.store.get_verified(best_prefix, "model.safetensors") \
            if self.store.is_published(best_prefix) else ckpt.state_dict_bytes(model)
        best_row = next((h for h in st["history"] if h["epoch"] == st["best_epoch"]), st["history"][-1])
        card_metrics = {k: v for k, v in best_row.items() if k in (
            "val_acc", "val_loss", "train_acc", "train_loss", "overfit_gap", "val_f1", "val_precision",
            "val_recall", "epoch")}
        from services.train.export import make_card, publish_model

        name = cfg.export.name or cfg.experiment
        card = make_card(name=name, version=0, architecture=cfg.model.name, model_kwargs=model_kwargs,
                         classes=data.classes, input_size=data.input_size, mean=data.mean, std=data.std,
                         metrics=card_metrics, run_id=self.run_id)
        if tracker is not None:
            with tempfile.TemporaryDirectory() as tmp:
                tracker.log_figure(plot_curves(st["history"]), "curves.png")
                if st["best_confusion"] is not None:
                    tracker.log_figure(plot_confusion(np.asarray(st["best_confusion"]), data.classes),
                                       "confusion_matrix.png")
                tracker.log_dict({"history": st["history"], "best_epoch": st["best_epoch"],
                                  "best_metric": st["best_metric"]}, "history.json")
                model_dir = Path(tmp) / "model"
                model_dir.mkdir()
                (model_dir / "model.safetensors").write_bytes(best_bytes)
                (model_dir / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
                tracker.log_artifact(model_dir, "model")
        if not self.do_export:
            return
        # A restart after the export (killed while registering, or a finished run resubmitted) must not
        # publish a second version: the marker records the first one.
        marker = f"runs/{self.run_id}/export.json"
        if self.store.exists(marker):
            done = json.loads(self.store.get_bytes(marker))
            result.model_name, result.model_version = done["name"], done["version"]
            return
        version, prefix = publish_model(self.store, name, best_bytes, {**card, "mlflow_run_id": st["mlflow_run_id"]})
        self.store.put_bytes(marker, json.dumps({"name": name, "version": version, "uri": prefix}).encode())
        result.model_name, result.model_version = name, version
        self.events.emit("model", name=name, version=version, uri=prefix)
        if tracker is not None:
            from shared.tracking import register_model

            mlflow_version = register_model(tracker.tracking_uri, name, tracker.run_id, "model",
                                            tags={"store_uri": prefix, "trainyard_version": version})
            tracker.set_tags({"model_uri": prefix, "registered_model_version": mlflow_version})


# ================================================================ helpers

# Float copies of the training set up to this size are kept in memory when there is no augmentation.
_PRENORMALIZE_MAX_BYTES = 2 << 30


class _PreNormalized:
    """Without augmentation, the training set normalised to float once, as a bare loop would hold it.

    A batch is then one index_select instead of gather + convert + normalise (four passes over the batch,
    each a parallel region); the sample order is the loader's own (its shuffle and rank sharding).
    """

    def __init__(self, loader, data: DataBundle, device: torch.device):
        self.loader = loader
        normalize = Normalizer(data.mean, data.std, device)
        self.x = torch.empty(data.train_x.shape, dtype=torch.float32, device=device)
        for i in range(0, len(data.train_x), 4096):
            self.x[i:i + 4096] = normalize(data.train_x[i:i + 4096].to(device))
        self.y = data.train_y.to(device)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        order = self.loader.indices().to(self.x.device)
        bs = self.loader.batch_size
        for b in range(len(self.loader)):
            idx = order[b * bs:(b + 1) * bs]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


def _flat(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _model_uri(result: RunResult) -> str:
    return f"models/{result.model_name}/{result.model_version}" if result.model_version else ""


class _PromGauges:
    """Per-run gauges in a job registry, pushed to the Pushgateway (a no-op when none is configured)."""

    def __init__(self, experiment: str, run_id: str):
        from prometheus_client import Gauge

        from shared.metrics import job_registry

        self.registry = job_registry()
        self.grouping = {"experiment": experiment, "run_id": run_id}
        self.g = {name: Gauge(f"trainyard_train_{name}", help_, registry=self.registry) for name, help_ in [
            ("epoch", "last finished epoch"), ("train_loss", "training loss of the last epoch"),
            ("val_loss", "validation loss of the last epoch"), ("val_acc", "validation accuracy"),
            ("samples_per_second", "training throughput of the last epoch")]}

    def push(self, epoch: int, metrics: dict[str, float]) -> None:
        from shared.metrics import push_metrics

        self.g["epoch"].set(epoch)
        for k in ("train_loss", "val_loss", "val_acc", "samples_per_second"):
            self.g[k].set(metrics[k])
        push_metrics("trainyard_train", self.registry, self.grouping)


def plot_curves(history: list[dict[str, float]]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax2.plot(epochs, [h["val_acc"] for h in history], label="val")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    fig.tight_layout()
    return fig


def plot_confusion(cm: np.ndarray, classes: list[str]):
    from matplotlib.figure import Figure

    n = len(classes)
    fig = Figure(figsize=(max(4, 0.5 * n + 2), max(4, 0.5 * n + 2)))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        peak = cm.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                        color="white" if cm[i, j] > peak / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig
