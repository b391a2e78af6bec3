"""Static validation of the Kubernetes objects that deploy trainyard: no cluster is reachable here, so the
Helm chart is linted and rendered with Helm's own Go library (helm-python-sdk), `kubectl kustomize k8s/`
must build, and every object either path produces must pass kubernetes-validate --strict plus the
platform's own rules (probes, resources, non-root, RBAC scope, NetworkPolicies that still admit the flows
the stack needs). The images and skaffold are in test_deploy_images.py.
"""
from __future__ import annotations

import copy
import re
import subprocess

import helm_python as helm
import pytest
import yaml
from kubernetes import client as k8s

from services.train import k8s_backend as backend
from services.train import runs
from tests.harness.kube import (
    CHART,
    K8S,
    KUBE_VERSION,
    NAMESPACE,
    SERVICES,
    admits,
    docs,
    find,
    job_pod_labels,
    kustomize_with_credentials,
    pod_labels,
    pod_spec,
    render_chart,
    selector_matches,
    validate_strict,
    values_file,
    workloads,
)

TRAIN_JOB = K8S / "train-job.yaml"
SLOW_START = {"train", "benchmark", "inference"}
CONFIG_KEYS = {"TRAINYARD_STORE", "TRAINYARD_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "TRAINYARD_PUSHGATEWAY",
               "TRAINYARD_HOME"}


@pytest.fixture(scope="module")
def train_job() -> dict:
    (job,) = docs(TRAIN_JOB.read_text())
    return job


# ---------------------------------------------------------------- manifests: schema


def test_kustomize_builds_and_validates_strictly(kustomized):
    assert validate_strict(kustomized) == []
    for obj in kustomized:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in kustomized}
    for expected in [("Namespace", NAMESPACE), ("StatefulSet", "trainyard-minio"), ("Job", "trainyard-minio-buckets"),
                     ("Deployment", "trainyard-mlflow"), ("Deployment", "trainyard-prometheus"),
                     ("Deployment", "trainyard-pushgateway"),
                     ("ConfigMap", "trainyard-config"),
                     ("ServiceAccount", "trainyard-train-job"), ("Role", "trainyard-train-jobs")]:
        assert expected in kinds
    # No credentials ship in k8s/: k8s/credentials generates them (test_deploy_security.py).
    assert not [o for o in kustomized if o["kind"] == "Secret"]
    for name in SERVICES:
        for expected in [("Deployment", f"trainyard-{name}"), ("Service", f"trainyard-{name}"),
                         ("ServiceAccount", f"trainyard-{name}")]:
            assert expected in kinds


def test_strict_validation_catches_mistakes(kustomized):
    # Guards every schema check here: a misspelt field and a wrong type must both be reported.
    dep = copy.deepcopy(find(kustomized, "Deployment", "trainyard-render"))
    pod_spec(dep)["containers"][0]["readinesProbe"] = pod_spec(dep)["containers"][0].pop("readinessProbe")
    svc = copy.deepcopy(find(kustomized, "Service", "trainyard-render"))
    svc["spec"]["ports"][0]["port"] = "grpc-port"
    assert len(validate_strict([dep, svc])) == 2


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_chart_lints_and_renders_strictly(variant, rendered):
    values = None if variant == "default" else values_file(f"values-{variant}.yaml")
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    assert validate_strict(rendered[variant]) == []


def test_chart_schema_rejects_bad_values():
    with helm.Chart.load(CHART) as chart:
        for bad in [{"services": {"render": {"replicas": -1}}}, {"services": {"renderr": {}}},
                    {"gpu": {"jobGpus": "two"}}, {"externalMlflow": {"trackingUri": "mlflow:5000"}}]:
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(chart.merge_values(bad))


# ---------------------------------------------------------------- manifests: platform rules


def _check_workloads(objs: list[dict]) -> None:
    for obj in workloads(objs):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        labels = obj["spec"]["template"]["metadata"]["labels"]
        # Training pods are admitted to MinIO/MLflow by their component label instead.
        member = labels.get("app.kubernetes.io/part-of") == "trainyard" or \
            labels.get("app.kubernetes.io/component") == "train-worker"
        assert member, f"{where}: the NetworkPolicies would not admit these pods"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            sc = c.get("securityContext", {})
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(key, {})), f"{where}: {key}"
            image = c["image"]
            assert image.startswith("trainyard-") or (":" in image and not image.endswith(":latest")), image
            if obj["kind"] in ("Deployment", "StatefulSet"):
                assert "readinessProbe" in c and "livenessProbe" in c, where
        is_service = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "service"
        if obj["kind"] == "Deployment" and is_service:
            name = labels["app.kubernetes.io/name"]
            (c,) = spec["containers"]
            probes = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if name in SLOW_START else [])
            for probe in probes:
                assert c[probe].get("grpc", {}).get("port") == 50051, f"{where}: {probe}"
            rest = {8000} if name == "inference" else set()  # inference serves the REST API too
            assert {p["containerPort"] for p in c["ports"]} == {50051, 9090} | rest
            assert c["args"][c["args"].index("--metrics-port") + 1] == "9090"
            assert c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
            refs = {e.get("configMapRef", {}).get("name") or e.get("secretRef", {}).get("name")
                    for e in c["envFrom"]}
            assert refs == {"trainyard-config", "trainyard-s3"}, where
            assert spec["serviceAccountName"] == f"trainyard-{name}"
            assert spec["automountServiceAccountToken"] is (name == "train"), where
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp must be an emptyDir"


def test_kustomize_workloads_follow_platform_rules(kustomized):
    _check_workloads(kustomized)
    assert len([o for o in workloads(kustomized) if o["kind"] == "Deployment"]) == len(SERVICES) + 3


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_chart_workloads_follow_platform_rules(variant, rendered):
    _check_workloads(rendered[variant])


def test_config_and_secret_agree_between_chart_and_kustomize(kustomized, rendered, tmp_path):
    k_cfg = find(kustomized, "ConfigMap", "trainyard-config")["data"]
    h_cfg = find(rendered["default"], "ConfigMap", "trainyard-config")["data"]
    assert k_cfg == h_cfg
    assert set(k_cfg) >= CONFIG_KEYS
    assert k_cfg["TRAINYARD_STORE"] == "s3://trainyard/artifacts"
    assert k_cfg["TRAINYARD_S3_ENDPOINT"] == "trainyard-minio:9000"
    assert k_cfg["MLFLOW_TRACKING_URI"] == "http://trainyard-mlflow:5000"
    assert k_cfg["TRAINYARD_PUSHGATEWAY"] == "trainyard-pushgateway:9091"
    assert k_cfg["TRAINYARD_HOME"] == "/tmp/trainyard"
    keys = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(find(rendered["default"], "Secret", "trainyard-s3")["stringData"]) == keys
    assert set(find(kustomize_with_credentials(tmp_path, "x" * 40), "Secret", "trainyard-s3")["data"]) == keys
    for objs in (kustomized, rendered["default"]):
        # The endpoints the ConfigMap names are Services of the stack.
        for svc, port in [("trainyard-minio", 9000), ("trainyard-mlflow", 5000), ("trainyard-pushgateway", 9091)]:
            assert port in {p["port"] for p in find(objs, "Service", svc)["spec"]["ports"]}
    # Same workloads either way.
    names = lambda objs: {(o["kind"], o["metadata"]["name"]) for o in workloads(objs)}  # noqa: E731
    assert names(kustomized) == names(rendered["default"])


def test_gpu_requests_follow_the_values(rendered):
    def gpu_limited(objs):
        return {o["metadata"]["name"] for o in workloads(objs) for c in pod_spec(o)["containers"]
                if "nvidia.com/gpu" in c["resources"].get("limits", {})}

    def train_env(objs):
        (c,) = pod_spec(find(objs, "Deployment", "trainyard-train"))["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert gpu_limited(rendered["default"]) == set()
    assert train_env(rendered["default"])["TRAINYARD_TRAIN_GPUS"] == "1"
    assert gpu_limited(rendered["gpu"]) == {"trainyard-inference"}
    inference = pod_spec(find(rendered["gpu"], "Deployment", "trainyard-inference"))
    assert inference["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in inference["tolerations"])
    assert train_env(rendered["gpu"])["TRAINYARD_TRAIN_GPUS"] == "1"
    # CPU: nothing mentions a GPU, and Jobs are told to request none.
    cpu_text = yaml.safe_dump_all(rendered["cpu"])
    assert "nvidia.com/gpu" not in cpu_text
    assert train_env(rendered["cpu"])["TRAINYARD_TRAIN_GPUS"] == "0"


def test_external_minio_and_mlflow_replace_the_bundled_ones():
    objs = render_chart({"minio": {"enabled": False}, "mlflow": {"enabled": False},
                    "externalS3": {"endpoint": "s3.example.internal:443", "secure": True},
                    "externalMlflow": {"trackingUri": "https://mlflow.example.internal"},
                    "s3": {"create": False}})
    assert validate_strict(objs) == []
    names = {o["metadata"]["name"] for o in objs}
    assert not names & {"trainyard-minio", "trainyard-minio-headless", "trainyard-minio-buckets", "trainyard-mlflow",
                        "trainyard-mlflow-data", "trainyard-minio-api"}
    assert "trainyard-s3" not in names  # supplied by the operator
    cfg = find(objs, "ConfigMap", "trainyard-config")["data"]
    assert cfg["TRAINYARD_S3_ENDPOINT"] == "s3.example.internal:443"
    assert cfg["TRAINYARD_S3_SECURE"] == "true"
    assert cfg["MLFLOW_TRACKING_URI"] == "https://mlflow.example.internal"
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="externalS3.endpoint"):
        chart.render({"minio": {"enabled": False}}, name="trainyard", namespace=NAMESPACE)


def test_disabled_service_disappears_everywhere():
    objs = render_chart({"services": {"benchmark": {"enabled": False}}})
    gone = {"trainyard-benchmark", "trainyard-benchmark-metrics"}
    assert not [o for o in objs if o["metadata"]["name"] in gone]
    prom = yaml.safe_load(find(objs, "ConfigMap", "trainyard-prometheus-config")["data"]["prometheus.yml"])
    assert "trainyard-benchmark-metrics" not in prom["scrape_configs"][0]["dns_sd_configs"][0]["names"]


def _check_rbac(objs: list[dict]) -> None:
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [o for o in objs if o["kind"] == "Role"]
    bindings = [o for o in objs if o["kind"] == "RoleBinding"]
    assert [r["metadata"]["name"] for r in roles] == ["trainyard-train-jobs"]
    rules = {(g, res): set(rule["verbs"]) for rule in roles[0]["rules"]
             for g in rule["apiGroups"] for res in rule["resources"]}
    assert rules == {("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
                     ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get"}}
    assert len(bindings) == 1 and bindings[0]["roleRef"]["name"] == "trainyard-train-jobs"
    assert [(s["kind"], s["name"], s["namespace"]) for s in bindings[0]["subjects"]] == [
        ("ServiceAccount", "trainyard-train", NAMESPACE)]
    job_sa = find(objs, "ServiceAccount", "trainyard-train-job")
    assert job_sa["automountServiceAccountToken"] is False
    # Only the train service's pods carry an API token.
    for obj in workloads(objs):
        spec = pod_spec(obj)
        if spec.get("automountServiceAccountToken") is not False:
            assert spec.get("serviceAccountName") == "trainyard-train", obj["metadata"]["name"]


def test_rbac_is_scoped_to_the_train_service(kustomized, rendered):
    _check_rbac(kustomized)
    _check_rbac(rendered["default"])


def _check_network_flows(objs: list[dict]) -> None:
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    # As services/train/k8s_backend.py labels the training pods with the settings the train service is given (no
    # part-of label there).
    job_pod = job_pod_labels(objs)
    stranger = {"app": "something-else"}
    svc = {n: pod_labels(objs, "Deployment", f"trainyard-{n}") for n in SERVICES}
    minio = pod_labels(objs, "StatefulSet", "trainyard-minio")
    mlflow = pod_labels(objs, "Deployment", "trainyard-mlflow")
    prom = pod_labels(objs, "Deployment", "trainyard-prometheus")
    push = pod_labels(objs, "Deployment", "trainyard-pushgateway")
    buckets = pod_labels(objs, "Job", "trainyard-minio-buckets")
    # Ingress is denied by default to every pod of the stack.
    deny = [p for p in policies if not p["spec"].get("ingress")]
    for pod in [*svc.values(), minio, mlflow, prom, push, buckets, job_pod]:
        assert any(selector_matches(p["spec"]["podSelector"], pod) for p in deny), pod
    needed = [(svc["train"], minio, 9000), (job_pod, minio, 9000), (mlflow, minio, 9000),
              (buckets, minio, 9000), (svc["train"], mlflow, 5000), (job_pod, mlflow, 5000),
              (job_pod, push, 9091), (prom, push, 9091), (job_pod, job_pod, 29500),
              (svc["benchmark"], svc["inference"], 50051)]
    needed += [(prom, svc[n], 9090) for n in SERVICES]
    for src, dst, port in needed:
        assert admits(policies, src, dst, port), f"{src} -> {dst}:{port} is blocked"
    blocked = [(stranger, minio, 9000), (svc["train"], job_pod, 29500), (stranger, mlflow, 5000),
               (svc["render"], svc["train"], 9090),
               (stranger, svc["train"], 50051), (svc["render"], minio, 9001), (stranger, prom, 9090)]
    for src, dst, port in blocked:
        assert not admits(policies, src, dst, port), f"{src} -> {dst}:{port} should be blocked"
    # Other namespaces reach inference only when labelled as its clients, and nothing else at all; a
    # cluster-wide Prometheus in `monitoring` scrapes the metrics ports.
    client_ns = {"trainyard.io/inference-client": "true"}
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert admits(policies, stranger, svc["inference"], 50051, same_namespace=False, src_namespace=client_ns)
    assert not admits(policies, stranger, svc["inference"], 50051, same_namespace=False)
    assert not admits(policies, stranger, svc["inference"], 50051, same_namespace=False, src_namespace=monitoring)
    assert not admits(policies, stranger, svc["train"], 50051, same_namespace=False, src_namespace=client_ns)
    for n in SERVICES:
        assert admits(policies, stranger, svc[n], 9090, same_namespace=False, src_namespace=monitoring), n
        assert not admits(policies, stranger, svc[n], 9090, same_namespace=False, src_namespace=client_ns), n
        assert not admits(policies, stranger, svc[n], 9090, same_namespace=False), n


def test_network_policies_admit_only_the_needed_flows(kustomized, rendered):
    _check_network_flows(kustomized)
    _check_network_flows(rendered["default"])


def test_prometheus_config_is_valid_and_scrapes_every_service(kustomized, rendered, tmp_path):
    for label, objs in (("k8s", kustomized), ("chart", rendered["default"])):
        text = find(objs, "ConfigMap", "trainyard-prometheus-config")["data"]["prometheus.yml"]
        cfg = tmp_path / f"{label}.yml"
        cfg.write_text(text)
        out = subprocess.run(["promtool", "check", "config", "--syntax-only", str(cfg)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        prom = yaml.safe_load(text)
        jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
        sd = jobs["trainyard-services"]["dns_sd_configs"][0]
        assert sorted(sd["names"]) == sorted(f"trainyard-{n}-metrics" for n in SERVICES) and sd["port"] == 9090
        # Each target's `service` label is the service's short name, as the dashboards and alerts expect.
        (relabel,) = jobs["trainyard-services"]["relabel_configs"]
        assert relabel["target_label"] == "service"
        for name in sd["names"]:
            assert re.fullmatch(relabel["regex"], f"{name}.{NAMESPACE}.svc.cluster.local")[1] in SERVICES
        for n in SERVICES:
            headless = find(objs, "Service", f"trainyard-{n}-metrics")["spec"]
            assert headless["clusterIP"] == "None" and headless["ports"][0]["port"] == 9090
        assert jobs["pushgateway"]["honor_labels"] is True


# ---------------------------------------------------------------- the training Job (owned by train)


def test_train_job_manifest(train_job, kustomized):
    assert validate_strict([train_job]) == []
    assert train_job["kind"] == "Job"
    assert train_job["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    assert isinstance(train_job["spec"].get("backoffLimit"), int)
    spec = pod_spec(train_job)
    assert spec["serviceAccountName"] == "trainyard-train-job"
    find(kustomized, "ServiceAccount", "trainyard-train-job")
    text = yaml.safe_dump(train_job)
    assert "trainyard-config" in text and "trainyard-s3" in text
    assert any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in spec["containers"])
    # The namespace enforces the restricted Pod Security level and the NetworkPolicies admit only
    # part-of=trainyard pods to MinIO/MLflow: the Job's pods must meet both.
    with_ns = copy.deepcopy(train_job)
    with_ns["metadata"]["name"] = "train-job"
    _check_workloads([with_ns])


def test_backend_jobs_fit_the_namespace(kustomized):
    # The Jobs the train service creates must pass the namespace's rules (restricted Pod Security,
    # NetworkPolicies) and find the multi-pod rendezvous Service these manifests provide.
    record = runs.RunRecord(run_id="r1", backend="kubernetes", config_yaml="{}", overrides=[], replicas=2,
                            experiment="mnist", model="x", epochs=1, created=0.0)
    job = k8s.ApiClient().sanitize_for_serialization(backend.build_job(record, backend.JobSettings()))
    assert validate_strict([job]) == []
    _check_workloads([job])
    spec = pod_spec(job)
    assert spec["serviceAccountName"] == "trainyard-train-job"
    workers = find(kustomized, "Service", spec["subdomain"])["spec"]
    assert workers["clusterIP"] == "None" and workers["publishNotReadyAddresses"] is True
    pod = job["spec"]["template"]["metadata"]["labels"]
    assert selector_matches({"matchLabels": workers["selector"]}, pod)
    assert backend.RENDEZVOUS_PORT in {p["port"] for p in workers["ports"]}
    policies = [o for o in kustomized if o["kind"] == "NetworkPolicy"]
    for dst_kind, dst, port in [("StatefulSet", "trainyard-minio", 9000), ("Deployment", "trainyard-mlflow", 5000),
                                ("Deployment", "trainyard-pushgateway", 9091)]:
        assert admits(policies, pod, pod_labels(kustomized, dst_kind, dst), port), dst
    assert admits(policies, pod, pod, backend.RENDEZVOUS_PORT)
