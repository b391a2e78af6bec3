"""Publishing the selected model of a run as ``models/<name>/<version>/`` (shared.modelcard) and registering
it in MLflow's model registry, exactly once per run."""
from __future__ import annotations

import json

from services.train.config import TrainConfig
from services.train.engine.state import RunState
from services.train.engine.tasks import Task
from shared.modelcard import ModelCard, model_prefix, publish_model
from shared.tracking import Tracker, register_model


def build_card(cfg: TrainConfig, task: Task, model_kwargs: dict, state: RunState, run_id: str) -> ModelCard:
    """The card of the selected epoch's model (its version is set when it is published)."""
    best_row = next((h for h in state.history if h["epoch"] == state.best_epoch), state.history[-1])
    return ModelCard(name=cfg.export.name or cfg.experiment, version=0, architecture=cfg.model.name,
                     model_kwargs=model_kwargs, run_id=run_id, mlflow_run_id=state.mlflow_run_id,
                     metrics={k: float(v) for k, v in best_row.items() if k in task.card_metrics},
                     **task.card_fields())


def _marker(run_id: str) -> str:
    return f"runs/{run_id}/export.json"


def export_model(store, card: ModelCard, weights: bytes, tracker: Tracker | None) -> tuple[str, int, bool]:
    """Publish (and register) the model; returns (name, version, whether it was published now).

    A restart after the export (killed while registering, or a finished run resubmitted) must not publish a
    second version: the marker written right after the publish records the first one.
    """
    marker = _marker(card.run_id)
    if store.exists(marker):
        done = json.loads(store.get_bytes(marker))
        return done["name"], done["version"], False
    version, prefix = publish_model(store, card, weights)
    store.put_bytes(marker, json.dumps({"name": card.name, "version": version, "uri": prefix}).encode())
    if tracker is not None:
        mlflow_version = register_model(tracker.tracking_uri, card.name, tracker.run_id, "model",
                                        tags={"store_uri": prefix, "trainyard_version": version})
        tracker.set_tags({"model_uri": prefix, "registered_model_version": mlflow_version})
    return card.name, version, True


def model_uri(name: str | None, version: int | None) -> str:
    return model_prefix(name, version) if name and version else ""
