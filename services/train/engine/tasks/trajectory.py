"""Multi-camera trajectory videos: 4-way classification and future-position regression, streamed from shards.

The data never sits in memory: every split is streamed from the published shards (``TrajectoryShards``:
each shard verified against the manifest before its samples are used) through a DataLoader that also
subsamples the clips to what the model reads (``shared.models.video.subsample_clips``), so memory is
bounded by the shuffle buffers whatever the dataset's size. ``data.workers`` >= 1 reads in that many
worker processes (many-core GPU nodes); 0 reads in a background thread of the training process, which on
a small CPU machine is faster: no per-batch shared-memory hand-off (``shared.parallel.prefetch``).

Splits are whole shards assigned by the *dataset's* seed (``three_way_split``): every run and every study
trial on one dataset trains, validates and tests on the same clips. The regression target is standardised
with the training split's statistics (read from the shards' labels alone), which the model receives as
kwargs and the model card therefore records; the model maps its output back to world units.

Regression figures sit beside two baselines computed on the same samples from the positions the labels hold
at every rendered frame: the last observed position, and constant-velocity extrapolation from the last two.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from services.train.engine.distributed import all_reduce
from services.train.engine.tasks.base import ClassScores, Evaluation, Task, TrainBatches
from shared.data.trajectories import TrajectoryShards, locate, read_index, read_labels, three_way_split
from shared.errors import FailedPrecondition, InvalidArgument
from shared.evaluation import (
    regression_metrics,
)
from shared.models.video import TRAJ_PIXEL_MEAN, TRAJ_PIXEL_STD, normalize_clips, subsample_clips
from shared.parallel import prefetch
from shared.plots import plot_confusion, plot_regression_errors, plot_reliability

# The predictors the regression is compared with, by metric suffix.
BASELINES = {"_last_position": "last observed position", "_const_velocity": "constant velocity"}


def _prepare_sample(item: dict, frame_stride: int, pixel_stride: int) -> dict:
    """In the worker: the clip as the model reads it (uint8, 1/8 of the bytes), the targets as they are."""
    item["clip"] = subsample_clips(item.pop("video"), frame_stride, pixel_stride)
    return item


def _round_robin(iterators: list) -> Iterator:
    """One item from each iterator in turn (a fixed order, so the stream is reproducible), until all end."""
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


def _read(dataset: TrajectoryShards, loader_kwargs: dict[str, Any], batch_size: int, threads: int,
          prepare: Callable[[dict], dict]) -> Iterator[dict]:
    """Prepared batches of ``dataset``: from DataLoader worker processes, or (no workers) from ``threads``
    background threads, each reading its own shards (zstd, sha256 and tensor copies release the GIL)."""
    if loader_kwargs["num_workers"]:
        return prefetch(map(prepare, DataLoader(dataset, batch_size=batch_size, **loader_kwargs)), depth=2)
    return _round_robin([prefetch(map(prepare, DataLoader(part, batch_size=batch_size, num_workers=0)), depth=2)
                         for part in dataset.split(threads)])


def _batches_of(dataset: TrajectoryShards, parts: int, batch_size: int) -> int:
    return sum(math.ceil(len(p) / batch_size) for p in dataset.split(parts))


class _Batches:
    """The training split, reshuffled per epoch, assembled ahead of the trainer in a background thread.

    Epoch 1 streams the shards (shuffled shard order and buffer). When the split, as the model reads it, fits
    ``cache_bytes``, the batches it streamed are kept (sorted by sample index) and later epochs draw shuffled
    mini-batches from memory: streaming costs a fifth of a core at CPU training speed (decompression), which
    on a 2-core machine is taken from the trainer. A cached epoch's order depends only on the seed and the
    epoch, and a run resumed past epoch 1 refills the cache first, so resuming changes nothing.
    ``prepare`` (normalising the clips on a CPU run: a third of a small model's step) runs in the thread too.
    """

    def __init__(self, dataset: TrajectoryShards, loader_kwargs: dict[str, Any], batch_size: int, threads: int,
                 sample_bytes: int, cache_bytes: int, seed: int, prepare: Callable[[dict], dict]):
        self.dataset, self.loader_kwargs, self.batch_size = dataset, loader_kwargs, batch_size
        self.threads = 1 if loader_kwargs["num_workers"] else threads
        self.cacheable = len(dataset) * sample_bytes <= cache_bytes
        self.seed, self.epoch, self.prepare = seed, 1, prepare
        self.cache: dict[str, torch.Tensor] | None = None

    def set_epoch(self, epoch: int) -> None:
        # Workers are started per epoch (not persistent), so each gets the dataset with this epoch.
        self.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        if self.cacheable and self.epoch > 1:
            return math.ceil(len(self.dataset) / self.batch_size)
        return _batches_of(self.dataset, self.threads, self.batch_size)  # each reader ends on a partial batch

    def _keep(self, batches: list[dict]) -> None:
        joined = {k: torch.cat([b[k] for b in batches]) for k in batches[0] if k != "x"}
        order = joined["index"].argsort()
        self.cache = {k: v[order] for k, v in joined.items()}

    def _cached(self):
        n = len(self.cache["index"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield {k: v[idx] for k, v in self.cache.items()}

    def __iter__(self):
        def stream(prepare):
            return _read(self.dataset, self.loader_kwargs, self.batch_size, self.threads, prepare)

        if self.cacheable and self.cache is None and self.epoch > 1:
            self._keep(list(stream(lambda batch: batch)))  # resumed past epoch 1
        keep = self.cacheable and self.cache is None
        streamed = []
        batches = prefetch(map(self.prepare, self._cached()), depth=2) if self.cache is not None \
            else stream(self.prepare)
        for batch in batches:
            if keep:
                streamed.append(batch)
            yield batch
        if keep:
            self._keep(streamed)  # only after a complete pass


class TrajectoryTask(Task):
    """Per epoch: the running objective, accuracy and RMSE from the training steps (train mode, with the
    model's auxiliary losses); ``train_*`` measured like validation (eval mode) on the first
    ``data.train_eval_size`` training samples; ``val_*`` on the validation shards."""

    card_metrics = ("val_acc", "val_loss", "val_ce", "val_rmse", "val_mae", "val_f1", "val_ece", "train_acc",
                    "train_loss", "train_rmse", "overfit_gap", "epoch")

    def load(self) -> None:
        cfg = self.cfg
        if cfg.data.subset is not None:
            raise InvalidArgument("data.subset does not apply to trajectory shards: render the dataset at the size "
                                  "to train on (splits are whole shards)")
        store, self.prefix = locate(cfg.data.path)
        self.store_url = store.url
        self.index = read_index(store, self.prefix)
        self.classes = list(self.index["classes"])
        seed = self.index.get("seed")
        if seed is None:
            raise FailedPrecondition(f"{cfg.data.path}: the dataset records no seed to split it by")
        self.splits = three_way_split(self.index, cfg.data.val_fraction, cfg.data.test_fraction, int(seed))
        by_id = {s["index"]: s for s in self.index["shards"]}
        self.counts = {name: sum(by_id[i]["samples"] for i in ids) for name, ids in self.splits.items()}
        # The regression target's statistics, from the training split's labels only.
        targets = np.concatenate([read_labels(store, self.prefix, by_id[i])["future_position"]
                                  for i in self.splits["train"]]).astype(np.float64)
        self.target_mean = [round(float(v), 6) for v in targets.mean(0)]
        self.target_std = [round(float(v), 6) for v in np.maximum(targets.std(0), 1e-6)]
        if self.index.get("future_offset") is None:
            raise FailedPrecondition(f"{cfg.data.path}: the dataset records no future_offset")
        self.horizon = int(self.index["future_offset"])
        digest = hashlib.sha256(json.dumps({
            "shards": [(s["index"], s["videos_sha256"], s["labels_sha256"]) for s in self.index["shards"]],
            "splits": self.splits}, sort_keys=True).encode())
        self._version = digest.hexdigest()[:16]
        dev = self.runtime.device
        self._mean_t = torch.tensor(self.target_mean, device=dev)
        self._std_t = torch.tensor(self.target_std, device=dev)

    @property
    def data_version(self) -> str:
        return self._version

    def data_params(self) -> dict[str, Any]:
        return {"train_samples": self.counts["train"], "val_samples": self.counts["val"],
                "test_samples": self.counts["test"], "val_source": self.val_source,
                "train_eval_samples": min(self.cfg.data.train_eval_size, self.counts["train"]),
                "split_shards": json.dumps(self.splits), "target_mean": json.dumps(self.target_mean),
                "target_std": json.dumps(self.target_std)}

    @property
    def input_size(self) -> list[int]:
        return list(self.model.input_shape)

    def model_kwargs(self) -> dict[str, Any]:
        cameras, frames, chans, height, width = self.index["sample_shape"]
        if height != width:
            raise FailedPrecondition(f"trajectory models take square frames, the dataset has {height}x{width}")
        return {"num_classes": len(self.classes), "cameras": cameras, "frames": frames, "in_chans": chans,
                "image_size": height, "target_mean": self.target_mean, "target_std": self.target_std}

    # ------------------------------------------------------------------ data

    def _dataset(self, split: str, *, shuffle: bool = False, shard: bool = True) -> TrajectoryShards:
        rt = self.runtime
        transform = functools.partial(_prepare_sample, frame_stride=self.model.frame_stride,
                                      pixel_stride=self.model.pixel_stride)
        return TrajectoryShards(self.store_url, self.prefix, shards=self.splits[split], shuffle=shuffle,
                                shuffle_buffer=self.cfg.data.shuffle_buffer, seed=self.cfg.seed,
                                rank=rt.dist.rank if shard else 0, world_size=rt.dist.world_size if shard else 1,
                                transform=transform)

    def _loader_kwargs(self, dataset: TrajectoryShards) -> dict[str, Any]:
        # No more workers than this rank has shards: an idle worker would only cost a process. With none, the
        # reading happens in the prefetch thread (no per-batch shared-memory hand-off: best on a few cores).
        workers = min(self.cfg.data.workers, max(1, len(dataset.shards) // dataset.world_size))
        if workers == 0:
            return {"num_workers": 0}
        return {"num_workers": workers, "pin_memory": self.runtime.device.type == "cuda", "prefetch_factor": 2,
                "persistent_workers": False}

    def train_batches(self) -> TrainBatches:
        dataset = self._dataset("train", shuffle=True)
        sample_bytes = math.prod(self.model.input_shape) + 4 * (1 + 3 + 3 * self.index["sample_shape"][1])
        return _Batches(dataset, self._loader_kwargs(dataset), self.cfg.batch_size, self.cfg.data.reader_threads,
                        sample_bytes,
                        self.cfg.data.cache_mb * 2**20, self.cfg.seed, self._prepare)

    def _prepare(self, batch: dict) -> dict:
        """On a CPU run, the normalised clips ``x``, made ahead of the step (see _Batches); on a GPU the
        device normalises them in ``_inputs``, faster than any CPU thread."""
        if self.runtime.device.type == "cpu":
            batch["x"] = normalize_clips(batch["clip"], TRAJ_PIXEL_MEAN, TRAJ_PIXEL_STD)
        return batch

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = self.runtime.device
        x = batch["x"] if "x" in batch else \
            normalize_clips(batch["clip"].to(dev, non_blocking=True), TRAJ_PIXEL_MEAN, TRAJ_PIXEL_STD)
        return x, batch["label"].to(dev, non_blocking=True), batch["future_position"].to(dev, non_blocking=True)

    def _standardised(self, position: torch.Tensor) -> torch.Tensor:
        return (position - self._mean_t) / self._std_t

    # ------------------------------------------------------------------ training

    def step(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y, target = self._inputs(batch)
        out = model(x)
        logits, position = out["logits"].float(), out["future_position"].float()
        w = self.cfg.loss
        ce = F.cross_entropy(logits, y, label_smoothing=w.label_smoothing)
        mse = F.mse_loss(self._standardised(position), self._standardised(target))
        loss = w.classification_weight * ce + w.regression_weight * mse + out["aux_loss"]
        n = x.shape[0]
        return loss, {"loss_sum": loss.detach() * n, "correct": (logits.detach().argmax(1) == y).sum(),
                      "sq_err_sum": (position.detach() - target).pow(2).sum(), "seen": n}

    def epoch_metrics(self, sums: dict[str, float], train: Evaluation, val: Evaluation) -> dict[str, float]:
        seen = max(sums["seen"], 1)
        return {"train_objective": sums["loss_sum"] / seen, "train_running_acc": sums["correct"] / seen,
                "train_running_rmse": math.sqrt(sums["sq_err_sum"] / seen), **train.metrics, **val.metrics,
                "overfit_gap": train.metrics["train_acc"] - val.metrics["val_acc"]}

    # ------------------------------------------------------------------ evaluation

    has_test = True  # three_way_split always gives the test split a shard
    val_source = "holdout shards (dataset seed)"

    @torch.inference_mode()
    def measure(self, model: torch.nn.Module, split: str, *, temperature: float = 1.0, keep_logits: bool = False,
                shard: bool = True) -> Evaluation:
        """Loss (the weighted objective without auxiliary terms), CE, accuracy, ECE, per-class metrics, RMSE/MAE
        overall and per axis, and the baselines' on the same samples. "train" reads the first
        ``train_eval_size`` training samples in shard order (the same ones every epoch)."""
        rt = self.runtime
        dataset = self._dataset(split, shard=shard)
        limit = self.cfg.data.train_eval_size if split == "train" else None
        if limit is not None:
            limit = math.ceil(limit / (rt.dist.world_size if shard else 1))
        dev = rt.device
        mse_sum = torch.zeros((), device=dev, dtype=torch.float64)
        errors = {name: torch.zeros(2, 3, device=dev, dtype=torch.float64)  # rows: squared, absolute
                  for name in ("", *BASELINES)}
        scores = ClassScores(self.classes, dev, temperature=temperature, keep_logits=keep_logits)
        model.eval()
        seen = 0
        batches = _read(dataset, self._loader_kwargs(dataset), self.cfg.eval_batch_size or self.cfg.batch_size,
                        self.cfg.data.reader_threads, self._prepare)
        for batch in batches:
            if limit is not None and seen >= limit:
                break
            x, y, target = self._inputs(batch)
            with rt.autocast():
                out = model(x)
            logits, position = out["logits"].float(), out["future_position"].float()
            scores.add(logits, y)
            mse_sum += F.mse_loss(self._standardised(position), self._standardised(target), reduction="sum") / 3
            positions = batch["positions"].to(dev).double()
            last = positions[:, -1]
            predictions = {"": position.double(), "_last_position": last,
                           "_const_velocity": last + self.horizon * (last - positions[:, -2])}
            for name, pred in predictions.items():
                diff = pred - target.double()
                errors[name] += torch.stack([diff.pow(2).sum(0), diff.abs().sum(0)])
            seen += len(y)
        if shard:
            scores.reduce(rt.dist)
            for t in (mse_sum, *errors.values()):
                all_reduce(t, rt.dist)
        n = int(scores.count)
        if n == 0:
            raise FailedPrecondition(f"the {split} split of {self.cfg.data.path} has no samples")
        result = scores.result(split, per_class=split != "train")
        m = result.metrics
        ce, mse = m.pop(f"{split}_loss"), float(mse_sum) / n
        w = self.cfg.loss
        m.update({f"{split}_loss": w.classification_weight * ce + w.regression_weight * mse, f"{split}_ce": ce,
                  f"{split}_mse_standardised": mse})
        for name, err in errors.items():
            if name == "" or split != "train":
                m.update(regression_metrics(err[0], err[1], n, split, name))
        return result

    def card_fields(self) -> dict[str, Any]:
        return {"task": "trajectory", "classes": self.classes, "input_size": list(self.model.input_shape),
                "clip_size": list(self.model.clip_shape),
                "normalization": {"mean": list(TRAJ_PIXEL_MEAN), "std": list(TRAJ_PIXEL_STD)}}

    def figures(self, history: list[dict[str, float]], best: dict[str, Any], final: Evaluation | None = None
                ) -> dict[str, Any]:
        figures = super().figures(history, best)
        if best.get("confusion") is not None:
            figures["confusion_matrix.png"] = plot_confusion(np.asarray(best["confusion"]), self.classes)
            figures["reliability_val.png"] = plot_reliability(np.asarray(best["calibration"]), "validation")
        if final is not None and final.artifacts.get("test"):
            figures["confusion_matrix_test.png"] = plot_confusion(np.asarray(final.artifacts["test"]["confusion"]),
                                                                  self.classes)
            m = final.metrics
            rows = {label: {"all": m.get(f"test_rmse{suffix}"),
                            **{a: m.get(f"test_rmse_{a}{suffix}") for a in "xyz"}}
                    for suffix, label in (("", "model"), *BASELINES.items())}
            figures["regression_test.png"] = plot_regression_errors(rows, "Future position RMSE on the test split")
        return figures
