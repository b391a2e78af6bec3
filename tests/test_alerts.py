"""The alert rules (charts/trainyard/rules/trainyard.rules.yml): promtool checks them and runs their unit tests
(tests/alerts/trainyard.rules.test.yml), the unit tests fail when an alert is weakened, and the chart ships the
same file to the bundled Prometheus and, as a PrometheusRule, to prometheus-operator. Against real series they
are evaluated in tests/test_dashboards.py."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness.kube import CHART, find, pod_spec, render_chart, validate_strict

RULES = CHART / "rules" / "trainyard.rules.yml"
UNIT_TESTS = Path(__file__).resolve().parent / "alerts" / "trainyard.rules.test.yml"
ALERTS = ["TrainyardServiceDown", "TrainyardTargetDown", "TrainyardHighErrorRate", "TrainyardHighLatency",
          "TrainyardTrainingStalled"]


def promtool(*args: str | Path) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "no promtool: apt-get install prometheus"
    return subprocess.run([binary, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules():
    out = promtool("check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout
    names = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert names == ALERTS


def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", UNIT_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@pytest.mark.parametrize("alert", ALERTS)
def test_unit_tests_fail_when_an_alert_is_weakened(alert, tmp_path):
    """Each alert has a case that expects it to fire: one that waits an hour longer breaks the unit tests."""
    rules = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == alert]
    rule["for"] = "1h"
    weakened = tmp_path / "rules" / "weakened.yml"
    weakened.parent.mkdir()
    weakened.write_text(yaml.safe_dump(rules, sort_keys=False))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(weakened)]
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    out = promtool("test", "rules", tmp_path / "tests.yml")
    assert out.returncode != 0
    assert f"alertname: {alert}," in out.stdout + out.stderr


def test_the_bundled_prometheus_loads_the_rules_file():
    objs = render_chart()
    rules = find(objs, "ConfigMap", "trainyard-prometheus-rules")["data"]["trainyard.rules.yml"]
    assert rules == RULES.read_text().rstrip("\n")  # verbatim: Helm left the alerts' own {{ $labels }} alone
    config = yaml.safe_load(find(objs, "ConfigMap", "trainyard-prometheus-config")["data"]["prometheus.yml"])
    (pattern,) = config["rule_files"]
    spec = pod_spec(find(objs, "Deployment", "trainyard-prometheus"))
    (volume,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == "trainyard-prometheus-rules"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert re.fullmatch(re.escape(mount["mountPath"]) + r"/\*\.yml", pattern)
    assert validate_strict(objs) == []


def test_prometheus_rule_for_the_operator(tmp_path):
    assert not [o for o in render_chart() if o["kind"] == "PrometheusRule"]  # off by default
    objs = render_chart({"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}})
    rule = find(objs, "PrometheusRule", "trainyard-alerts")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    assert validate_strict([rule]) == []  # against prometheus-operator's CRD schema
    # What the operator hands its Prometheus is still a rules file promtool accepts.
    (tmp_path / "rule.yml").write_text(yaml.safe_dump(rule["spec"]))
    out = promtool("check", "rules", tmp_path / "rule.yml")
    assert out.returncode == 0, out.stdout + out.stderr
