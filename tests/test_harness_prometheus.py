"""A real Prometheus scrapes an in-process prometheus_client endpoint; the value comes back via its API."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.harness.process import HOST, free_port


def test_prometheus_scrapes_counter(prometheus_factory):
    registry = CollectorRegistry()
    counter = Counter("harness_jobs", "Jobs seen by the harness test", ["kind"], registry=registry)
    counter.labels(kind="render").inc(7)
    port = free_port()
    server, thread = start_http_server(port, addr=HOST, registry=registry)
    try:
        prom = prometheus_factory([f"{HOST}:{port}"], job="harness")

        def has_value(value: float):
            return lambda result: bool(result) and float(result[0]["value"][1]) == value

        result = prom.wait_for('harness_jobs_total{kind="render"}', has_value(7.0), timeout=30)
        assert result[0]["metric"]["job"] == "harness"
        assert result[0]["metric"]["instance"] == f"{HOST}:{port}"

        # A later increment shows up on a later scrape: this is live scraping, not a cached file.
        counter.labels(kind="render").inc(3)
        prom.wait_for('harness_jobs_total{kind="render"}', has_value(10.0), timeout=30)
        assert prom.query('up{job="harness"}')[0]["value"][1] == "1"
    finally:
        server.shutdown()
        thread.join(timeout=5)
