"""What a run learns and how it is measured.

The ``Engine`` owns the loop: optimiser, schedule, checkpoints, resume, selection, early stopping, logging.
A ``Task`` owns everything that depends on what is learnt: the data and its batches, the loss of a batch,
the metrics of an evaluation, what the model card records and which figures explain the run. A new kind of
model (multi-task video heads, sequence decoders) is a new Task; the loop does not change.

Conventions the Engine relies on:
- ``step`` returns the loss to back-propagate and per-batch sums kept on the device (no host sync in the
  hot loop), among them ``loss_sum`` (loss x samples) and ``seen`` (samples); the Engine adds them up over
  the epoch, sums them over the ranks and hands the totals to ``epoch_metrics``;
- metric names are prefixed by their split (``train_``, ``val_``, ``test_``); per-class ones carry a ``/``;
- ``evaluate`` gives the same numbers on every rank (each takes a shard, the sums are all-reduced).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from services.train.config import TrainConfig
from services.train.engine.distributed import DistInfo, all_reduce
from shared.evaluation import (
    ECE_BINS,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
)
from shared.plots import plot_curves


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    dist: DistInfo
    amp: bool
    cache_root: Path
    store: Any = None  # the run's ArtifactStore: published models a run builds on (a LoRA base) are read there

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.amp)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    # Kept (JSON-able) for the best epoch, for the figures at the end of the run.
    artifacts: dict[str, Any] = field(default_factory=dict)


class ClassScores:
    """The classification figures of one evaluation, accumulated batch by batch on the device: the summed
    cross-entropy, the confusion matrix, calibration bins (also at ``temperature`` when it is not 1) and,
    with ``keep_logits``, the logits and labels. ``reduce`` sums them over the ranks; ``result`` names them."""

    def __init__(self, classes: list[str], device: torch.device, *, temperature: float = 1.0,
                 keep_logits: bool = False):
        self.classes, self.temperature, self.keep_logits = classes, temperature, keep_logits
        n = len(classes)
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.count = torch.zeros((), device=device, dtype=torch.float64)
        self.confusion = torch.zeros(n * n, device=device, dtype=torch.int64)
        self.bins = torch.zeros(3, ECE_BINS, device=device, dtype=torch.float64)
        self.scaled_bins = torch.zeros_like(self.bins)
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(self.classes)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        self.count += len(labels)
        self.confusion += torch.bincount(labels * n + logits.argmax(1), minlength=n * n)
        self.bins += calibration_bins(logits.softmax(1), labels)
        if self.temperature != 1.0:
            self.scaled_bins += calibration_bins((logits / self.temperature).softmax(1), labels)
        if self.keep_logits:
            self.logits.append(logits.cpu())
            self.labels.append(labels.cpu())

    def reduce(self, dist: DistInfo) -> None:
        for t in (self.loss_sum, self.count, self.confusion, self.bins, self.scaled_bins):
            all_reduce(t, dist)

    def result(self, split: str, *, per_class: bool) -> Evaluation:
        """``<split>_loss`` (plain CE), ``<split>_ece``, accuracy or all of ``classification_metrics``."""
        confusion = self.confusion.view(len(self.classes), -1).cpu()
        metrics = {f"{split}_loss": float(self.loss_sum) / max(float(self.count), 1.0),
                   f"{split}_ece": expected_calibration_error(self.bins)}
        if per_class:
            metrics.update(classification_metrics(confusion, self.classes, prefix=split))
        else:
            metrics[f"{split}_acc"] = float(confusion.diag().sum() / confusion.sum().clamp(min=1))
        artifacts: dict[str, Any] = {"confusion": confusion.tolist(), "calibration": self.bins.cpu().tolist()}
        if self.temperature != 1.0:
            metrics[f"{split}_ece_calibrated"] = expected_calibration_error(self.scaled_bins)
            artifacts["calibration_scaled"] = self.scaled_bins.cpu().tolist()
        if self.keep_logits:
            artifacts["logits"], artifacts["labels"] = torch.cat(self.logits), torch.cat(self.labels)
        return Evaluation(metrics, artifacts)


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

    def evaluate(self, model: torch.nn.Module, split: str) -> Evaluation:
        """Metrics of ``model`` on ``split`` ("val", or "train": a fixed sample of the training data measured
        like validation), prefixed by the split's name."""
        return self.measure(model, split)

    @abc.abstractmethod
    def measure(self, model: torch.nn.Module, split: str, *, temperature: float = 1.0, keep_logits: bool = False,
                shard: bool = True) -> Evaluation:
        """``evaluate`` with its options: probabilities also scored at ``temperature`` (``<split>_ece_calibrated``,
        ``calibration_scaled``), the logits and labels kept (``logits``, ``labels``) and, with ``shard=False``,
        every rank measuring the whole split."""

    @property
    @abc.abstractmethod
    def has_test(self) -> bool:
        """Whether the data has a test split."""

    @property
    @abc.abstractmethod
    def val_source(self) -> str:
        """Where validation came from (the card and the run record it)."""

    def final_evaluation(self, model: torch.nn.Module) -> Evaluation:
        """Once, after training, on the selected weights: the test split's metrics (``test_*``) and whatever
        is fitted on validation (a calibration temperature); ``artifacts`` hold figures and card fields."""
        temperature = 1.0
        metrics: dict[str, float] = {}
        artifacts: dict[str, Any] = {}
        if self.cfg.calibration.temperature:
            # Fitted on validation (every rank on the whole split, so all agree), applied to test.
            val = self.measure(model, "val", keep_logits=True, shard=False)
            temperature = fit_temperature(val.artifacts["logits"], val.artifacts["labels"])
            again = self.measure(model, "val", temperature=temperature)
            metrics.update(temperature=temperature, val_ece_calibrated=again.metrics["val_ece_calibrated"])
            artifacts["val_calibration_scaled"] = again.artifacts["calibration_scaled"]
        if self.has_test:
            test = self.measure(model, "test", temperature=temperature)
            metrics.update(test.metrics)
            artifacts["test"] = test.artifacts
        artifacts["card"] = {"temperature": temperature, "selection_split": self.cfg.selection_split,
                             "val_source": self.val_source}
        return Evaluation(metrics, artifacts)

    @abc.abstractmethod
    def card_fields(self) -> dict[str, Any]:
        """What the model card needs beyond the architecture: classes, input size, normalisation."""

    card_metrics: tuple[str, ...] = ()  # the best epoch's metrics the model card carries

    def export_files(self) -> dict[str, bytes]:
        """Files published beside the weights (name -> bytes), listed in the card's ``files``."""
        return {}

    def attach(self, model: torch.nn.Module) -> None:
        """The model is built and on the device (unwrapped: DDP comes later); a task that feeds it through
        the model's own input preparation reaches it here."""
        self.model = model

    def figures(self, history: list[dict[str, float]], best: dict[str, Any], final: Evaluation | None = None
                ) -> dict[str, Any]:
        """Figures (artifact name -> matplotlib figure) explaining the run, logged at its end: ``best`` holds
        the artifacts of the selected epoch's validation, ``final`` the final evaluation."""
        return {"curves.png": plot_curves(history)}
