"""The inference service's Prometheus families, beside the bootstrap's gRPC ones (``shared.metrics``): the batcher's
queue, compute and batch-size histograms, inference requests by model and status (either protocol), and the
REST API's requests, latency and in-flight calls."""
from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS

_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Families:
    """Process-wide metric families (a registry accepts each name once; tests run several servers)."""

    def __init__(self) -> None:
        self.queue = Histogram("trainyard_inference_queue_seconds",
                               "Time a request waited in the model's queue before its batch started.",
                               ["model", "version"], buckets=_TIME_BUCKETS, registry=REGISTRY)
        self.compute = Histogram("trainyard_inference_compute_seconds",
                                 "Forward-pass time of one (dynamic) batch.",
                                 ["model", "version"], buckets=_TIME_BUCKETS, registry=REGISTRY)
        self.batch_size = Histogram("trainyard_inference_batch_size",
                                    "Samples per executed batch.",
                                    ["model", "version"], buckets=_BATCH_BUCKETS, registry=REGISTRY)
        self.requests = Counter("trainyard_inference_requests",
                                "Inference requests (gRPC ModelInfer and REST infer) by model and final status.",
                                ["model", "version", "status"], registry=REGISTRY)
        self.http_requests = Counter("trainyard_inference_http_requests",
                                     "REST requests handled, by route and HTTP status.",
                                     ["route", "method", "code"], registry=REGISTRY)
        self.http_latency = Histogram("trainyard_inference_http_request_duration_seconds",
                                      "Time from receiving a REST request to sending its response.",
                                      ["route", "method"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
        self.http_in_flight = Gauge("trainyard_inference_http_requests_in_flight",
                                    "REST requests being handled right now.", registry=REGISTRY)


_families: _Families | None = None
_families_lock = threading.Lock()


def families() -> _Families:
    global _families
    with _families_lock:
        if _families is None:
            _families = _Families()
        return _families
