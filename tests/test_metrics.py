"""shared.metrics against a real Prometheus (scraping) and a real Pushgateway."""
from __future__ import annotations

import time
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from shared import errors
from shared.grpc_client import channel
from shared.grpc_server import start
from shared.metrics import JobMetrics, ServerMetrics, job_registry, push_metrics, start_metrics_server
from shared.pb import train_pb2, train_pb2_grpc
from tests.harness import free_port
from tests.harness.process import HOST
from tests.harness.prometheus import scrape

SUBMIT = "/trainyard.v1.TrainService/SubmitRun"
WATCH = "/trainyard.v1.TrainService/WatchRun"


def test_server_metrics_scraped_by_prometheus(prometheus_factory):
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    ServerMetrics(registry)  # a second server on the same registry must not clash
    with start_metrics_server(0, registry, addr=HOST) as server:
        for seconds in (0.002, 0.03, 0.4):
            with metrics.in_flight(SUBMIT):
                metrics.observe(SUBMIT, grpc.StatusCode.OK, seconds)
        with metrics.in_flight(SUBMIT):
            metrics.observe(SUBMIT, grpc.StatusCode.INVALID_ARGUMENT, 0.001)
        with metrics.in_flight(WATCH):
            metrics.observe(WATCH, "NOT_FOUND", 2.0)
        prom = prometheus_factory([f"{HOST}:{server.port}"])

        def value(promql: str, expected: float) -> None:
            result = prom.wait_for(promql, lambda r: bool(r) and float(r[0]["value"][1]) == expected)
            assert float(result[0]["value"][1]) == expected

        # go-grpc-prometheus's names, labels and code spellings
        submit = 'grpc_type="unary",grpc_service="trainyard.v1.TrainService",grpc_method="SubmitRun"'
        watch = 'grpc_type="server_stream",grpc_service="trainyard.v1.TrainService",grpc_method="WatchRun"'
        value(f'grpc_server_handled_total{{{submit},grpc_code="OK"}}', 3)
        value(f'grpc_server_handled_total{{{submit},grpc_code="InvalidArgument"}}', 1)
        value(f'grpc_server_handled_total{{{watch},grpc_code="NotFound"}}', 1)
        value(f'grpc_server_started_total{{{submit}}}', 4)
        value(f'grpc_server_handling_seconds_count{{{submit}}}', 4)
        value(f'grpc_server_handling_seconds_bucket{{{submit},le="0.005"}}', 2)
        value(f'grpc_server_handling_seconds_bucket{{{watch},le="1.0"}}', 0)
        total = prom.query(f'grpc_server_handling_seconds_sum{{{submit}}}')
        assert float(total[0]["value"][1]) == pytest.approx(0.433)

        in_flight = f'sum(grpc_server_started_total{{{submit}}}) - sum(grpc_server_handled_total{{{submit}}})'
        with metrics.in_flight(SUBMIT), metrics.in_flight(SUBMIT):
            value(in_flight, 2)
            metrics.observe(SUBMIT, grpc.StatusCode.OK, 0.01)
            metrics.observe(SUBMIT, grpc.StatusCode.OK, 0.01)
        value(in_flight, 0)
        value('up{job="trainyard"}', 1)

    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://{HOST}:{server.port}/metrics", timeout=2)


def test_every_method_starts_at_zero_with_its_type_and_every_code():
    registry = CollectorRegistry()
    ServerMetrics(registry).initialize(["trainyard.v1.TrainService", "grpc.health.v1.Health", "no.such.Service"])
    for method, kind in [("SubmitRun", "unary"), ("WatchRun", "server_stream"), ("ListRuns", "unary")]:
        labels = {"grpc_type": kind, "grpc_service": "trainyard.v1.TrainService", "grpc_method": method}
        assert registry.get_sample_value("grpc_server_started_total", labels) == 0
        assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 0
        for code in ("OK", "Canceled", "DeadlineExceeded", "NotFound", "ResourceExhausted", "Unauthenticated"):
            assert registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) == 0
    watch = {"grpc_type": "server_stream", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch"}
    assert registry.get_sample_value("grpc_server_started_total", watch) == 0
    codes = {s.labels["grpc_code"] for m in registry.collect() if m.name == "grpc_server_handled"
             for s in m.samples if s.name.endswith("_total")}
    assert len(codes) == len(grpc.StatusCode) == 17


def test_a_real_server_counts_started_and_handled_calls_with_their_codes():
    before = {code: _handled("GetRun", code) for code in ("OK", "NotFound", "Internal")}
    started_before = _started("GetRun")

    class Servicer(train_pb2_grpc.TrainServiceServicer):
        def GetRun(self, request, context):
            if request.run_id == "missing":
                raise errors.NotFound("no run 'missing'")
            if request.run_id == "bug":
                raise RuntimeError("a bug")
            return train_pb2.Run(run_id=request.run_id)

    def register(server):
        train_pb2_grpc.add_TrainServiceServicer_to_server(Servicer(), server)
        return ["trainyard.v1.TrainService"]

    host = start("metrics-test", register, port=0)
    try:
        with channel(f"127.0.0.1:{host.port}") as ch:
            stub = train_pb2_grpc.TrainServiceStub(ch)
            assert stub.GetRun(train_pb2.GetRunRequest(run_id="ok"), timeout=5).run_id == "ok"
            for run_id, code in (("missing", grpc.StatusCode.NOT_FOUND), ("bug", grpc.StatusCode.INTERNAL)):
                with pytest.raises(grpc.RpcError) as info:
                    stub.GetRun(train_pb2.GetRunRequest(run_id=run_id), timeout=5)
                assert info.value.code() == code
    finally:
        host.stop(grace=1)
    assert {code: _handled("GetRun", code) - n for code, n in before.items()} == {
        "OK": 1, "NotFound": 1, "Internal": 1}
    assert _started("GetRun") - started_before == 3


def _handled(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": "trainyard.v1.TrainService", "grpc_method": method,
        "grpc_code": code}) or 0.0


def _started(method: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_started_total", {
        "grpc_type": "unary", "grpc_service": "trainyard.v1.TrainService", "grpc_method": method}) or 0.0


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
