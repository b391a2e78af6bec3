"""A study's results, read back from MLflow alone, and the ways the report groups and ranks them.

Everything comes from the study's parent run (its ``study.json`` artifact lists the trials) and the child
runs of its trials: their params, tags, metrics and metric histories (a trial's figures are read at its
selected epoch, ``best_epoch``; ``test_*`` come from its one final evaluation; ``bench_*`` from the benchmark
run on its exported model). So the report (``report``: tables and pages; ``figures``: plots) can be rebuilt at
any time, by anyone with the tracking URI, and rebuilding it gives the same bytes.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

DONE = "FINISHED"
# Metrics read at the trial's selected epoch (the rest are read as their last value).
SELECTED = ("train_acc", "val_acc", "train_loss", "val_loss", "overfit_gap", "val_f1", "val_ece", "val_rmse")


@dataclass
class TrialData:
    trial_id: str
    run_id: str
    axes: dict[str, Any]
    overrides: dict[str, Any]
    status: str = "queued"  # queued, running, FINISHED, FAILED, pruned, cancelled
    reason: str = ""
    mlflow_run_id: str = ""
    run_name: str = ""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status == DONE

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


@dataclass
class StudyData:
    study: dict[str, Any]  # the parent run's study.json
    trials: list[TrialData]
    # services.train.studies.extras: the rows that are not trials (as TrialData), the selected model's int8
    # scores, the class names, and its misclassified-images gallery.
    extra_rows: list[TrialData] = field(default_factory=list)
    extras: dict[str, Any] | None = None
    gallery: bytes | None = None

    @property
    def axes(self) -> list[str]:
        return list(self.study["spec"]["grid"])


def collect(client, parent_run_id: str) -> StudyData:
    """Read the study and its trials back from MLflow."""
    import tempfile
    from pathlib import Path

    parent = client.get_run(parent_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        study = json.loads(Path(client.download_artifacts(parent_run_id, "study.json", tmp)).read_text())
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000)
    by_trial = {r.data.tags.get("trainyard.trial"): r for r in children}
    trials = []
    for t in study["trials"]:
        data = TrialData(t["trial_id"], t["run_id"], t["axes"], t["overrides"])
        run = by_trial.get(t["trial_id"])
        if run is not None:
            _fill(client, data, run)
        trials.append(data)
    from services.train.studies.extras import read_extras

    extras, gallery = read_extras(client, parent_run_id)
    rows = []
    first_axis = next(iter(study["spec"]["grid"]), "row")
    for row in (extras or {}).get("rows", []):
        t = TrialData(row["kind"], "", {first_axis: row["name"]}, {}, status=DONE, run_name=row["name"],
                      metrics=derived(dict(row["metrics"])))
        t.tags["trainyard.row"] = row["kind"]
        rows.append(t)
    return StudyData(study, trials, rows, extras, gallery)


def derived(metrics: dict[str, float]) -> dict[str, float]:
    """Adds what criteria and tables read beyond the logged metrics: the worst class's accuracy per split and
    the batched per-image latency (from the largest batch's throughput)."""
    for split in ("val", "test"):
        per_class = [v for k, v in metrics.items() if k.startswith(f"{split}_class_acc/")]
        if per_class:
            metrics[f"min_{split}_class_acc"] = min(per_class)
    throughput = largest_batch_throughput(metrics)
    if throughput is not None and throughput > 0 and "bench_batched_ms_per_image" not in metrics:
        metrics["bench_batched_ms_per_image"] = 1000 / throughput
    return metrics


def largest_batch_throughput(metrics: dict[str, float]) -> float | None:
    """The benchmark's throughput (samples/s) at the largest batch size it measured; None when unmeasured."""
    sizes = sorted(int(k.rsplit("bs", 1)[1]) for k in metrics if k.startswith("bench_throughput_bs"))
    return metrics[f"bench_throughput_bs{sizes[-1]}"] if sizes else None


def _fill(client, data: TrialData, run) -> None:
    tags = run.data.tags
    data.mlflow_run_id, data.run_name = run.info.run_id, run.info.run_name or ""
    data.params, data.tags, data.metrics = dict(run.data.params), dict(tags), dict(run.data.metrics)
    data.status = {"FINISHED": DONE, "FAILED": "FAILED", "KILLED": "cancelled"}.get(run.info.status, "running")
    if tags.get("trainyard.pruned"):
        data.status, data.reason = "pruned", tags["trainyard.pruned"]
    data.reason = data.reason or tags.get("trainyard.failure") or tags.get("error", "")
    for key in SELECTED:
        if key in data.metrics:
            data.history[key] = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    best = data.metrics.get("best_epoch")
    if best:
        for key in SELECTED:
            at = dict(data.history.get(key, []))
            if int(best) in at:
                data.metrics[key] = at[int(best)]
    derived(data.metrics)


def group(trials: list[TrialData], keys: list[str]) -> dict[tuple, list[TrialData]]:
    """Trials by their values on the ``keys`` axes (each value as JSON, so any value is a sortable key)."""
    out: dict[tuple, list[TrialData]] = {}
    for t in trials:
        out.setdefault(tuple(json.dumps(t.axes.get(k)) for k in keys), []).append(t)
    return out


def label(value_json: str) -> str:
    """An axis value as a table shows it (a ``group`` key part)."""
    value = json.loads(value_json)
    return "-" if value is None else str(value)


def model_axis(data: StudyData) -> str | None:
    """The axis that tells the models apart, if the grid has one."""
    return next((a for a in data.axes if a in ("model.name", "model.kwargs.head")), None)


def size_axis(data: StudyData) -> str | None:
    """The training-set size axis, if the grid has one."""
    return "data.subset" if "data.subset" in data.axes else None


def rows_side_by_side(data: StudyData, model: str | None) -> list[tuple[str, list[TrialData]]]:
    """Each model (or trial group) of the study, then each extra row, with the runs that give its figures."""
    group_axes = [model] if model else [a for a in data.axes if a != "seed"]
    out = [(" ".join(map(label, key)) or "all", ts) for key, ts in sorted(group(data.trials, group_axes).items())]
    return out + [(t.run_name, [t]) for t in data.extra_rows]


def ranked_trials(data: StudyData) -> list[TrialData]:
    """Finished trials, best on the study's objective (validation) first; ties keep the spec's order."""
    spec = data.study["spec"]
    metric, sign = spec["objective"]["metric"], 1 if spec["objective"]["direction"] == "maximize" else -1
    return sorted((t for t in data.trials if t.done and t.value(metric) is not None),
                  key=lambda t: -sign * t.value(metric))


def selected_trial(data: StudyData) -> TrialData | None:
    """The selection rule's pick: the finished trial best on the objective."""
    ranked = ranked_trials(data)
    return ranked[0] if ranked else None


def mean_of(ts: list[TrialData], key: str) -> float | None:
    """The mean of ``key`` over the finished trials that recorded it; None when none did."""
    values = [t.value(key) for t in ts if t.done and t.value(key) is not None]
    return statistics.fmean(values) if values else None
