"""The inference service's REST API in the chart and the kustomize tree: the server's own parser reads the rendered
flags (--http-port), the container and the Service name the port, and the client namespaces reach it as they
reach gRPC."""
from __future__ import annotations

from services.inference.server import build_parser
from tests.harness.kube import admits, find, pod_labels, pod_spec

HTTP_PORT = 8000
CLIENT_NS = {"trainyard.io/inference-client": "true"}


def _check_http_port(objs: list[dict]) -> None:
    container = pod_spec(find(objs, "Deployment", "trainyard-inference"))["containers"][0]
    assert build_parser().parse_args(container["args"]).http_port == HTTP_PORT
    assert {"name": "http", "containerPort": HTTP_PORT} in container["ports"]
    ports = find(objs, "Service", "trainyard-inference")["spec"]["ports"]
    assert any(p["name"] == "http" and p["port"] == HTTP_PORT and p["targetPort"] == "http" for p in ports), ports
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    inference, stranger = pod_labels(objs, "Deployment", "trainyard-inference"), {"app": "elsewhere"}
    assert admits(policies, stranger, inference, HTTP_PORT, same_namespace=False, src_namespace=CLIENT_NS)
    assert not admits(policies, stranger, inference, HTTP_PORT, same_namespace=False)
    # Only inference serves REST.
    train = pod_spec(find(objs, "Deployment", "trainyard-train"))["containers"][0]
    assert "--http-port" not in train["args"]


def test_kustomize_serves_rest_on_8000(kustomized):
    _check_http_port(kustomized)


def test_chart_serves_rest_on_8000(rendered):
    _check_http_port(rendered["default"])
