"""Watching one metric across epochs: the best checkpoint, early stopping and the plateau schedule all
ask the same questions (did it improve? for how many epochs has it not?), answered here once."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from shared.errors import InvalidArgument


def metric_value(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise InvalidArgument(f"unknown metric {name!r}; one of {sorted(k for k in metrics if '/' not in k)}")
    return float(metrics[name])


@dataclass
class MetricMonitor:
    """The best value of ``metric`` so far and the epochs since it last improved by more than ``min_delta``."""

    metric: str
    mode: Literal["min", "max"]
    min_delta: float = 0.0
    best: float | None = None
    bad_epochs: int = 0

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, metrics: dict[str, float]) -> bool:
        """Record an epoch's metrics; True when the monitored metric improved."""
        value = metric_value(metrics, self.metric)
        if self.improves(value):
            self.best, self.bad_epochs = value, 0
            return True
        self.bad_epochs += 1
        return False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MetricMonitor:
        return cls(**d)
