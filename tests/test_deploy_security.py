"""Issue 14 items 20-21 in the deploy paths: no known password ships (the chart generates one, kustomize users
generate theirs through k8s/credentials), the inference service is open to labelled namespaces only, its
repository control reads its token from an optional Secret, and `tls.enabled` wires TLS into every service.
The objects are rendered as in test_deploy.py (Helm's Go library, `kubectl kustomize`) and validated strictly.
"""
from __future__ import annotations

import base64
import re
import secrets
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from shared.grpc_server import TLS_CERT, TLS_KEY, service_arg_parser
from shared.settings import load_settings
from tests.harness.kube import (
    CHART,
    K8S,
    NAMESPACE,
    ROOT,
    SERVICES,
    admits,
    docs,
    find,
    kustomize_with_credentials,
    pod_labels,
    pod_spec,
    render_chart,
    selector_matches,
    validate_strict,
)

SECRET_KEY = "AWS_SECRET_ACCESS_KEY"


def _services(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "Deployment"
            and o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "service"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _source_text() -> str:
    return "\n".join(p.read_text() for root in (K8S, CHART) for p in sorted(root.rglob("*")) if p.is_file())


# ---------------------------------------------------------------- item 20: credentials


def test_no_known_password_ships_in_k8s_or_the_chart():
    for path in sorted(K8S.rglob("*.yaml")):
        assert not [d for d in docs(path.read_text()) if d.get("kind") == "Secret"], f"{path} ships a Secret"
    for name in ("values.yaml", "values-gpu.yaml", "values-cpu.yaml"):
        assert (yaml.safe_load((CHART / name).read_text()).get("s3") or {}).get("secretKey", "") == "", name
    # Whatever the chart puts into a Secret is nowhere in the sources, and is new on each install.
    text = _source_text()
    first, second = (find(render_chart(), "Secret", "trainyard-s3")["stringData"][SECRET_KEY] for _ in range(2))
    assert first != second
    for value in (first, second):
        assert re.fullmatch(r"[A-Za-z0-9]{40}", value) and value not in text
    # The credentials file the documented step writes can never be committed.
    ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / "credentials" / "s3.env")], cwd=ROOT)
    assert ignored.returncode == 0


def test_chart_takes_given_credentials_and_refuses_an_external_s3_without_them():
    objs = render_chart({"s3": {"create": True, "accessKey": "ops", "secretKey": "chosen-by-the-operator"}})
    assert find(objs, "Secret", "trainyard-s3")["stringData"] == {"AWS_ACCESS_KEY_ID": "ops",
                                                                  SECRET_KEY: "chosen-by-the-operator"}
    # MinIO's root user is those keys.
    (minio,) = pod_spec(find(objs, "StatefulSet", "trainyard-minio"))["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in minio["env"] if "valueFrom" in e}
    assert refs["MINIO_ROOT_PASSWORD"] == {"name": "trainyard-s3", "key": SECRET_KEY}
    external = {"minio": {"enabled": False}, "externalS3": {"endpoint": "s3.example.internal:443", "secure": True}}
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="s3.secretKey is required"):
        chart.render(external, name="trainyard", namespace=NAMESPACE, is_install=True)
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values({"s3": {"accessKey": ""}}))


def test_kustomize_credentials_overlay_generates_the_secret(kustomized, tmp_path):
    key = secrets.token_hex(24)
    objs = kustomize_with_credentials(tmp_path, key)
    assert validate_strict(objs) == []
    secret = find(objs, "Secret", "trainyard-s3")  # the fixed name train-job.yaml and the train service use
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "AWS_ACCESS_KEY_ID": "trainyard", SECRET_KEY: key}
    # Otherwise the same stack as k8s/ alone.
    assert [o for o in objs if o["kind"] != "Secret"] == kustomized


# ---------------------------------------------------------------- item 21: inference access


@pytest.fixture(scope="module")
def both(kustomized, rendered) -> dict[str, list[dict]]:
    return {"kustomize": kustomized, "chart": rendered["default"]}


def test_network_policies_admit_inference_from_labelled_namespaces_only(both):
    for where, objs in both.items():
        policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
        assert validate_strict(policies) == [], where
        inference = pod_labels(objs, "Deployment", "trainyard-inference")
        clients = find(objs, "NetworkPolicy", "trainyard-inference-clients")["spec"]
        assert selector_matches(clients["podSelector"], inference), where
        (rule,) = clients["ingress"]
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"trainyard.io/inference-client": "true"}}}]
        assert [p["port"] for p in rule["ports"]] == [50051, 8000]  # gRPC and REST
        pod = {"app": "a-client"}
        labelled = {"trainyard.io/inference-client": "true"}
        assert admits(policies, pod, inference, 50051, same_namespace=False, src_namespace=labelled), where
        assert not admits(policies, pod, inference, 50051, same_namespace=False), where
        assert not admits(policies, pod, inference, 9090, same_namespace=False, src_namespace=labelled), where


def test_chart_network_policy_values():
    objs = render_chart({"networkPolicies": {"enabled": True, "inferenceClientNamespaceLabels": {"team": "vision"},
                                             "monitoringNamespace": ""}})
    assert validate_strict(objs) == []
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    inference = pod_labels(objs, "Deployment", "trainyard-inference")
    assert admits(policies, {}, inference, 50051, same_namespace=False, src_namespace={"team": "vision"})
    assert not admits(policies, {}, inference, 9090, same_namespace=False,
                      src_namespace={"kubernetes.io/metadata.name": "monitoring"})
    assert not admits(policies, {}, inference, 50051, same_namespace=False,
                      src_namespace={"trainyard.io/inference-client": "true"})


def test_repository_token_comes_from_an_optional_secret(both, tmp_path):
    for where, objs in both.items():
        (c,) = pod_spec(find(objs, "Deployment", "trainyard-inference"))["containers"]
        ref = _env(c)["TRAINYARD_REPOSITORY_TOKEN"]["valueFrom"]["secretKeyRef"]
        # Optional: without the Secret the pod starts and load/unload are refused.
        assert ref == {"name": "trainyard-repository-token", "key": "token", "optional": True}, where
        assert not [o for o in objs if o["metadata"]["name"] == "trainyard-repository-token"], where
    # The variable is the one the service reads.
    assert load_settings({"TRAINYARD_HOME": str(tmp_path), "TRAINYARD_REPOSITORY_TOKEN": "t"}).repository_token == "t"
    tokens = [find(render_chart({"repositoryControl": {"enabled": True}}), "Secret",
                   "trainyard-repository-token")["stringData"]["token"] for _ in range(2)]
    assert tokens[0] != tokens[1] and all(re.fullmatch(r"[A-Za-z0-9]{40}", t) for t in tokens)


def test_chart_tls_value_wires_every_service(rendered):
    objs = render_chart({"tls": {"enabled": True, "secretName": "trainyard-certs"}})
    assert validate_strict(objs) == []
    deployments = _services(objs)
    assert sorted(d["metadata"]["name"] for d in deployments) == sorted(f"trainyard-{n}" for n in SERVICES)
    for dep in deployments:
        where = dep["metadata"]["labels"]["app.kubernetes.io/name"]
        spec = pod_spec(dep)
        (c,) = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if "secret" in volumes[m["name"]]]
        assert volumes[mount["name"]]["secret"]["secretName"] == "trainyard-certs" and mount["readOnly"], where
        tls_dir = load_settings({"TRAINYARD_HOME": "/tmp", **{k: e["value"] for k, e in _env(c).items()
                                                                if "value" in e}}).tls_dir
        assert tls_dir == Path(mount["mountPath"]), where
        # The service takes these arguments, and its probes go to the plaintext health port they open.
        args, _ = service_arg_parser(where).parse_known_args(c["args"])
        assert args.port == 50051 and args.health_port not in (None, 50051, 9090), where
        probes = [c[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in c]
        assert probes and all(p["grpc"]["port"] == args.health_port for p in probes), where
        assert args.health_port in {p["containerPort"] for p in c["ports"]}, where
    # The servers read tls.crt/tls.key: the keys of a kubernetes.io/tls Secret.
    assert (TLS_CERT, TLS_KEY) == ("tls.crt", "tls.key")
    # Without tls.enabled nothing of it appears.
    for dep in _services(rendered["default"]):
        (c,) = pod_spec(dep)["containers"]
        assert "TRAINYARD_TLS_DIR" not in _env(c) and "--health-port" not in c["args"]
        assert not [v for v in pod_spec(dep)["volumes"] if "secret" in v]
