"""shared.metrics against a real Prometheus (scraping) and a real Pushgateway."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, Gauge

from shared.metrics import JobMetrics, ServerMetrics, job_registry, push_metrics, start_metrics_server
from tests.harness import free_port
from tests.harness.process import HOST
from tests.harness.prometheus import scrape


def test_server_metrics_scraped_by_prometheus(prometheus_factory):
    registry = CollectorRegistry()
    train = ServerMetrics("train", registry)
    render = ServerMetrics("render", registry)  # a second service on the same registry must not clash
    with start_metrics_server(0, registry, addr=HOST) as server:
        for seconds in (0.002, 0.03, 0.4):
            train.observe("StartTraining", grpc.StatusCode.OK, seconds)
        train.observe("StartTraining", grpc.StatusCode.INVALID_ARGUMENT, 0.001)
        render.observe("Render", "NOT_FOUND", 2.0)
        prom = prometheus_factory([f"{HOST}:{server.port}"])

        def value(promql: str, expected: float) -> None:
            result = prom.wait_for(promql, lambda r: bool(r) and float(r[0]["value"][1]) == expected)
            assert float(result[0]["value"][1]) == expected

        value('trainyard_grpc_requests_total{service="train",method="StartTraining",code="OK"}', 3)
        value('trainyard_grpc_requests_total{service="train",code="INVALID_ARGUMENT"}', 1)
        value('trainyard_grpc_requests_total{service="render",method="Render",code="NOT_FOUND"}', 1)
        value('trainyard_grpc_request_duration_seconds_count{service="train",method="StartTraining"}', 4)
        value('trainyard_grpc_request_duration_seconds_bucket{service="train",le="0.005"}', 2)
        value('trainyard_grpc_request_duration_seconds_bucket{service="render",le="1.0"}', 0)
        total = prom.query('trainyard_grpc_request_duration_seconds_sum{service="train"}')
        assert float(total[0]["value"][1]) == pytest.approx(0.433)

        with train.in_flight("StartTraining"), train.in_flight("StartTraining"):
            value('trainyard_grpc_requests_in_flight{service="train"}', 2)
        value('trainyard_grpc_requests_in_flight{service="train"}', 0)
        value('up{job="trainyard"}', 1)

    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://{HOST}:{server.port}/metrics", timeout=2)


def test_in_flight_drops_on_exception():
    registry = CollectorRegistry()
    metrics = ServerMetrics("convert", registry)
    with pytest.raises(ValueError), metrics.in_flight("Convert"):
        assert registry.get_sample_value("trainyard_grpc_requests_in_flight", {"service": "convert"}) == 1
        raise ValueError("bad input")
    assert registry.get_sample_value("trainyard_grpc_requests_in_flight", {"service": "convert"}) == 0


def test_push_metrics_to_real_pushgateway(pushgateway, monkeypatch):
    monkeypatch.setenv("TRAINYARD_PUSHGATEWAY", pushgateway)
    url = f"http://{pushgateway}/metrics"

    first = job_registry()
    Gauge("trainyard_train_val_accuracy", "Validation accuracy.", registry=first).set(0.9919)
    assert push_metrics("train", first, {"run": "r1"}) is True
    assert scrape(url)[("trainyard_train_val_accuracy", (("instance", ""), ("job", "train"), ("run", "r1")))] == 0.9919

    # pushadd keeps the group's other metrics; a replacing push drops them.
    second = job_registry()
    Gauge("trainyard_train_epochs", "Epochs run.", registry=second).set(20)
    assert push_metrics("train", second, {"run": "r1"}, replace=False) is True
    samples = scrape(url)
    key = (("instance", ""), ("job", "train"), ("run", "r1"))
    assert samples[("trainyard_train_val_accuracy", key)] == 0.9919
    assert samples[("trainyard_train_epochs", key)] == 20
    assert push_metrics("train", second, {"run": "r1"}) is True
    samples = scrape(url)
    assert ("trainyard_train_val_accuracy", key) not in samples
    assert samples[("trainyard_train_epochs", key)] == 20


def test_job_metrics_push_success_and_failure(pushgateway):
    before = time.time()
    with JobMetrics("render", {"shard": "0"}, gateway=pushgateway) as jm:
        jm.gauge("trainyard_render_models", "Models rendered.").set(11)
        failures = jm.counter("trainyard_render_failures", "Models that failed to render.", ("reason",))
        failures.labels("bad_sketch").inc(2)
    with pytest.raises(RuntimeError), JobMetrics("render", {"shard": "1"}, gateway=pushgateway):
        raise RuntimeError("disk full")

    samples = scrape(f"http://{pushgateway}/metrics")
    ok = (("instance", ""), ("job", "render"), ("shard", "0"))
    failed = (("instance", ""), ("job", "render"), ("shard", "1"))
    assert samples[("trainyard_render_models", ok)] == 11
    assert samples[("trainyard_render_failures_total", tuple(sorted(ok + (("reason", "bad_sketch"),))))] == 2
    assert samples[("trainyard_job_last_success_timestamp_seconds", ok)] >= before
    assert samples[("trainyard_job_last_failure_timestamp_seconds", ok)] == 0
    assert samples[("trainyard_job_duration_seconds", ok)] >= 0
    assert samples[("trainyard_job_last_failure_timestamp_seconds", failed)] >= before
    assert samples[("trainyard_job_last_success_timestamp_seconds", failed)] == 0


def test_push_metrics_never_raises(monkeypatch):
    registry = job_registry()
    Gauge("trainyard_x", "x", registry=registry).set(1)
    monkeypatch.delenv("TRAINYARD_PUSHGATEWAY", raising=False)
    assert push_metrics("train", registry) is False  # embedded mode: nothing configured
    start = time.monotonic()
    assert push_metrics("train", registry, gateway=f"{HOST}:{free_port()}", timeout=2) is False
    assert time.monotonic() - start < 5
