"""EfficientNet-B0 with the logo study's classifier heads, and gradual unfreezing.

The backbone is timm's ``efficientnet_b0`` unchanged, so a local timm checkpoint of it loads with
``create_model("logo_efficientnet_b0", pretrained_path=...)`` (only the 1000-class classifier is skipped), and
a training config loads a published model of it with ``model.pretrained: store:models/<name>/<version>``.

Gradual unfreezing: the backbone is split into stages (stem, the 7 block groups, the 1x1 head conv);
``unfreeze_stages(model, n)`` makes the last ``n`` trainable, the classifier always is. The training
engine calls ``unfreeze_schedule(model, epoch, schedule)`` at the start of every epoch of a run with
``freeze_backbone`` set. Build the optimizer over all parameters once: frozen ones simply get no gradient,
and optimizers skip params without one.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import timm
from torch import nn

from shared.errors import InvalidArgument
from shared.logs import get_logger
from shared.models.registry import register_model

log = get_logger(__name__)

HEADS = ("linear", "mlp256", "mlp128bn")


def make_head(kind: str, in_features: int, num_classes: int, dropout: float = 0.3) -> nn.Sequential:
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp256":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 256), nn.ReLU(inplace=True),
                             nn.Dropout(dropout), nn.Linear(256, num_classes))
    if kind == "mlp128bn":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, 128), nn.BatchNorm1d(128),
                             nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, num_classes))
    raise InvalidArgument(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")


@register_model
def logo_efficientnet_b0(num_classes: int = 4, in_chans: int = 3, head: str = "linear", dropout: float = 0.3,
                         drop_path_rate: float = 0.0) -> nn.Module:
    """EfficientNet-B0 (timm) with a logo-study head: linear | mlp256 | mlp128bn."""
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=num_classes,
                              in_chans=in_chans, drop_path_rate=drop_path_rate)
    model.classifier = make_head(head, model.num_features, num_classes, dropout)
    return model


def _head_module(model: nn.Module) -> nn.Module | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    name = name if isinstance(name, str) else None
    return model.get_submodule(name) if name else None


def backbone_stages(model: nn.Module) -> list[list[nn.Module]]:
    """The backbone, input side first, as groups that unfreeze together.

    EfficientNet/MobileNet-style timm models (conv_stem, blocks, conv_head) give stem + one stage per
    block group + head conv; any other model falls back to its top-level children minus the classifier.
    """
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):
        stages = [[model.conv_stem, model.bn1]]
        stages += [[block] for block in model.blocks]
        tail = [m for m in (getattr(model, "conv_head", None), getattr(model, "bn2", None)) if m is not None]
        if tail:
            stages.append(tail)
        return stages
    head = _head_module(model)
    return [[child] for child in model.children()
            if child is not head and any(True for _ in child.parameters())]


def _freeze_bn_hook(module: nn.Module, _inputs) -> None:
    # A frozen stage must not drift its running statistics; model.train() would undo a plain eval().
    module.training = False


def _set_stage(stage: list[nn.Module], trainable: bool, model_training: bool) -> None:
    for module in stage:
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                p.requires_grad_(trainable)
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                handle = getattr(sub, "_trainyard_freeze", None)
                if trainable and handle is not None:
                    handle.remove()
                    del sub._trainyard_freeze
                    sub.training = model_training  # the hook left it in eval mode
                elif not trainable and handle is None:
                    sub._trainyard_freeze = sub.register_forward_pre_hook(_freeze_bn_hook)


def unfreeze_stages(model: nn.Module, n: int | str) -> int:
    """Make the last ``n`` backbone stages trainable (``"all"`` or a negative ``n``: every stage).

    Everything outside the backbone stages (the classifier) stays trainable. Returns the number of
    trainable parameters afterwards.
    """
    stages = backbone_stages(model)
    if n == "all" or (isinstance(n, int) and n < 0):
        n = len(stages)
    if not isinstance(n, int):
        raise InvalidArgument(f"stage count must be an int or 'all', got {n!r}")
    for p in model.parameters():
        p.requires_grad_(True)
    for i, stage in enumerate(stages):
        _set_stage(stage, i >= len(stages) - n, model.training)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_backbone(model: nn.Module) -> int:
    """Train only the classifier. Returns the number of trainable parameters."""
    return unfreeze_stages(model, 0)


def _schedule_items(schedule: Mapping[int, int | str] | Iterable[tuple[int, int | str]]):
    items = list(schedule.items()) if isinstance(schedule, Mapping) else [tuple(x) for x in schedule]
    # keys arrive as strings when the schedule went through JSON (a config dump, a model card)
    items = [(int(e) if isinstance(e, str) and e.isdigit() else e, n) for e, n in items]
    for epoch, n in items:
        if not isinstance(epoch, int) or epoch < 0:
            raise InvalidArgument(f"unfreeze schedule epoch must be a non-negative int, got {epoch!r}")
        if not (n == "all" or isinstance(n, int)):
            raise InvalidArgument(f"unfreeze schedule entry for epoch {epoch} must be an int or 'all'")
    return sorted(items)


def unfreeze_schedule(model: nn.Module, epoch: int,
                      schedule: Mapping[int, int | str] | Iterable[tuple[int, int | str]]) -> int | str:
    """Apply the schedule entry in force at ``epoch`` ({start_epoch: stages}); returns that stage count.

    Before the first entry the backbone is frozen. Idempotent, so calling it every epoch is cheap.
    """
    n: int | str = 0
    for start, stages in _schedule_items(schedule):
        if start <= epoch:
            n = stages
    trainable = unfreeze_stages(model, n)
    log.info("unfreeze schedule applied", extra={"epoch": epoch, "stages": n, "trainable_params": trainable})
    return n
