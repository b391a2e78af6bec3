"""The training engine, in parts (as timm splits loss/, optim/, scheduler/, utils/):

- ``loop``: the ``Engine`` — the epoch loop, resume, selection, early stopping, checkpoints, reporting calls;
- ``tasks``: what is learnt and measured (``Task``; ``ClassificationTask``): data, loss of a batch, metrics;
- ``data``: the in-memory image dataset and its loaders; ``losses``; ``optim`` (optimiser + LR schedule);
- ``monitor``: the metric watcher behind selection, early stopping and plateaus; ``state``: the typed
  checkpointed run state; ``distributed``: torchrun helpers; ``reporting``: MLflow and Prometheus;
  ``export``: publishing and registering the selected model.
"""
from services.train.engine.loop import Engine, RunResult

__all__ = ["Engine", "RunResult"]
