"""A study spec: one YAML document that fans out into training runs.

```yaml
name: cifar10-cpu                # the MLflow experiment, the registered model, the study id's stem
base: configs/cifar10_resnet50.yaml   # or base_config: {...} inline; the CLI inlines a path before submitting
grid:                             # any config field; the trials are the product of the axes
  model.name: [resnet18, vit_tiny_patch16_224]
  data.subset: [1000, 5000]
  seed: [0, 1]
linked:                           # overrides that go with one value of an axis
  model.name:
    vit_tiny_patch16_224: {data.image_size: 224}
search:                           # optional: Optuna over continuous fields, per grid point
  sampler: tpe                    # or random
  trials: 8
  params: {optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}}
objective: {metric: val_acc, direction: maximize}
parallelism: 2                    # trials at once
failure_budget: 1                 # failed trials tolerated; one more stops the study
benchmark: {batch_sizes: [1, 64]} # every trial's model is measured when it finishes (enabled by default)
report: {columns: [...], plots: [...]}
```

Expansion is deterministic: a trial's id is a hash of its overrides, and the study's id a hash of the whole
normalised spec, so submitting the same spec again finds the same study and creates no new run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.train.config import BenchmarkConfig, TrainConfig, parse_train_config
from shared.config import apply_overrides, load_yaml, parse_config
from shared.errors import InvalidArgument
from shared.names import slug, validate_name

MAX_TRIALS = 500
# Columns of the training-results table (services.train.studies.report.COLUMNS has their definitions).
DEFAULT_COLUMNS = ["params", "train_acc", "val_acc", "test_acc", "gap", "train_loss", "val_loss", "epochs",
                   "train_time", "status"]
DEFAULT_PLOTS = ("accuracy_vs_size", "params_vs_accuracy", "latency_vs_accuracy", "loss_curves", "overfit_gap")
# On request: validation accuracy by epoch, per-class accuracy of every row side by side, and the selected
# model's misclassified test images.
PLOTS = (*DEFAULT_PLOTS, "accuracy_curves", "per_class", "misclassified")
# Rows that are not training runs (services.train.studies.extras).
BASELINES = ("image_features",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SearchParam(_Strict):
    low: float
    high: float
    log: bool = False
    type: Literal["float", "int"] = "float"

    @model_validator(mode="after")
    def _range(self) -> SearchParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class SearchSpec(_Strict):
    sampler: Literal["tpe", "random"] = "tpe"
    trials: int = Field(ge=1, le=MAX_TRIALS)
    seed: int = 0
    params: dict[str, SearchParam] = Field(min_length=1)
    # Median pruner on the per-epoch objective: a trial below the median of earlier trials at the same epoch
    # (after `pruner_warmup_epochs`) is stopped, once `pruner_startup_trials` trials of its grid point have
    # finished (Optuna's default, 5: a search of fewer trials than that never prunes).
    pruner: Literal["median", "none"] = "median"
    pruner_warmup_epochs: int = Field(1, ge=0)
    pruner_startup_trials: int = Field(5, ge=1)


class Objective(_Strict):
    metric: str = "val_acc"
    direction: Literal["maximize", "minimize"] = "maximize"

    @field_validator("metric")
    @classmethod
    def _validation_only(cls, metric: str) -> str:
        if metric.startswith("test_"):
            raise ValueError("a study's objective is a validation metric: the test split is evaluated once, "
                             "at the end of each trial, and never chosen on")
        return metric

    @property
    def mode(self) -> str:
        return "max" if self.direction == "maximize" else "min"


class StudyBenchmark(BenchmarkConfig):
    enabled: bool = True  # a study measures every trial's model unless told not to


class EnsembleSpec(_Strict):
    # The k finished trials best on the objective (validation) average their probabilities.
    top_k: int = Field(3, ge=2, le=20)


class Criterion(_Strict):
    """A success criterion the report checks for the selected model (and the baseline and ensemble rows):
    a report metric (a trial metric such as ``test_acc`` or ``bench_peak_memory_mb``, or a derived one:
    ``min_val_class_acc``, ``min_test_class_acc``, ``bench_batched_ms_per_image``) within ``min``/``max``."""
    metric: str = Field(min_length=1, max_length=200)
    min: float | None = None
    max: float | None = None
    label: str | None = Field(None, max_length=200)

    @model_validator(mode="after")
    def _bound(self) -> Criterion:
        if self.min is None and self.max is None:
            raise ValueError(f"criterion {self.metric}: give min, max or both")
        return self


class ReportSpec(_Strict):
    columns: list[str] = Field(default_factory=lambda: list(DEFAULT_COLUMNS))
    plots: list[Literal[PLOTS]] = Field(default_factory=lambda: list(DEFAULT_PLOTS))  # type: ignore[valid-type]
    title: str | None = None


class StudySpec(_Strict):
    name: str
    base: str | None = None
    base_config: dict[str, Any] | None = None
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    # axis -> value (as written in the grid) -> further overrides applied with it
    linked: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    search: SearchSpec | None = None
    objective: Objective = Field(default_factory=Objective)
    parallelism: int = Field(1, ge=1, le=64)
    failure_budget: int = Field(0, ge=0)
    benchmark: StudyBenchmark = Field(default_factory=StudyBenchmark)
    report: ReportSpec = Field(default_factory=ReportSpec)
    baselines: list[Literal[BASELINES]] = Field(  # type: ignore[valid-type]
        default_factory=list, max_length=len(BASELINES))
    ensemble: EnsembleSpec | None = None
    criteria: list[Criterion] = Field(default_factory=list, max_length=50)

    @property
    def wants_extras(self) -> bool:
        """Whether the study computes rows beyond its trials (services.train.studies.extras)."""
        return bool(self.baselines or self.ensemble or self.criteria or "misclassified" in self.report.plots)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        return validate_name(name, "study name")

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for axis, values in grid.items():
            if not values:
                raise ValueError(f"grid axis {axis!r} has no values")
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"grid axis {axis!r} repeats a value")
        return grid

    @model_validator(mode="after")
    def _base(self) -> StudySpec:
        if (self.base is None) == (self.base_config is None):
            raise ValueError("give exactly one of base (a config path) and base_config (the config inline)")
        for axis, by_value in self.linked.items():
            values = {str(v) for v in self.grid.get(axis, [])}
            if axis not in self.grid or not set(by_value) <= values:
                raise ValueError(f"linked.{axis} names values that are not on grid axis {axis!r}: "
                                 f"{sorted(set(by_value) - values)}")
        columns = set(self.report.columns) - set(_known_columns())
        if columns:
            raise ValueError(f"unknown report columns {sorted(columns)}; known: {_known_columns()}")
        return self

    @property
    def mode(self) -> str:
        return self.objective.mode


def _known_columns() -> list[str]:
    from services.train.studies.report import COLUMNS

    return list(COLUMNS)


class Trial(BaseModel):
    """One run of a study: its overrides of the base config, and where it stands."""

    trial_id: str
    run_id: str
    overrides: dict[str, Any]  # config path -> value (grid axes, then search params)
    axes: dict[str, Any]  # the grid axes alone (what the report groups by)
    search_point: str = ""  # the grid point a search trial belongs to ("" outside searches)
    number: int = 0  # the Optuna trial number within its search (0 outside searches)


def override_strings(overrides: dict[str, Any]) -> list[str]:
    """``--set`` strings for a trial's overrides (values in JSON, which YAML reads back as they were)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def trial_id(overrides: dict[str, Any]) -> str:
    blob = json.dumps(overrides, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def load_spec(text: str, source: str = "study spec", base_dir: Path | None = None) -> StudySpec:
    """Parse a spec; with ``base_dir`` a ``base:`` path is read (relative to it) and inlined."""
    data = load_yaml(text, source)
    if base_dir is not None and isinstance(data.get("base"), str):
        path = Path(data["base"])
        path = path if path.is_absolute() else (base_dir / path)
        if not path.is_file():
            path = Path.cwd() / data["base"]
        if not path.is_file():
            raise InvalidArgument(f"{source}: base config {data['base']} does not exist")
        data = {**data, "base": None, "base_config": load_yaml(path.read_text(), str(path))}
    spec = parse_config(StudySpec, data, source=source)
    if spec.base_config is None:
        raise InvalidArgument(f"{source}: base {spec.base} was not inlined; submit through the CLI, which reads it")
    return spec


def study_id(spec: StudySpec) -> str:
    """``<name>-<hash of the normalised spec>``: the same spec always names the same study. Fields added later
    count only when set, so a spec written before them keeps its id."""
    later = {name for name in ("baselines", "ensemble", "criteria") if not getattr(spec, name)}
    blob = json.dumps(spec.model_dump(mode="json", exclude={"base", *later}), sort_keys=True).encode()
    return f"{slug(spec.name, 24)}-{hashlib.sha256(blob).hexdigest()[:8]}"


def with_links(spec: StudySpec, point: dict[str, Any]) -> dict[str, Any]:
    """A grid point's overrides: its axis values, then what ``linked`` attaches to them."""
    out = dict(point)
    for axis, value in point.items():
        out.update(spec.linked.get(axis, {}).get(str(value), {}))
    return out


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    axes = list(spec.grid)
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*(spec.grid[a] for a in axes))]


def trial_for(spec: StudySpec, sid: str, overrides: dict[str, Any], axes: dict[str, Any], search_point: str = "",
              number: int = 0) -> Trial:
    tid = trial_id(overrides)
    return Trial(trial_id=tid, run_id=f"{sid[:31]}-{tid}", overrides=overrides, axes=axes,
                 search_point=search_point, number=number)


def expand_grid(spec: StudySpec, sid: str) -> list[Trial]:
    """The grid's trials (a study with a search adds its trials as they are sampled)."""
    points = grid_points(spec)
    total = len(points) * (spec.search.trials if spec.search else 1)
    if total > MAX_TRIALS:
        raise InvalidArgument(f"the study would run {total} trials; at most {MAX_TRIALS}")
    if spec.search:
        return []
    trials = [trial_for(spec, sid, with_links(spec, point), point) for point in points]
    for trial in trials:
        trial_config(spec, trial)  # every trial's config must validate before anything starts
    return trials


def trial_config(spec: StudySpec, trial: Trial, extra: dict[str, Any] | None = None) -> TrainConfig:
    """The base config with the trial's overrides and the study's own settings (``extra``)."""
    data = apply_overrides(spec.base_config or {}, override_strings({**trial.overrides, **(extra or {})}))
    return parse_train_config(data)
