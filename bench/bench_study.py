"""Studies: a trial's training throughput against a bare timm loop, and what the study machinery costs.

    .venv/bin/python -m bench.bench_study [--skip-cpu-study] [--train 4000] [--rounds 3]

1. Throughput: a one-trial study trains a timm backbone (resnet10t) at 32x32 on rendered CIFAR-format data
   through the train service's study path (a local worker process, the Engine, MLflow, checkpoints) and
   reports samples/s; a bare timm loop trains the same model on the same normalised in-memory tensors
   with the same batch size and thread count. Target: the trial >= 90% of the bare loop.
2. Overhead: the CPU study (studies/cifar10-small-data-cpu.yaml) on the rendered data; its wall time beside
   the summed trial time and the benchmark time (counted apart). Target: overhead (expansion,
   scheduling, aggregation) <= 5% of the summed trial time.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.loops import bare_loop

REPO = Path(__file__).resolve().parent.parent


def bare_timm(x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, seed: int = 0) -> float:
    """The faster of per-batch gathers and one whole-epoch gather with slices, as bench_train's baseline."""
    from shared.models import create_model

    rates = []
    for whole_epoch in (False, True):
        torch.manual_seed(seed)
        model = create_model("resnet10t", num_classes=10, in_chans=3)
        rates.append(bare_loop(model, torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=0.05), x, y,
                               batch_size, epochs, whole_epoch=whole_epoch))
    return max(rates)


def run_study(spec_yaml: str, tmp: Path):
    from mlflow import MlflowClient

    from services.train.server import build_manager
    from services.train.studies.manager import StudyManager
    from shared.storage import open_store

    runs = build_manager(max_concurrent=2)
    studies = StudyManager(runs, open_store(), poll_s=0.5)
    record = studies.join(studies.submit(spec_yaml).study_id)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    children = client.search_runs([client.get_experiment_by_name(record.spec.name).experiment_id],
                                  f"tags.mlflow.parentRunId = '{record.parent_run_id}'")
    return record, children, client


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-cpu-study", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-study-"))
    os.environ.update(TRAINYARD_HOME=str(tmp / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
                      TRAINYARD_PROGRESS="0", MLFLOW_DISABLE_TELEMETRY="true")
    from services.render.jobs import build_job, run_job
    from shared.data import NORMALIZATION, read_cifar10
    from shared.preprocess import Normalizer
    from shared.storage import open_store

    data = tmp / "data"
    run_job(build_job("cifar-synth", 10_000, 0, {"test_count": 1000}), open_store(data), "cifar",
            workers=os.cpu_count() or 1)
    threads = len(os.sched_getaffinity(0))

    print(f"1. trial throughput vs a bare timm loop: resnet10t, 32x32, batch 64, {threads} threads, "
          f"{args.train} samples, best epoch of {args.rounds} rounds a side ({args.epochs} epochs each), "
          "the two sides alternating")
    train, _ = read_cifar10(data / "cifar")
    mean, std = NORMALIZATION["cifar10"]
    x = Normalizer(mean, std)(train.images[:args.train])
    torch.set_num_threads(threads)
    trial_sps = bare = 0.0
    # Rounds alternate so that a slow minute on this shared VM lands on both sides, not on one.
    for r in range(args.rounds):
        spec = f"""
name: bench-trial
base_config:
  experiment: bench-trial
  model: {{name: resnet10t}}
  data: {{kind: cifar10, path: {data / 'cifar'}, subset: {args.train}}}
  epochs: {args.epochs}
  batch_size: 64
  optimizer: {{name: adamw, lr: 0.002, weight_decay: 0.05}}
grid: {{seed: [{r}]}}
parallelism: 1
benchmark: {{enabled: false}}
"""
        record, children, client = run_study(spec, tmp)
        trial_sps = max(trial_sps, *(m.value for m in client.get_metric_history(children[0].info.run_id,
                                                                              "samples_per_second")))
        torch.set_num_threads(threads)
        bare = max(bare, bare_timm(x, train.labels[:args.train], 64, args.epochs, seed=r))
    print(f"   study trial {trial_sps:8.1f} samples/s | bare loop {bare:8.1f} samples/s | ratio "
          f"{trial_sps / bare:6.1%} (target >= 90%)")

    if not args.skip_cpu_study:
        text = (REPO / "studies" / "cifar10-small-data-cpu.yaml").read_text().replace(
            "path: data/cifar-synth", f"path: {data / 'cifar'}")
        print("2. the CPU study (studies/cifar10-small-data-cpu.yaml) on rendered CIFAR-format data")
        started = time.perf_counter()
        record, _, _ = run_study(text, tmp)
        t = record.timing
        print(f"   {len(record.trials)} trials, {record.state}: wall {time.perf_counter() - started:.0f}s (study's own "
              f"clock {t['study_wall_s']:.0f}s) | trials {t['trials_sum_s']:.0f}s summed | benchmarks "
              f"{t['benchmark_sum_s']:.0f}s | report {t['report_s']:.1f}s")
        print(f"   study overhead {t['study_overhead_s']:.1f}s = {t['study_overhead_pct']:.1f}% of the summed trial "
              f"time (target <= 5%) at parallelism {record.spec.parallelism}, "
              f"{max(1, threads // record.spec.parallelism)} thread(s) per trial")
        report = open_store().get_bytes(f"studies/{record.study_id}/report/report.md").decode()
        print("\n" + report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
