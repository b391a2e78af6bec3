"""Model zoo: trainyard's own architectures by name, timm's passed through (never downloading weights)."""
from shared.models.registry import (
    create_model,
    is_registered,
    list_models,
    load_pretrained,
    load_state,
    read_state_dict,
    register_model,
)
from shared.models.summary import LayerRow, Summary, count_params, model_summary

# Importing the builder modules registers them.
from shared.models import mnist as _mnist  # noqa: E402,F401  isort: skip
from shared.models import video as _video  # noqa: E402,F401  isort: skip
from shared.models import captioner as _captioner  # noqa: E402,F401  isort: skip
from shared.models import lm as _lm  # noqa: E402,F401  isort: skip
from shared.models.logo import (  # noqa: E402  isort: skip
    HEADS,
    backbone_stages,
    freeze_backbone,
    unfreeze_schedule,
    unfreeze_stages,
)

__all__ = [
    "HEADS", "LayerRow", "Summary", "backbone_stages", "count_params", "create_model", "freeze_backbone",
    "is_registered", "list_models", "load_pretrained", "load_state", "model_summary", "read_state_dict",
    "register_model", "unfreeze_schedule", "unfreeze_stages",
]
