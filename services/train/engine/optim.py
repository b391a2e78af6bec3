"""The optimiser and the per-epoch learning-rate schedule."""
from __future__ import annotations

import math

import torch

from services.train.config import TrainConfig
from services.train.engine.monitor import MetricMonitor
from shared.logs import get_logger

log = get_logger(__name__)


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over every parameter, in timm's two weight-decay groups.

    Built before any freezing, so frozen parameters are in it too (timm's grouping skips parameters that do
    not require grad): they get no gradient while frozen, and gradual unfreezing needs no new param group.
    """
    from timm.optim import param_groups_weight_decay

    o = cfg.optimizer
    no_decay = getattr(model, "no_weight_decay", lambda: ())()
    params = param_groups_weight_decay(model, o.weight_decay, weight_decay_exclude_1d=not o.decay_norm_and_bias,
                                       no_weight_decay_list=() if o.decay_norm_and_bias else no_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)


class LRSchedule:
    """Per-epoch learning rate: warmup, then step/cosine as pure functions of the epoch, or plateau.

    Pure functions of the epoch make resume trivially exact; only plateau carries state (JSON-able).
    """

    def __init__(self, cfg: TrainConfig):
        self.s = cfg.scheduler
        self.base_lr = cfg.optimizer.lr
        self.epochs = cfg.epochs
        self.plateau_scale = 1.0
        self.monitor = MetricMonitor(self.s.metric, self.s.mode, self.s.threshold)

    def lr_at(self, epoch: int) -> float:
        """LR for 1-based ``epoch``."""
        s, e = self.s, epoch - 1
        if e < s.warmup_epochs:
            return self.base_lr * (e + 1) / (s.warmup_epochs + 1)
        e -= s.warmup_epochs
        if s.name == "step":
            return self.base_lr * s.gamma ** (e // s.step_size)
        if s.name == "cosine":
            span = max(1, self.epochs - s.warmup_epochs)
            return s.min_lr + (self.base_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * e / span))
        if s.name == "plateau":
            return max(s.min_lr, self.base_lr * self.plateau_scale)
        return self.base_lr

    def observe(self, metrics: dict[str, float]) -> None:
        """After an epoch: plateau tracks its metric (ignored for the others)."""
        if self.s.name != "plateau" or self.monitor.update(metrics):
            return
        if self.monitor.bad_epochs > self.s.patience:
            self.plateau_scale *= self.s.factor
            self.monitor.bad_epochs = 0
            log.info("plateau: reducing lr", extra={"lr": self.base_lr * self.plateau_scale})

    def state_dict(self) -> dict:
        return {"plateau_scale": self.plateau_scale, "monitor": self.monitor.to_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.plateau_scale = d["plateau_scale"]
        self.monitor = MetricMonitor.from_dict(d["monitor"])
