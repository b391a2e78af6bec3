"""Publishing the selected model of a run as ``models/<name>/<version>/`` (shared.modelcard), logging it to
MLflow as a pyfunc model and registering it, exactly once per run.

One version number names the model everywhere: with tracking on, the MLflow registry hands out the number
and the store publishes under the same one; without tracking the store picks the next free number.
Registry aliases follow the selection rule (shared.tracking.registry.promote): the best version on the
validation metric is the ``champion``, a new version that does not beat it the ``challenger``.
"""
from __future__ import annotations

import json

from services.train.config import TrainConfig
from services.train.engine import reporting
from services.train.engine.state import RunState
from services.train.engine.tasks import Evaluation, Task
from shared.errors import FailedPrecondition
from shared.logs import get_logger
from shared.modelcard import ModelCard, model_prefix, publish_model
from shared.tracking import Tracker, register_model
from shared.tracking.registry import promote, version_of_run

log = get_logger(__name__)


def build_card(cfg: TrainConfig, task: Task, model_kwargs: dict, state: RunState, run_id: str,
               final: Evaluation, backbone: dict) -> ModelCard:
    """The card of the selected epoch's model, with its validation figures (per class too) beside the final
    test figures and calibration (its version is set when it is published)."""
    best_row = next((h for h in state.history if h["epoch"] == state.best_epoch), state.history[-1])
    metrics = {k: float(v) for k, v in best_row.items() if k in task.card_metrics}
    metrics.update({k: float(v) for k, v in state.best_artifacts.get("metrics", {}).items()})
    metrics.update({k: float(v) for k, v in final.metrics.items() if k != "temperature"})
    confusion = {"val": state.best_artifacts["confusion"]} if "confusion" in state.best_artifacts else {}
    if "confusion" in final.artifacts.get("test", {}):
        confusion["test"] = final.artifacts["test"]["confusion"]
    return ModelCard(name=cfg.export.name or cfg.experiment, version=0, architecture=cfg.model.name,
                     model_kwargs=model_kwargs, run_id=run_id, mlflow_run_id=state.mlflow_run_id, metrics=metrics,
                     confusion=confusion, serving=cfg.export.serving, backbone=backbone,
                     **final.artifacts.get("card", {}),
                     **task.card_fields())


def _marker(run_id: str) -> str:
    return f"runs/{run_id}/export.json"


def export_model(store, cfg: TrainConfig, card: ModelCard, weights: bytes,
                 tracker: Tracker | None, files: dict[str, bytes] | None = None) -> tuple[str, int, bool]:
    """Publish (log, register) the model with ``files`` beside the weights (the card lists them); returns (name,
    version, whether it was published now).

    A restart after the export (killed while registering, or a finished run resubmitted) must not publish a
    second version: the marker written right after the publish records the first one, and a version the
    registry already holds for this run is reused.
    """
    marker = _marker(card.run_id)
    if store.exists(marker):
        done = json.loads(store.get_bytes(marker))
        return done["name"], done["version"], False
    if tracker is None:
        version, prefix = publish_model(store, card, weights, extra_files=files)
    else:
        uri = tracker.tracking_uri
        metric, mode = cfg.checkpoint.keep_best_metric, cfg.checkpoint.mode
        value = card.metrics.get(metric, float("nan"))
        version = version_of_run(uri, card.name, tracker.run_id) or register_model(
            uri, card.name, tracker.run_id, "model",
            tags={"selection_metric": metric, "selection_mode": mode, "selection_value": value,
                  "selection_split": card.selection_split, "trainyard_run_id": card.run_id})
        card = card.model_copy(update={"version": version})
        reporting.log_model(tracker, card, weights, files)
        prefix = model_prefix(card.name, version)
        if store.is_published(prefix):
            raise FailedPrecondition(
                f"the MLflow registry gave model {card.name!r} version {version}, but {prefix} already exists in "
                f"{store.url} (published by a run without tracking?): export each model name either always or "
                "never with MLflow tracking")
        publish_model(store, card, weights, version=version, extra_files=files)
        alias = promote(uri, card.name, version, metric, mode, value, eligible=card.selection_split == "val")
        tracker.set_tags({"model_uri": prefix, "registered_model_version": version, "model_alias": alias})
        log.info("model registered", extra={"model": card.name, "version": version, "alias": alias})
    store.put_bytes(marker, json.dumps({"name": card.name, "version": version, "uri": prefix}).encode())
    return card.name, version, True


def model_uri(name: str | None, version: int | None) -> str:
    return model_prefix(name, version) if name and version else ""
