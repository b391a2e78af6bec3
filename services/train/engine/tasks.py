"""What a run learns and how it is measured.

The ``Engine`` owns the loop: optimiser, schedule, checkpoints, resume, selection, early stopping, logging.
A ``Task`` owns everything that depends on what is learnt: the data and its batches, the loss of a batch,
the metrics of an evaluation, what the model card records and which figures explain the run. A new kind of
model (multi-task video heads, sequence decoders) is a new Task; the loop does not change.

Conventions the Engine relies on:
- ``step`` returns the loss to back-propagate and per-batch sums kept on the device (no host sync in the
  hot loop), among them ``loss_sum`` (loss x samples) and ``seen`` (samples); the Engine adds them up over
  the epoch, sums them over the ranks and hands the totals to ``epoch_metrics``;
- metric names are prefixed by their split (``train_``, ``val_``); per-class ones carry a ``/``;
- ``evaluate`` gives the same numbers on every rank (each takes a shard, the sums are all-reduced).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from services.train.config import TrainConfig
from services.train.engine.data import DataBundle, load_data, make_train_loader
from services.train.engine.distributed import DistInfo, all_reduce
from services.train.engine.losses import Criterion, class_weights
from shared.evaluation import classification_metrics
from shared.plots import plot_confusion, plot_curves
from shared.preprocess import Preprocessor


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    dist: DistInfo
    amp: bool
    cache_root: Path

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    # Kept (JSON-able) for the best epoch, for the figures at the end of the run.
    artifacts: dict[str, Any] = field(default_factory=dict)


class TrainBatches(Protocol):
    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self): ...


class Task(abc.ABC):
    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime

    @abc.abstractmethod
    def load(self) -> None:
        """Read the data; called once, before the model is built."""

    @property
    @abc.abstractmethod
    def data_version(self) -> str:
        """A digest of exactly the data this run trains and validates on."""

    @abc.abstractmethod
    def data_params(self) -> dict[str, Any]:
        """Facts about the data logged with the run's params (sample counts)."""

    @property
    @abc.abstractmethod
    def input_size(self) -> list[int]:
        """One sample's input shape, for the model summary and the model card."""

    @abc.abstractmethod
    def model_kwargs(self) -> dict[str, Any]:
        """The ``create_model`` arguments the data decides (class count, input channels)."""

    @abc.abstractmethod
    def train_batches(self) -> TrainBatches:
        """This rank's training batches, reshuffled by ``set_epoch``."""

    @abc.abstractmethod
    def step(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward one batch: (loss to back-propagate, per-batch sums kept on the device)."""

    @abc.abstractmethod
    def epoch_metrics(self, sums: dict[str, float], val: Evaluation) -> dict[str, float]:
        """The epoch's training figures from the summed ``step`` outputs, next to validation's."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        """Metrics of ``model`` on ``split``, prefixed by the split's name."""

    @abc.abstractmethod
    def card_fields(self) -> dict[str, Any]:
        """What the model card needs beyond the architecture: classes, input size, normalisation."""

    card_metrics: tuple[str, ...] = ()  # the best epoch's metrics the model card carries

    def figures(self, history: list[dict[str, float]], best: dict[str, Any]) -> dict[str, Any]:
        """Figures (artifact name -> matplotlib figure) explaining the run, logged at its end."""
        return {"curves.png": plot_curves(history)}


class ClassificationTask(Task):
    """Image classification from an in-memory dataset (MNIST IDX, CIFAR batches, image folders, synthetic)."""

    card_metrics = ("val_acc", "val_loss", "train_acc", "train_loss", "overfit_gap", "val_f1", "val_precision",
                    "val_recall", "epoch")

    def load(self) -> None:
        rt = self.runtime
        self.data: DataBundle = load_data(self.cfg.data, self.cfg.seed, rt.cache_root)
        self.classes = self.data.classes
        self.preprocess = Preprocessor(self.data.input_size, self.data.mean, self.data.std, rt.device)
        self.criterion = Criterion(self.cfg.loss.name, len(self.classes),
                                   class_weights(self.cfg, self.data.train_y, len(self.classes)),
                                   self.cfg.loss.label_smoothing, self.cfg.loss.focal_gamma).to(rt.device)

    @property
    def data_version(self) -> str:
        return self.data.version

    def data_params(self) -> dict[str, Any]:
        return {"train_samples": len(self.data.train_y), "val_samples": len(self.data.val_y)}

    @property
    def input_size(self) -> list[int]:
        return self.data.input_size

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "in_chans": self.data.input_size[0]}

    def train_batches(self) -> TrainBatches:
        return make_train_loader(self.cfg, self.data, self.runtime.dist, self.runtime.device)

    def step(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        x = self.preprocess.resize(x)  # upsampling on the device (small images for a large-input model)
        out = model(x)
        loss = self.criterion(out, y)
        hard = y if y.dim() == 1 else y.argmax(1)  # mixup/cutmix give soft targets
        return loss, {"loss_sum": loss.detach() * x.shape[0], "correct": (out.detach().argmax(1) == hard).sum(),
                      "seen": x.shape[0]}

    def epoch_metrics(self, sums: dict[str, float], val: Evaluation) -> dict[str, float]:
        seen = max(sums["seen"], 1)
        train_acc = sums["correct"] / seen
        return {"train_loss": sums["loss_sum"] / seen, "train_acc": train_acc, **val.metrics,
                "overfit_gap": train_acc - val.metrics["val_acc"]}

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "val":
            return self.data.val_x, self.data.val_y
        raise ValueError(f"no {split!r} split")

    @torch.inference_mode()
    def evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        """Plain (unweighted, unsmoothed) CE loss, accuracy and the per-class metrics of the confusion matrix."""
        rt = self.runtime
        x_u8, y = self._split(split)
        n_cls = len(self.classes)
        model.eval()
        bs = self.cfg.eval_batch_size or max(self.cfg.batch_size, 256)
        idx = torch.arange(rt.dist.rank, len(y), rt.dist.world_size)
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
        confusion = torch.zeros(n_cls * n_cls, device=rt.device, dtype=torch.int64)
        for i in range(0, len(idx), bs):
            sel = idx[i:i + bs]
            xb = self.preprocess(x_u8[sel].to(rt.device, non_blocking=True))
            yb = y[sel].to(rt.device, non_blocking=True)
            with rt.autocast():
                out = model(xb)
            loss_sum += F.cross_entropy(out.float(), yb, reduction="sum")
            confusion += torch.bincount(yb * n_cls + out.argmax(1), minlength=n_cls * n_cls)
        all_reduce(loss_sum, rt.dist)
        all_reduce(confusion, rt.dist)
        confusion = confusion.view(n_cls, n_cls).cpu()
        metrics = {f"{split}_loss": float(loss_sum) / max(len(y), 1),
                   f"{split}_acc": float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
                   **classification_metrics(confusion, self.classes, prefix=split)}
        return Evaluation(metrics, {"confusion": confusion.tolist()})

    def card_fields(self) -> dict[str, Any]:
        return {"classes": self.classes, "input_size": self.data.input_size,
                "normalization": {"mean": self.data.mean, "std": self.data.std}}

    def figures(self, history: list[dict[str, float]], best: dict[str, Any]) -> dict[str, Any]:
        figures = super().figures(history, best)
        if best.get("confusion") is not None:
            figures["confusion_matrix.png"] = plot_confusion(np.asarray(best["confusion"]), self.classes)
        return figures


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask}


def build_task(cfg: TrainConfig, runtime: Runtime) -> Task:
    return TASKS[cfg.task](cfg, runtime)
