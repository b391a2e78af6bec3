"""Benchmark a list of models: one fresh subprocess each, results to MLflow and to CSV / Markdown tables.

Entry point for the CLI and the gRPC servicer: ``run_benchmarks(request, progress=None) -> list[ModelResult]``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from shared.benchmark.measure import MeasureSpec, ModelResult, measure_in_subprocess
from shared.errors import FailedPrecondition, InvalidArgument, TrainyardError
from shared.logs import get_logger

log = get_logger(__name__)

# (done, total, model, result): called with result=None when a model starts and with its result after.
Progress = Callable[[int, int, str, ModelResult | None], None]


class BenchRequest(BaseModel):
    """What to benchmark. ``models`` are zoo/timm names, ``store:models/<name>/<version>`` or ``pkg.mod:fn``."""

    models: list[str] = Field(min_length=1)
    # One sample's forward input (C, H, W for images); None means the store model card's input size, else
    # 3x224x224.
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = Field(default=None, gt=0)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    warmup: int = Field(default=10, ge=0)
    iterations: int = Field(default=50, ge=1)
    # Minimum timed seconds per throughput batch size.
    throughput_seconds: float = Field(default=2.0, gt=0)
    # Intra-op threads in each measuring process; None keeps torch's default (one per physical core).
    threads: int | None = Field(default=None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantize: bool = True
    # MNIST IDX dir or image folder for top-1 accuracy, fp32 vs int8.
    dataset: str | None = None
    dataset_limit: int = Field(default=2000, gt=0)
    # MLflow: one run per model in ``experiment``; track=False skips MLflow entirely.
    track: bool = True
    experiment: str = "benchmarks"
    tracking_uri: str | None = None
    # Per-model wall-clock limit for its subprocess.
    timeout_s: float = Field(default=1800.0, gt=0)
    # When set, run_benchmarks also writes the tables (see report.write_tables).
    out: str | None = None

    @field_validator("models")
    @classmethod
    def _names(cls, models: list[str]) -> list[str]:
        cleaned = [m.strip() for m in models]
        if any(not m for m in cleaned):
            raise ValueError("model names must not be empty")
        return cleaned

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if shape is not None and (not 3 <= len(shape) <= 6 or min(shape) <= 0):
            raise ValueError(f"input shape must have 3 to 6 positive dimensions, got {shape}")
        return shape

    @field_validator("out")
    @classmethod
    def _out(cls, out: str | None) -> str | None:
        # Checked up front so a long run does not end in a refused write.
        if out is not None and Path(out).suffix not in ("", ".md", ".csv"):
            raise ValueError(f"table output {out} must end in .md or .csv (or have no suffix)")
        return out

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, sizes: list[int]) -> list[int]:
        if min(sizes) <= 0:
            raise ValueError(f"batch sizes must be positive, got {sizes}")
        return sorted(set(sizes))


def make_request(**fields: Any) -> BenchRequest:
    """Build a BenchRequest, turning validation problems into one ``InvalidArgument``."""
    try:
        return BenchRequest(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgument(f"invalid benchmark request: {problems}") from exc


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device 'cuda' requested but torch sees no CUDA device on this machine")
    return device


def _spec(request: BenchRequest, model: str, device: str) -> MeasureSpec:
    return MeasureSpec(
        model=model, input_shape=request.input_shape, num_classes=request.num_classes,
        model_kwargs=request.model_kwargs, batch_sizes=request.batch_sizes, warmup=request.warmup,
        iterations=request.iterations, throughput_seconds=request.throughput_seconds,
        threads=request.threads, device=device, quantize=request.quantize, dataset=request.dataset,
        dataset_limit=request.dataset_limit,
    )


def log_to_mlflow(result: ModelResult, request: BenchRequest) -> str:
    """One MLflow run for one model's result; returns the run id."""
    from shared.tracking import Tracker

    hw = result.hardware
    tags = {"model": result.model, "device": result.device, "kind": "benchmark"}
    if hw is not None:
        tags["hardware"] = hw.digest
    if result.error:
        tags["error"] = result.error[:500]
    with Tracker(experiment=request.experiment, run_name=result.model, tracking_uri=request.tracking_uri,
                 tags=tags) as tracker:
        tracker.log_params({
            "model": result.model,
            "input_shape": "x".join(map(str, result.input_shape or request.input_shape or ())),
            "batch_sizes": ",".join(map(str, request.batch_sizes)),
            "num_classes": result.num_classes, "warmup": request.warmup, "iterations": request.iterations,
            "threads": result.threads, "device": result.device, "quantize": request.quantize,
            "dataset": request.dataset or "",
            "hardware": hw.model_dump() if hw is not None else {},
        })
        metrics = result.metrics()
        if metrics:
            tracker.log_metrics(metrics, step=0)
        tracker.log_dict(result.model_dump(mode="json"), "benchmark.json")
        return tracker.run_id


def run_benchmarks(request: BenchRequest, progress: Progress | None = None) -> list[ModelResult]:
    """Measure every model of ``request`` in its own subprocess, one after the other.

    Models run sequentially on purpose: two measuring at once would share cores and skew each other's
    latencies. A model that fails yields a row with ``error`` set; the others still run. An MLflow outage
    is recorded in ``tracking_error`` rather than losing the measurements.
    """
    device = resolve_device(request.device)
    results: list[ModelResult] = []
    total = len(request.models)
    for i, model in enumerate(request.models):
        if progress:
            progress(i, total, model, None)
        log.info("benchmark model", extra={"model": model, "index": i, "total": total})
        result = measure_in_subprocess(_spec(request, model, device), request.timeout_s)
        if result.error:
            log.warning("benchmark failed", extra={"model": model, "error": result.error[:500]})
        if request.track:
            try:
                result.mlflow_run_id = log_to_mlflow(result, request)
            except TrainyardError as exc:
                result.tracking_error = str(exc)
                log.error("benchmark not tracked", extra={"model": model, "error": str(exc)})
        results.append(result)
        if progress:
            progress(i + 1, total, model, result)
    if request.out:
        from services.benchmark.report import write_tables

        write_tables(results, request.out)
    return results
