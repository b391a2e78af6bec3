"""Tasks: what a run learns and how it is measured (``base.Task``), one module per kind."""
from __future__ import annotations

from services.train.config import TrainConfig
from services.train.engine.tasks.base import Evaluation, Runtime, Task, TrainBatches
from services.train.engine.tasks.captioning import CaptioningTask
from services.train.engine.tasks.classification import ClassificationTask
from services.train.engine.tasks.trajectory import TrajectoryTask

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "trajectory": TrajectoryTask,
                                 "captioning": CaptioningTask}


def build_task(cfg: TrainConfig, runtime: Runtime) -> Task:
    return TASKS[cfg.task](cfg, runtime)


__all__ = ["TASKS", "CaptioningTask", "ClassificationTask", "Evaluation", "Runtime", "Task", "TrainBatches",
           "TrajectoryTask", "build_task"]
