"""Dynamic batching: concurrent requests for one model are merged into one forward pass.

Each model has one worker thread. It takes the oldest queued request, then keeps adding queued requests
while the batch stays within ``max_batch_size`` samples and the oldest request has waited less than
``max_queue_delay``; a batch that is already full runs at once. A request may itself carry several
samples, at most ``max_batch_size`` (the protocol refuses more); a full one runs as a batch of its own, right
on the caller's thread. Forward passes take turns in arrival order (a FIFO lock), so no stream of requests
can starve the others. With ``max_batch_size=1`` requests simply run one after another: the no-batching
baseline.

Time spent queued and time spent computing are separate Prometheus histograms, next to the batch size; the
same timings go into the model's Triton-style statistics (``services.inference.statistics``).
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import torch

from services.inference.metrics import families
from services.inference.statistics import ModelStats
from shared.errors import InvalidArgument, Unavailable
from shared.logs import get_logger

log = get_logger(__name__)

class _Request:
    __slots__ = ("x", "n", "enqueued", "done", "result", "error")

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.n = x.shape[0]
        self.enqueued = time.perf_counter_ns()
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None


class FairLock:
    """A lock granted in arrival order (``threading.Lock`` makes no such promise): a client sending full
    batches back to back cannot starve the queue's worker or the other callers."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # the releasing thread hands the lock over: _held stays True

    def __exit__(self, *exc) -> None:
        with self._mutex:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._held = False


class DynamicBatcher:
    """Runs ``run(batch) -> outputs`` (first dimension = samples) on merged concurrent requests.

    ``max_batch_size`` >= 1 and ``max_queue_delay_ms`` >= 0, as the repository checks them.
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], *, max_batch_size: int,
                 max_queue_delay_ms: float, model: str, version: str, stats: ModelStats):
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self._delay_ns = round(max_queue_delay_ms * 1_000_000)
        self._stats = stats
        self._queue: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._run_lock = FairLock()
        fam = families()
        self._queue_hist = fam.queue.labels(model=model, version=version)
        self._compute_hist = fam.compute.labels(model=model, version=version)
        self._batch_hist = fam.batch_size.labels(model=model, version=version)
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{model}-{version}", daemon=True)
        self._thread.start()

    def submit(self, x: torch.Tensor) -> torch.Tensor:
        """Queue ``x`` (N samples), block until its batch ran, return its N output rows."""
        req = _Request(x)
        if req.n > self.max_batch_size:
            raise InvalidArgument(f"a batch of {req.n} samples exceeds this model's max_batch_size "
                                  f"{self.max_batch_size}")
        if req.n == self.max_batch_size:
            # Already a full batch: nothing could join it, so it runs on the caller's thread and skips
            # two thread hand-offs (they cost most on a busy machine). The run lock keeps one forward
            # pass per model at a time, as with the worker.
            if self._closed:
                raise Unavailable("the model is being unloaded; retry once it is loaded again")
            self._execute([req])
            if req.error is not None:
                raise req.error
            return req.result
        with self._cv:
            if self._closed:
                raise Unavailable("the model is being unloaded; retry once it is loaded again")
            self._queue.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def close(self) -> None:
        """Refuse new requests, finish the queued ones, stop the worker."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def _next_batch(self) -> list[_Request] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            batch = [self._queue.popleft()]
            n = batch[0].n
            deadline = batch[0].enqueued + self._delay_ns
            while n < self.max_batch_size:
                if self._queue:
                    if n + self._queue[0].n > self.max_batch_size:
                        break
                    req = self._queue.popleft()
                    batch.append(req)
                    n += req.n
                    continue
                remaining = deadline - time.perf_counter_ns()
                if remaining <= 0 or self._closed:
                    break
                self._cv.wait(remaining / 1e9)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._execute(batch)
            for req in batch:
                req.done.set()

    def _execute(self, batch: list[_Request]) -> None:
        with self._run_lock:
            started = time.perf_counter_ns()
            waits = [started - req.enqueued for req in batch]
            for wait in waits:
                self._queue_hist.observe(wait / 1e9)
            try:
                x = batch[0].x if len(batch) == 1 else torch.cat([r.x for r in batch])
                merged = time.perf_counter_ns()
                out = self._run(x)
                computed = time.perf_counter_ns()
                self._compute_hist.observe((computed - merged) / 1e9)
                self._batch_hist.observe(x.shape[0])
                offset = 0
                for req in batch:
                    # Named outputs (shared.predict): each one's rows of this request.
                    req.result = {k: v[offset:offset + req.n] for k, v in out.items()} if isinstance(out, dict) \
                        else out[offset:offset + req.n]
                    offset += req.n
                self._stats.batch_executed(queue_ns=waits, batch_size=x.shape[0], input_ns=merged - started,
                                           infer_ns=computed - merged, output_ns=time.perf_counter_ns() - computed)
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                log.exception("batch failed", extra={"requests": len(batch)})
                for req in batch:
                    req.error = exc
