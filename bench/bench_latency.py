"""Repeatability of the benchmark's batch-1 latency medians, and their ratio to a bare in-process loop.

Run: ``.venv/bin/python -m bench.bench_latency``. Runs the BenchmarkService's measurement (a fresh
subprocess per run, one thread) several times for one model and prints each median, the spread
(max/min) and how many consecutive pairs agree within 15%. The baseline is the plainest possible
measurement: ``model(x)`` timed in this process with ``time.process_time``, interleaved with the runs
so both see the same host.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from services.benchmark.runner import make_request, run_benchmarks
from shared.models import create_model

MODEL, RUNS, ITERATIONS = "mobilenetv3_large_100", 6, 60


def bare_loop_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    times = []
    with torch.inference_mode():
        for i in range(10 + ITERATIONS):
            start = time.process_time()
            model(x)
            if i >= 10:
                times.append(time.process_time() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    torch.set_num_threads(1)
    model = create_model(MODEL, num_classes=1000, in_chans=3).eval()
    x = torch.randn(1, 3, 224, 224)
    request = make_request(models=[MODEL], input_shape=(3, 224, 224), batch_sizes=[1], warmup=10,
                           iterations=ITERATIONS, throughput_seconds=0.1, threads=1, quantize=False, track=False)
    print(f"{MODEL}, batch 1, 1 thread, {ITERATIONS} timed iterations per run\n")
    print(f"{'run':>3s} {'bench cpu p50':>14s} {'bench wall p50':>15s} {'bare loop':>10s} {'ratio':>6s}")
    bench, bare = [], []
    for i in range(RUNS):
        result = run_benchmarks(request)[0]
        if result.error:
            print(f"run {i}: {result.error}")
            return 1
        bare.append(bare_loop_ms(model, x))
        bench.append(result.latency_cpu_p50_ms)
        print(f"{i:3d} {result.latency_cpu_p50_ms:11.2f} ms {result.latency_p50_ms:12.2f} ms {bare[-1]:7.2f} ms "
              f"{result.latency_cpu_p50_ms / bare[-1]:6.3f}", flush=True)
    agree = sum(abs(a - b) / min(a, b) <= 0.15 for a, b in zip(bench, bench[1:], strict=False))
    print(f"\nbenchmark medians: spread max/min {max(bench) / min(bench):.3f}, "
          f"consecutive pairs within 15%: {agree}/{RUNS - 1}")
    print(f"bare loop medians: spread max/min {max(bare) / min(bare):.3f} (the host's own wander)")
    print(f"benchmark / bare loop, median of runs: {statistics.median(bench) / statistics.median(bare):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
