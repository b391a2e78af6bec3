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
from shared.evaluation import (
    ECE_BINS,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
)
from shared.plots import plot_confusion, plot_curves, plot_reliability
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
    def epoch_metrics(self, sums: dict[str, float], train: Evaluation, val: Evaluation) -> dict[str, float]:
        """The epoch's figures: the running ones from the summed ``step`` outputs, next to the evaluations of
        the training sample and of validation."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        """Metrics of ``model`` on ``split`` ("val", or "train": a fixed sample of the training data measured
        like validation), prefixed by the split's name."""

    @abc.abstractmethod
    def final_evaluation(self, model: torch.nn.Module) -> Evaluation:
        """Once, after training, on the selected weights: the test split's metrics (``test_*``) and whatever
        is fitted on validation (a calibration temperature); ``artifacts`` hold figures and card fields."""

    @abc.abstractmethod
    def card_fields(self) -> dict[str, Any]:
        """What the model card needs beyond the architecture: classes, input size, normalisation."""

    card_metrics: tuple[str, ...] = ()  # the best epoch's metrics the model card carries

    def figures(self, history: list[dict[str, float]], best: dict[str, Any], final: Evaluation | None = None
                ) -> dict[str, Any]:
        """Figures (artifact name -> matplotlib figure) explaining the run, logged at its end: ``best`` holds
        the artifacts of the selected epoch's validation, ``final`` the final evaluation."""
        return {"curves.png": plot_curves(history)}


class ClassificationTask(Task):
    """Image classification from an in-memory dataset (MNIST IDX, CIFAR batches, image folders, synthetic).

    Per epoch: the running training objective and accuracy come from the training steps themselves
    (``train_objective``, ``train_running_acc``: augmented batches, train mode); ``train_loss`` and
    ``train_acc`` are measured exactly like validation's (eval mode, no augmentation, plain cross-entropy) on a
    fixed sample of the training data, so ``overfit_gap = train_acc - val_acc`` compares like with like.
    """

    card_metrics = ("val_acc", "val_loss", "val_f1", "val_precision", "val_recall", "val_ece", "train_acc",
                    "train_loss", "overfit_gap", "epoch")

    def load(self) -> None:
        rt = self.runtime
        self.data: DataBundle = load_data(self.cfg.data, self.cfg.seed, rt.cache_root)
        self.classes = self.data.classes
        self.preprocess = Preprocessor(self.data.input_size, self.data.mean, self.data.std, rt.device)
        self.criterion = Criterion(self.cfg.loss.name, len(self.classes),
                                   class_weights(self.cfg, self.data.train_y, len(self.classes)),
                                   self.cfg.loss.label_smoothing, self.cfg.loss.focal_gamma).to(rt.device)
        self.memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    @property
    def data_version(self) -> str:
        return self.data.version

    def data_params(self) -> dict[str, Any]:
        d = self.data
        return {"train_samples": len(d.train_y), "val_samples": len(d.val_y),
                "test_samples": len(d.test_y) if d.test_y is not None else 0, "val_source": d.val_source,
                "train_eval_samples": len(d.split("train")[1])}

    @property
    def input_size(self) -> list[int]:
        return self.data.input_size

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": len(self.classes), "in_chans": self.data.input_size[0]}

    def train_batches(self) -> TrainBatches:
        return make_train_loader(self.cfg, self.data, self.runtime.dist, self.runtime.device)

    def step(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch
        # Upsampling on the device (small images for a large-input model), then the configured layout.
        x = self.preprocess.resize(x).contiguous(memory_format=self.memory_format)
        out = model(x)
        loss = self.criterion(out, y)
        hard = y if y.dim() == 1 else y.argmax(1)  # mixup/cutmix give soft targets
        return loss, {"loss_sum": loss.detach() * x.shape[0], "correct": (out.detach().argmax(1) == hard).sum(),
                      "seen": x.shape[0]}

    def epoch_metrics(self, sums: dict[str, float], train: Evaluation, val: Evaluation) -> dict[str, float]:
        seen = max(sums["seen"], 1)
        return {"train_objective": sums["loss_sum"] / seen, "train_running_acc": sums["correct"] / seen,
                **train.metrics, **val.metrics, "overfit_gap": train.metrics["train_acc"] - val.metrics["val_acc"]}

    def evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        return self._evaluate(model, split, per_class=split != "train")

    @torch.inference_mode()
    def _evaluate(self, model: torch.nn.Module, split: str, *, temperature: float = 1.0, per_class: bool = True,
                  keep_logits: bool = False, shard: bool = True) -> Evaluation:
        """Plain (unweighted, unsmoothed) CE loss, accuracy, ECE and the per-class metrics of the confusion
        matrix; each rank takes a strided shard and the sums are all-reduced, so every sample counts once."""
        rt = self.runtime
        x_u8, y = self.data.split(split)
        n_cls = len(self.classes)
        model.eval()
        bs = self.cfg.eval_batch_size or max(self.cfg.batch_size, 256)
        idx = torch.arange(rt.dist.rank, len(y), rt.dist.world_size) if shard else torch.arange(len(y))
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
        confusion = torch.zeros(n_cls * n_cls, device=rt.device, dtype=torch.int64)
        bins = torch.zeros(3, ECE_BINS, device=rt.device, dtype=torch.float64)
        scaled_bins = torch.zeros_like(bins)
        logits = []
        for i in range(0, len(idx), bs):
            sel = idx[i:i + bs]
            xb = self.preprocess(x_u8[sel].to(rt.device, non_blocking=True))
            xb = xb.contiguous(memory_format=self.memory_format)
            yb = y[sel].to(rt.device, non_blocking=True)
            with rt.autocast():
                out = model(xb).float()
            loss_sum += F.cross_entropy(out, yb, reduction="sum")
            confusion += torch.bincount(yb * n_cls + out.argmax(1), minlength=n_cls * n_cls)
            bins += calibration_bins(out.softmax(1), yb)
            if temperature != 1.0:
                scaled_bins += calibration_bins((out / temperature).softmax(1), yb)
            if keep_logits:
                logits.append(out.cpu())
        if shard:
            for t in (loss_sum, confusion, bins, scaled_bins):
                all_reduce(t, rt.dist)
        confusion = confusion.view(n_cls, n_cls).cpu()
        metrics = {f"{split}_loss": float(loss_sum) / max(len(y), 1), f"{split}_ece": expected_calibration_error(bins)}
        if per_class:
            metrics.update(classification_metrics(confusion, self.classes, prefix=split))
        else:
            metrics[f"{split}_acc"] = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
        artifacts: dict[str, Any] = {"confusion": confusion.tolist(), "calibration": bins.cpu().tolist()}
        if temperature != 1.0:
            metrics[f"{split}_ece_calibrated"] = expected_calibration_error(scaled_bins)
            artifacts["calibration_scaled"] = scaled_bins.cpu().tolist()
        if keep_logits:
            artifacts["logits"], artifacts["labels"] = torch.cat(logits), y[idx]
        return Evaluation(metrics, artifacts)

    def final_evaluation(self, model: torch.nn.Module) -> Evaluation:
        temperature = 1.0
        metrics: dict[str, float] = {}
        artifacts: dict[str, Any] = {}
        if self.cfg.calibration.temperature:
            # Fitted on validation (every rank on the whole split, so all agree), applied to test.
            val = self._evaluate(model, "val", per_class=False, keep_logits=True, shard=False)
            temperature = fit_temperature(val.artifacts["logits"], val.artifacts["labels"])
            again = self._evaluate(model, "val", temperature=temperature, per_class=False)
            metrics.update(temperature=temperature, val_ece_calibrated=again.metrics["val_ece_calibrated"])
            artifacts["val_calibration_scaled"] = again.artifacts["calibration_scaled"]
        if self.data.test_y is not None:
            test = self._evaluate(model, "test", temperature=temperature)
            metrics.update(test.metrics)
            artifacts["test"] = test.artifacts
        artifacts["card"] = {"temperature": temperature, "selection_split": self.cfg.selection_split,
                             "val_source": self.data.val_source}
        return Evaluation(metrics, artifacts)

    def card_fields(self) -> dict[str, Any]:
        return {"classes": self.classes, "input_size": self.data.input_size,
                "normalization": {"mean": self.data.mean, "std": self.data.std}}

    def figures(self, history: list[dict[str, float]], best: dict[str, Any], final: Evaluation | None = None
                ) -> dict[str, Any]:
        figures = super().figures(history, best)
        if best.get("confusion") is not None:
            figures["confusion_matrix.png"] = plot_confusion(np.asarray(best["confusion"]), self.classes)
        if best.get("calibration") is not None:
            figures["reliability_val.png"] = plot_reliability(np.asarray(best["calibration"]), "validation")
        test = (final.artifacts.get("test") if final is not None else None) or {}
        if test:
            figures["confusion_matrix_test.png"] = plot_confusion(np.asarray(test["confusion"]), self.classes)
            figures["reliability_test.png"] = plot_reliability(np.asarray(test["calibration"]), "test")
        return figures


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask}


def build_task(cfg: TrainConfig, runtime: Runtime) -> Task:
    return TASKS[cfg.task](cfg, runtime)
