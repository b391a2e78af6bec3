"""Where a run reports besides its checkpoints: MLflow (params, per-epoch metrics, figures, the model) and
Prometheus (per-run gauges pushed to the Pushgateway). Only the main rank reports."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from services.train.config import TrainConfig
from services.train.engine.state import RunState
from services.train.engine.tasks import Task
from shared.config import config_hash
from shared.metrics import JobMetrics
from shared.modelcard import CARD_FILE, WEIGHTS_FILE, ModelCard
from shared.tracking import Tracker, find_run_by_tag

GAUGES = {"train_loss": "training loss of the last epoch", "val_loss": "validation loss of the last epoch",
          "val_acc": "validation accuracy", "samples_per_second": "training throughput of the last epoch"}


def open_tracker(cfg: TrainConfig, run_id: str, tracking_uri: str | None, state: RunState,
                 data_version: str) -> Tracker:
    """The run's MLflow run: the one in ``state`` on resume, a new one otherwise."""
    mlflow_run_id = state.mlflow_run_id
    if mlflow_run_id is None:
        # Killed before its first checkpoint: the MLflow run may exist already; continue it.
        mlflow_run_id = find_run_by_tag(cfg.experiment, "trainyard_run_id", run_id, tracking_uri=tracking_uri)
    tags = {"trainyard_run_id": run_id, "model": cfg.model.name, **cfg.tags}
    tracker = Tracker(experiment=cfg.experiment, run_name=cfg.run_name or run_id, tracking_uri=tracking_uri,
                      tags=tags, run_id=mlflow_run_id, config_hash=config_hash(cfg), dataset_version=data_version)
    tracker.start()
    state.mlflow_run_id = tracker.run_id
    return tracker


def log_run_start(tracker: Tracker, cfg: TrainConfig, model: torch.nn.Module, task: Task, world_size: int) -> None:
    from shared.models import model_summary

    params = cfg.model_dump(mode="json")
    params["data"].update(task.data_params())
    params["world_size"] = world_size
    tracker.log_params(params)
    tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
    tracker.log_text(model_summary(model, input_size=tuple(task.input_size)).to_text(), "model_summary.txt")
    tracker.set_tags({"num_params": sum(p.numel() for p in model.parameters())})


def log_run_end(tracker: Tracker, task: Task, state: RunState, card: ModelCard, weights: bytes) -> None:
    """The figures, the history and the selected model, as the run's artifacts."""
    for name, figure in task.figures(state.history, state.best_artifacts).items():
        tracker.log_figure(figure, name)
    tracker.log_dict({"history": state.history, "best_epoch": state.best_epoch, "best_metric": state.best_metric},
                     "history.json")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model_dir.mkdir()
        (model_dir / WEIGHTS_FILE).write_bytes(weights)
        (model_dir / CARD_FILE).write_bytes(card.to_json())
        tracker.log_artifact(model_dir, "model")


class EpochGauges:
    """Per-run gauges in the run's own registry, pushed after every epoch and when the run ends, with the
    job's duration and last success/failure time (a no-op with no Pushgateway)."""

    def __init__(self, experiment: str, run_id: str):
        self.job = JobMetrics("trainyard_train", {"experiment": experiment, "run_id": run_id}).__enter__()
        self.epoch = self.job.gauge("trainyard_train_epoch", "last finished epoch")
        self.gauges = {k: self.job.gauge(f"trainyard_train_{k}", help_) for k, help_ in GAUGES.items()}

    def push(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.epoch.set(epoch)
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(metrics[key])
        self.job.push()

    def end(self, error: BaseException | None = None) -> None:
        self.job.__exit__(type(error) if error else None, error, None)


def history_row(metrics: dict[str, Any], epoch: int) -> dict[str, float]:
    """The scalar metrics of an epoch (per-class ones, with a '/', stay out of the history)."""
    return {k: v for k, v in metrics.items() if "/" not in k} | {"epoch": epoch}
