"""Measuring a run's exported model when the run finishes (``benchmark.enabled``), with the code the
benchmark service uses (``shared.benchmark``), and logging the figures to the run's own MLflow run as
``bench_*`` metrics: one run then holds its training and its deployment numbers (what a study's table needs).

The measurement runs in a fresh subprocess, as ``trainyard bench`` does, with the run's thread count, so a
trial measured while another trains in parallel gets its own cores; the result records the CPU share it got,
and a busy machine is flagged in ``bench_cpu_share`` rather than hidden.
"""
from __future__ import annotations

import time

from services.train.config import TrainConfig
from shared.benchmark.measure import MeasureSpec, ModelResult, measure_in_subprocess
from shared.logs import get_logger
from shared.tracking import Tracker

log = get_logger(__name__)


def measure_run_model(cfg: TrainConfig, result) -> ModelResult:
    """Measure ``result``'s exported model (``store:models/<name>/<version>`` in TRAINYARD_STORE)."""
    b = cfg.benchmark
    # Accuracy fp32 vs int8 on the dataset's test split, when the benchmark can read the dataset from a path.
    dataset = cfg.data.path if cfg.data.kind in ("mnist", "cifar10") and cfg.data.path and "://" not in \
        cfg.data.path and not cfg.data.path.startswith("store:") else None
    spec = MeasureSpec(model=f"store:models/{result.model_name}/{result.model_version}",
                       input_shape=tuple(b.input_shape) if b.input_shape else None, batch_sizes=b.batch_sizes,
                       iterations=b.iterations, throughput_seconds=b.throughput_seconds, threads=cfg.num_threads,
                       quantize=b.quantize, dataset=dataset, device="cpu")
    return measure_in_subprocess(spec)


def benchmark_run(cfg: TrainConfig, result, tracker: Tracker | None) -> ModelResult | None:
    """Measure and log to the run's ``tracker``; None when the run exported no model. A failed measurement is
    recorded, not raised: the trained model stands whether or not it could be measured."""
    if not result.model_version:
        log.warning("benchmark skipped: the run exported no model", extra={"run_id": result.run_id})
        return None
    started = time.perf_counter()
    measured = measure_run_model(cfg, result)
    seconds = time.perf_counter() - started
    if tracker is not None:
        metrics = {f"bench_{k}": v for k, v in measured.metrics().items()}
        if measured.params_total is not None:
            metrics["bench_params"] = float(measured.params_total)
        tracker.log_metrics({**metrics, "bench_seconds": seconds}, step=0)
        tracker.log_dict(measured.model_dump(mode="json"), "benchmark.json")
        errors = {k: v for k, v in measured.model_dump().items() if k.endswith("error") and v}
        if errors:
            tracker.set_tags({"bench_error": "; ".join(f"{k}: {v}" for k, v in errors.items())[:4000]})
    log.info("model benchmarked", extra={"run_id": result.run_id, "seconds": round(seconds, 1),
                                         "error": measured.error})
    return measured
