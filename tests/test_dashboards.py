"""The Grafana dashboards in charts/trainyard/dashboards/: every panel query, with its template variables resolved
as Grafana resolves them, returns data from a real Prometheus scraping a real inference service process and a real
Pushgateway that a real training run pushed to; the alert rules load into that Prometheus and evaluate cleanly on
the same data; and the chart ships the dashboards in a ConfigMap for Grafana's sidecar."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from shared.grpc_client import channel, wait_serving
from shared.pb import inference_pb2 as pb
from shared.pb import inference_pb2_grpc
from shared.storage import open_store
from tests.harness import ManagedProcess, PrometheusServer, free_ports, tcp_probe
from tests.harness.inference import digits_nhwc, infer_request
from tests.harness.kube import CHART, find, render_chart, validate_strict
from tests.harness.process import HOST

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULES = CHART / "rules" / "trainyard.rules.yml"
# What Grafana gives $__rate_interval with a Prometheus data source's default 15 s scrape interval (4 x 15 s).
RATE_INTERVAL = "1m"
EXPERIMENT, RUN_ID = "dashboards", "dash-run"


def _targets(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def _regex_value(values: list[str]) -> str:
    """A multi-value variable inside =~"...", as Grafana's Prometheus data source writes it: each value
    regex-escaped (backslashes doubled for the PromQL string), joined as alternatives."""
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"


def _substitute(expr: str, variables: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def _resolve_variables(dashboard: dict, prom: PrometheusServer) -> dict[str, str]:
    """Each query variable at "All": every value its label_values() query finds, in the order Grafana resolves
    them (a variable's query may use the ones before it)."""
    resolved: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
        assert match, f"{var['name']}: only label_values(selector, label) queries are used here"
        selector, label = _substitute(match[1], resolved), match[2]
        values = sorted(prom.label_values(label, selector))
        assert values, f"variable {var['name']} ({var['query']}) has no values"
        resolved[var["name"]] = _regex_value(values)
    return resolved


def _finite(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


# ---------------------------------------------------------------- the dashboards' structure


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_well_formed(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] == path.stem and dashboard["title"].startswith("trainyard")
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in defined
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?(\w+)", target["expr"])) - {"__rate_interval"}
            assert used <= defined, (panel["title"], used - defined)
    # Panels do not overlap.
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, panel["title"]
        cells |= area


# ---------------------------------------------------------------- every query against real data


def _train_and_push(tmp_path: Path, store_url: str) -> None:
    """A real two-epoch training run that pushes its gauges to the Pushgateway after each epoch and
    publishes its model."""
    from services.train.config import parse_train_config
    from services.train.engine import Engine

    cfg = parse_train_config({
        "experiment": EXPERIMENT,
        "model": {"name": "mnist_ultralight", "kwargs": {"batchnorm": True}},
        "data": {"kind": "synthetic", "train_size": 128, "val_size": 64},
        "epochs": 2, "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "deterministic": True, "num_threads": 1, "seed": 0, "device": "cpu",
    })
    result = Engine(cfg, RUN_ID, store=open_store(store_url), tracking=False).run()
    assert (result.model_name, result.model_version) == (EXPERIMENT, 1)


def _drive(address: str, http_port: int) -> None:
    """Calls of every kind the panels show: metadata, 16 concurrent single images (dynamic batching merges
    them), and a model that is not there (NOT_FOUND); over REST, model metadata and a model that is not there."""
    images, _ = digits_nhwc(16, seed=3)
    rest = f"http://{HOST}:{http_port}/v2/models"
    with urllib.request.urlopen(f"{rest}/{EXPERIMENT}", timeout=10) as resp:
        assert json.load(resp)["name"] == EXPERIMENT
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{rest}/no-such-model", timeout=10)
    assert missing.value.code == 404
    with channel(address) as ch:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        stub.ModelMetadata(pb.ModelMetadataRequest(name=EXPERIMENT), timeout=10)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: stub.ModelInfer(infer_request(EXPERIMENT, images[i:i + 1]), timeout=30),
                                    range(16)))
        assert len(answers) == 16
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request("no-such-model", images[:1]), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_panel_query_returns_data_from_real_services(home, tmp_path, pushgateway, monkeypatch):
    monkeypatch.setenv("TRAINYARD_PUSHGATEWAY", pushgateway)
    store_url = f"file://{tmp_path / 'store'}"
    _train_and_push(tmp_path, store_url)

    port, metrics_port, http_port = free_ports(3)
    server = ManagedProcess(
        "inference",
        [sys.executable, "-m", "services.inference", "--port", port, "--metrics-port", metrics_port,
         "--http-port", http_port, "--store", store_url, "--models", EXPERIMENT, "--max-batch-size", "8",
         "--max-queue-delay-ms", "20", "--threads", "1"],
        tmp_path / "inference.log", tcp_probe(port), cwd=ROOT, env={**os.environ, "TRAINYARD_SERVE_MODELS": ""},
        ready_timeout=120)
    # The chart's scrape setup: the services as job "trainyard-services", the Pushgateway with honor_labels.
    prom = PrometheusServer(tmp_path / "prometheus", [f"{HOST}:{metrics_port}"], job="trainyard-services",
                            pushgateway=pushgateway, rule_files=[RULES])
    with server, prom:
        address = f"{HOST}:{port}"
        wait_serving(address, deadline_s=120)
        prom.wait_for('up{job="trainyard-services"} == 1')
        prom.wait_for(f'trainyard_train_epoch{{run_id="{RUN_ID}"}} == 2')
        # Two rounds with a scrape between them, so every rate() sees the counters move.
        _drive(address, http_port)
        prom.wait_for('sum(grpc_server_handled_total{grpc_method="ModelInfer"}) >= 17')
        _drive(address, http_port)

        empty = []
        for path in DASHBOARDS:
            dashboard = json.loads(path.read_text())
            variables = _resolve_variables(dashboard, prom)
            for title, expr in _targets(dashboard):
                query = _substitute(expr, variables)
                try:
                    prom.wait_for(query, _finite, timeout=30)
                except TimeoutError:
                    empty.append(f"{path.stem} / {title}: {query}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        services = json.loads((CHART / "dashboards" / "trainyard-services.json").read_text())
        variables = _resolve_variables(services, prom)
        errors = next(e for t, e in _targets(services) if t == "Errors per second by code")
        codes = {s["metric"]["grpc_code"] for s in prom.query(_substitute(errors, variables))}
        assert codes == {"NotFound"}
        batch = next(e for t, e in _targets(services) if t.startswith("Batch size"))
        mean = prom.query(_substitute(batch, variables))
        assert float(mean[0]["value"][1]) > 1  # dynamic batching merged the concurrent requests

        # The alert rules load and evaluate without error on these series.
        groups = {g["name"]: g for g in prom.rule_groups()}
        assert set(groups) == {"trainyard-services", "trainyard-training"}
        deadline = time.monotonic() + 30
        while not all(r.get("lastEvaluation", "").startswith("2") for g in prom.rule_groups() for r in g["rules"]):
            assert time.monotonic() < deadline, "rules were never evaluated"
            time.sleep(0.5)
        for group in prom.rule_groups():
            for rule in group["rules"]:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        assert prom.query("ALERTS") == []  # a healthy service and a finished run
        # Synthetic series in the promtool tests cannot catch a renamed metric; the real ones can.
        rule_metrics = set(re.findall(r"\b(?:grpc_server|trainyard|push_time)_\w+", RULES.read_text()))
        assert rule_metrics - set(prom.label_values("__name__", '{__name__=~".+"}')) == set()

        # The service goes away: TrainyardServiceDown and TrainyardTargetDown turn pending on the real series.
        server.stop()
        for alert, labels in (("TrainyardServiceDown", 'grpc_service="inference.GRPCInferenceService"'),
                              ("TrainyardTargetDown", 'job="trainyard-services"')):
            prom.wait_for(f'ALERTS{{alertname="{alert}",alertstate="pending",{labels}}}')
        assert not prom.query('ALERTS{alertname="TrainyardTrainingStalled"}')


# ---------------------------------------------------------------- shipped by the chart


def test_chart_ships_every_dashboard_for_grafanas_sidecar():
    assert not [o for o in render_chart() if o["metadata"]["name"] == "trainyard-dashboards"]  # off by default
    objs = render_chart({"grafanaDashboards": {"enabled": True, "annotations": {"grafana_folder": "trainyard"}}})
    cm = find(objs, "ConfigMap", "trainyard-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "trainyard"}
    assert sorted(cm["data"]) == [p.name for p in DASHBOARDS]
    for path in DASHBOARDS:
        assert json.loads(cm["data"][path.name]) == json.loads(path.read_text())
    assert validate_strict([cm]) == []
    labelled = render_chart({"grafanaDashboards": {"enabled": True, "labels": {"team-dashboards": "yes"}}})
    assert find(labelled, "ConfigMap", "trainyard-dashboards")["metadata"]["labels"]["team-dashboards"] == "yes"

