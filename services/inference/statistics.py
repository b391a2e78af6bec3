"""Per-model-version inference statistics in Triton's shape (its statistics extension), collected where the
work happens.

The data plane times each request: decoding its input (``compute_input``), encoding its outputs
(``compute_output``) and its whole handling (``success`` / ``fail``), and counts its samples
(``inference_count``). The dynamic batcher times each request's wait in the queue (``queue``) and each forward
pass, which it adds to every request of the batch (``compute_infer``, as Triton does); per executed batch size it
keeps merging the requests' inputs, the forward pass and splitting the outputs (``batch_stats``), and counts
forward passes (``execution_count``). Component durations count successful requests only; a failed request
counts in ``fail`` alone.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from shared.pb import inference_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_pb(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _Batch:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelStats:
    """The statistics of one loaded model version; thread-safe (request threads and the batcher write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._success, self._fail, self._queue = Duration(), Duration(), Duration()
        self._input, self._infer, self._output = Duration(), Duration(), Duration()
        self._inference_count = 0
        self._execution_count = 0
        self._last_inference_ms = 0
        self._batches: dict[int, _Batch] = {}

    # ---- written by the data plane

    def request_succeeded(self, *, samples: int, total_ns: int, input_ns: int, output_ns: int) -> None:
        with self._lock:
            self._success.add(total_ns)
            self._input.add(input_ns)
            self._output.add(output_ns)
            self._inference_count += samples
            self._last_inference_ms = time.time_ns() // 1_000_000

    def request_failed(self, total_ns: int) -> None:
        with self._lock:
            self._fail.add(total_ns)
            self._last_inference_ms = time.time_ns() // 1_000_000

    # ---- written by the batcher

    def batch_executed(self, *, queue_ns: list[int], batch_size: int, input_ns: int, infer_ns: int,
                       output_ns: int) -> None:
        """One forward pass of ``batch_size`` samples over ``len(queue_ns)`` requests (each one's wait)."""
        with self._lock:
            self._execution_count += 1
            for wait in queue_ns:
                self._queue.add(wait)
            self._infer.add(infer_ns * len(queue_ns), len(queue_ns))
            batch = self._batches.setdefault(batch_size, _Batch())
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    # ---- read

    def to_pb(self, name: str, version: int) -> pb.ModelStatistics:
        with self._lock:
            return pb.ModelStatistics(
                name=name, version=str(version), last_inference=self._last_inference_ms,
                inference_count=self._inference_count, execution_count=self._execution_count,
                inference_stats=pb.InferStatistics(
                    success=self._success.to_pb(), fail=self._fail.to_pb(), queue=self._queue.to_pb(),
                    compute_input=self._input.to_pb(), compute_infer=self._infer.to_pb(),
                    compute_output=self._output.to_pb()),
                batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_input=b.compute_input.to_pb(),
                                                     compute_infer=b.compute_infer.to_pb(),
                                                     compute_output=b.compute_output.to_pb())
                             for size, b in sorted(self._batches.items())],
            )
