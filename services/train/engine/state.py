"""Everything a run carries from epoch to epoch besides tensors, as one typed record.

It goes into every checkpoint's ``state.json`` (``to_dict``) and comes back on resume (``from_dict``), so
a resumed run continues exactly where the killed one was: selection, early stopping, the schedule, the
MLflow run, the metric history.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.train.config import TrainConfig
from services.train.engine.monitor import MetricMonitor


@dataclass
class RunState:
    best: MetricMonitor  # the checkpoint-selection metric (checkpoint.keep_best_metric)
    early_stop: MetricMonitor | None = None  # None when early stopping is off
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch, scalars only
    best_epoch: int | None = None
    # What the task keeps of the best epoch's evaluation for the end-of-run figures (a confusion matrix).
    best_artifacts: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    stopped: str = ""  # why the run stopped before its last epoch ("" while it has not)
    schedule: dict[str, Any] = field(default_factory=dict)
    grad_scaler: dict[str, Any] | None = None
    config_hash: str = ""
    step: int = 0  # optimiser steps taken (the EMA's warmup counts them)

    @classmethod
    def initial(cls, cfg: TrainConfig) -> RunState:
        es = cfg.early_stopping
        return cls(best=MetricMonitor(cfg.checkpoint.keep_best_metric, cfg.checkpoint.mode),
                   early_stop=MetricMonitor(es.metric, es.mode, es.min_delta) if es.enabled else None)

    @property
    def best_metric(self) -> float | None:
        return self.best.best

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best.to_dict(), "early_stop": self.early_stop.to_dict() if self.early_stop else None,
            "history": self.history, "best_epoch": self.best_epoch, "best_artifacts": self.best_artifacts,
            "mlflow_run_id": self.mlflow_run_id, "stopped": self.stopped, "schedule": self.schedule,
            "grad_scaler": self.grad_scaler, "config_hash": self.config_hash, "step": self.step,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunState:
        return cls(
            best=MetricMonitor.from_dict(d["best"]),
            early_stop=MetricMonitor.from_dict(d["early_stop"]) if d.get("early_stop") else None,
            history=list(d.get("history", [])), best_epoch=d.get("best_epoch"),
            best_artifacts=dict(d.get("best_artifacts") or {}), mlflow_run_id=d.get("mlflow_run_id"),
            stopped=d.get("stopped", ""), schedule=dict(d.get("schedule") or {}), grad_scaler=d.get("grad_scaler"),
            config_hash=d.get("config_hash", ""), step=int(d.get("step", 0)),
        )
