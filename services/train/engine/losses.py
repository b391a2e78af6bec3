"""Classification losses: cross-entropy or focal, with class weights and label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from services.train.config import TrainConfig
from shared.errors import InvalidArgument


def class_weights(cfg: TrainConfig, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    cw = cfg.loss.class_weights
    if cw == "none":
        return None
    if cw == "balanced":
        counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
        return counts.sum() / (num_classes * counts)
    if len(cw) != num_classes:
        raise InvalidArgument(f"loss.class_weights has {len(cw)} values for {num_classes} classes")
    return torch.tensor(cw, dtype=torch.float32)


class Criterion(torch.nn.Module):
    """Cross-entropy or focal loss, with class weights and label smoothing; accepts hard or soft targets."""

    def __init__(self, name: str, num_classes: int, weight: torch.Tensor | None, label_smoothing: float,
                 gamma: float):
        super().__init__()
        self.name, self.num_classes, self.smoothing, self.gamma = name, num_classes, label_smoothing, gamma
        self.register_buffer("weight", weight if weight is not None else torch.ones(0), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.weight.numel() else None
        if self.name == "ce":
            return F.cross_entropy(logits, target, weight=weight, label_smoothing=self.smoothing)
        # Focal loss in its general (soft-target) form: -sum_c t_c w_c (1 - p_c)^gamma log p_c.
        logp = F.log_softmax(logits.float(), dim=1)
        if target.dim() == 1:
            target = F.one_hot(target, self.num_classes).to(logp.dtype)
        if self.smoothing:
            target = target * (1 - self.smoothing) + self.smoothing / self.num_classes
        term = target * (1 - logp.exp()).pow(self.gamma) * logp
        if weight is not None:
            term = term * weight
        return -term.sum(1).mean()
