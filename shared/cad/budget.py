"""The time one CAD model may take: to parse, rebuild and render it, or to describe it.

DeepCAD's models take well under a second each; one with pathological geometry can take minutes of
CPU. Past its budget a model is recorded as failed, with the reason, and the others go on.
``TRAINYARD_CAD_MODEL_BUDGET_S`` sets the budget of the services and the CLI.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from contextlib import AbstractContextManager

from shared import deadlines
from shared.errors import InvalidArgument

BUDGET_ENV = "TRAINYARD_CAD_MODEL_BUDGET_S"
DEFAULT_BUDGET_S = 30.0


def model_budget_s(env: Mapping[str, str] | None = None) -> float:
    """Seconds per model: ``TRAINYARD_CAD_MODEL_BUDGET_S`` from ``env`` (``os.environ``), else 30."""
    raw = (os.environ if env is None else env).get(BUDGET_ENV)
    if raw is None:
        return DEFAULT_BUDGET_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument(f"{BUDGET_ENV} must be a positive number of seconds, got {raw!r}")
    return seconds


def model_budget(model_id: str, seconds: float) -> AbstractContextManager[None]:
    """Work on ``model_id`` inside fails with ``deadlines.BudgetExceeded`` once it has run ``seconds``."""
    return deadlines.budget(seconds, f"model {model_id}")
