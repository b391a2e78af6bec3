"""Where a run reports besides its checkpoints: MLflow (params, per-epoch metrics, the dataset, system
metrics, figures, the final test figures, the model as a pyfunc) and Prometheus (per-run gauges pushed to the
Pushgateway). Only the main rank reports."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from services.train.config import TrainConfig
from services.train.engine.state import RunState
from services.train.engine.tasks import Evaluation, Task
from shared.config import config_hash
from shared.metrics import JobMetrics
from shared.modelcard import ModelCard
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
    tags = {"trainyard_run_id": run_id, "model": cfg.model.name, "selection_split": cfg.selection_split, **cfg.tags}
    tracker = Tracker(experiment=cfg.experiment, run_name=cfg.run_name or cfg.default_run_name(),
                      tracking_uri=tracking_uri, tags=tags, run_id=mlflow_run_id, config_hash=config_hash(cfg),
                      dataset_version=data_version, system_metrics=True)
    tracker.start()
    state.mlflow_run_id = tracker.run_id
    return tracker


def log_run_start(tracker: Tracker, cfg: TrainConfig, model: torch.nn.Module, task: Task, world_size: int) -> None:
    from shared.models import model_summary

    params = cfg.model_dump(mode="json")
    data = task.data_params()
    params["data"].update(data)
    params["world_size"] = world_size
    tracker.log_params(params)
    tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
    tracker.log_text(model_summary(model, input_size=tuple(task.input_size)).to_text(), "model_summary.txt")
    n_params = sum(p.numel() for p in model.parameters())
    # What the optimiser moves: everything, or with LoRA only the adapters.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.set_tags({"num_params": n_params})
    # As metrics too, so the compare view can plot accuracy against size.
    tracker.log_metrics({"num_params": n_params, "num_params_m": n_params / 1e6, "trainable_params": trainable},
                        step=0)
    name = f"{cfg.data.kind}:{Path(cfg.data.path).name}" if cfg.data.path else f"synthetic:seed{cfg.seed}"
    tracker.log_dataset(name, task.data_version, cfg.data.path, profile=data)


def log_run_end(tracker: Tracker, cfg: TrainConfig, task: Task, state: RunState, final: Evaluation) -> None:
    """The final test figures (once), the best epoch's selection metric, the figures and the history."""
    last = state.history[-1]["epoch"] if state.history else 0
    metric = cfg.checkpoint.keep_best_metric
    best = {f"best_{metric}": state.best_metric} if state.best_metric is not None else {}
    totals = {"best_epoch": state.best_epoch or 0, "epochs_done": len(state.history),
              "train_time_total": sum(h.get("epoch_time", 0.0) for h in state.history)}
    tracker.log_metrics({**final.metrics, **best, **totals}, step=last)
    for name, figure in task.figures(state.history, state.best_artifacts, final).items():
        tracker.log_figure(figure, name)
    tracker.log_dict({"history": state.history, "best_epoch": state.best_epoch, "best_metric": state.best_metric,
                      "final": final.metrics}, "history.json")


def log_model(tracker: Tracker, card: ModelCard, weights: bytes, files: dict[str, bytes] | None = None) -> None:
    """The selected model as the run's ``model`` artifact: an MLflow pyfunc model (see shared.tracking.pyfunc)."""
    from shared.tracking.pyfunc import save_pyfunc_model

    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(save_pyfunc_model(Path(tmp) / "model", card, weights, files), "model")


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
