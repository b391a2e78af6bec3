"""Issue 15 item 5: the chart follows Helm's conventions and the kustomize tree has cpu/gpu overlays.

Two releases share a namespace (the fullname helper; every name, selector and reference stays within its release,
the training Jobs' included), labels carry the app version, image tags default to the chart's appVersion, the
inference service gets an optional PodDisruptionBudget and HorizontalPodAutoscaler, a ServiceMonitor is optional,
every service takes affinity, tolerations, pod annotations and pull secrets, NOTES.txt tells what was installed,
and the chart README's values table is the schema's. Everything is rendered by Helm's Go library, built by
`kubectl kustomize`, and validated strictly (kubernetes-validate; prometheus-operator's CRD schemas for the
ServiceMonitor and the PrometheusRule).
"""
from __future__ import annotations

import copy
import re
import tomllib

import helm_python as helm
import pytest
import yaml

from tests.harness.kube import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    OVERLAYS,
    ROOT,
    SERVICES,
    admits,
    chart_values,
    find,
    kustomize_overlays,
    pod_spec,
    readme_table,
    render_chart,
    render_notes,
    selector_matches,
    train_job,
    validate_strict,
    values_file,
    values_files,
    values_table,
    workloads,
)

APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
# Every optional object and setting on: what strict validation must also accept.
EVERYTHING = {
    "repositoryControl": {"enabled": True},
    "tls": {"enabled": True, "secretName": ""},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "grafanaDashboards": {"enabled": True, "labels": {"grafana_dashboard": "1"}, "annotations": {}},
    "services": {
        "inference": {"gpu": True, "pdb": {"enabled": True, "maxUnavailable": "50%"},
                      "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6,
                                      "targetCPUUtilizationPercentage": 60},
                      "nodeSelector": {"pool": "inference"}, "podAnnotations": {"example.com/team": "vision"},
                      "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference",
                                       "effect": "NoSchedule"}],
                      "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                          {"weight": 100, "podAffinityTerm": {
                              "topologyKey": "kubernetes.io/hostname",
                              "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "inference"}}}}]}},
                      "imagePullSecrets": [{"name": "registry-creds"}]},
        "train": {"imagePullSecrets": [{"name": "registry-creds"}]},
    },
}


def _labels(obj: dict) -> dict:
    return obj["metadata"].get("labels", {})


def _job_pod(objs: list[dict]) -> dict:
    """The pod labels of another run's training Job."""
    return train_job(objs, run_id="other")["spec"]["template"]["metadata"]["labels"]


def _full(objs: list[dict], part: str) -> str:
    """The name of the release's object `part` (<fullname>-<part>), from its ConfigMap's."""
    (cfg,) = [o for o in objs if o["kind"] == "ConfigMap" and _labels(o)["app.kubernetes.io/name"] == "config"]
    return cfg["metadata"]["name"].removesuffix("-config") + f"-{part}"


def _pods(objs: list[dict]) -> list[dict]:
    """The pod labels of every workload, and of a training Job the release's train service would create."""
    return [w["spec"]["template"]["metadata"]["labels"] for w in workloads(objs)] + \
        [train_job(objs)["spec"]["template"]["metadata"]["labels"]]


def _selector(obj: dict) -> dict | None:
    """An object's pod selector, as matchLabels."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Service":
        return {"matchLabels": spec["selector"]} if spec.get("selector") else None
    if kind in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
        return spec["selector"]
    if kind == "NetworkPolicy":
        return spec["podSelector"]
    return None


def _hosts(objs: list[dict]) -> set[str]:
    """Every host name the release's pods are told to reach (endpoints, scrape targets, URLs in env and args)."""
    hosts: set[str] = set()
    for obj in objs:
        if obj["kind"] == "ConfigMap" and "prometheus.yml" in obj.get("data", {}):
            prom = yaml.safe_load(obj["data"]["prometheus.yml"])
            for job in prom["scrape_configs"]:
                for sd in job.get("dns_sd_configs", []):
                    hosts |= set(sd["names"])
                for static in job.get("static_configs", []):
                    hosts |= {t.split(":")[0] for t in static["targets"]} - {"localhost"}
        elif obj["kind"] == "ConfigMap" and _labels(obj)["app.kubernetes.io/name"] == "config":
            for key in ("TRAINYARD_S3_ENDPOINT", "MLFLOW_TRACKING_URI", "TRAINYARD_PUSHGATEWAY"):
                value = obj["data"][key]
                hosts.add(re.sub(r"^https?://", "", value).split(":")[0])
    for w in workloads(objs):
        for c in pod_spec(w)["containers"]:
            text = " ".join([*c.get("args", []), *(e.get("value", "") for e in c.get("env", []))])
            hosts |= set(re.findall(r"https?://([a-z0-9-]+):\d+", text))
    return hosts


def _references(objs: list[dict]) -> set[tuple[str, str]]:
    """(kind, name) of every object the release's objects name, its training Jobs' included."""
    refs: set[tuple[str, str]] = {("Service", h) for h in _hosts(objs)}
    for obj in [*objs, train_job(objs)]:
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind == "StatefulSet":
            refs.add(("Service", spec["serviceName"]))
        if kind == "RoleBinding":
            refs.add((obj["roleRef"]["kind"], obj["roleRef"]["name"]))
            refs |= {(s["kind"], s["name"]) for s in obj["subjects"]}
        if kind == "HorizontalPodAutoscaler":
            refs.add((spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"]))
        if kind not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = pod_spec(obj)
        if "serviceAccountName" in pod:  # else the namespace's `default`, which always exists
            refs.add(("ServiceAccount", pod["serviceAccountName"]))
        if pod.get("subdomain"):
            refs.add(("Service", pod["subdomain"]))
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                refs.add(("ConfigMap", volume["configMap"]["name"]))
            if "secret" in volume:
                refs.add(("Secret", volume["secret"]["secretName"]))
            if "persistentVolumeClaim" in volume:
                refs.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]))
        for c in pod["containers"]:
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    refs.add(("ConfigMap", source["configMapRef"]["name"]))
                if "secretRef" in source:
                    refs.add(("Secret", source["secretRef"]["name"]))
            for env in c.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    refs.add(("Secret", env["valueFrom"]["secretKeyRef"]["name"]))
    return refs


# ---------------------------------------------------------------- two releases, one namespace


@pytest.fixture(scope="module")
def releases() -> dict[str, list[dict]]:
    # "trainyard" names its objects trainyard-*, "team-b" team-b-trainyard-*; both with every optional object.
    return {name: render_chart(EVERYTHING, release=name) for name in ("trainyard", "team-b")}


def test_two_releases_share_a_namespace_without_colliding(releases):
    a, b = releases["trainyard"], releases["team-b"]
    for objs in (a, b):
        assert validate_strict(objs) == []
    names = {name: {(o["kind"], o["metadata"]["name"]) for o in objs} for name, objs in releases.items()}
    assert names["trainyard"] & names["team-b"] == set()
    assert ("StatefulSet", "trainyard-minio") in names["trainyard"]
    assert ("StatefulSet", "team-b-trainyard-minio") in names["team-b"]
    # Their training Jobs cannot meet either: another name for the same run id.
    assert train_job(a)["metadata"]["name"] != train_job(b)["metadata"]["name"]
    # No selector of one release picks a pod of the other, and every workload's selector picks its own pods.
    for mine, theirs in ((a, b), (b, a)):
        for obj in mine:
            selector = _selector(obj)
            if selector is None or selector == {}:
                continue
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            assert not [p for p in _pods(theirs) if selector_matches(selector, p)], where
            if obj["kind"] in ("Service", "Deployment", "StatefulSet", "PodDisruptionBudget"):
                assert [p for p in _pods(mine) if selector_matches(selector, p)], f"{where} selects nothing"


def test_every_reference_resolves_within_its_release(releases):
    for release, objs in releases.items():
        own = {(o["kind"], o["metadata"]["name"]) for o in objs}
        refs = _references(objs)
        tls = {("Secret", f"{'trainyard' if release == 'trainyard' else 'team-b-trainyard'}-tls")}
        # The TLS Secret is the operator's (cert-manager's): named after the release, not created by the chart.
        assert tls <= refs
        assert refs - tls <= own, f"{release}: {sorted(refs - tls - own)}"
        # The ones the services and Jobs depend on are among them.
        for kind, part in [("ConfigMap", "config"), ("Secret", "s3"), ("Secret", "repository-token"),
                           ("ServiceAccount", "train-job"), ("Service", "train-workers"), ("Service", "minio"),
                           ("Service", "mlflow"), ("Service", "pushgateway"), ("Service", "render-metrics")]:
            prefix = "trainyard" if release == "trainyard" else "team-b-trainyard"
            assert (kind, f"{prefix}-{part}") in refs, (release, kind, part)


def test_training_jobs_reach_only_their_own_release(releases):
    a, b = releases["trainyard"], releases["team-b"]
    for mine, theirs in ((a, b), (b, a)):
        job = train_job(mine)
        assert validate_strict([job]) == []
        pod = job["spec"]["template"]["metadata"]["labels"]
        # Pod 0 is reachable for the rendezvous through the release's own headless Service.
        workers = find(mine, "Service", pod_spec(job)["subdomain"])["spec"]
        assert selector_matches({"matchLabels": workers["selector"]}, pod)
        assert f".{pod_spec(job)['subdomain']}" in " ".join(pod_spec(job)["containers"][0]["args"])
        # Indexed Jobs' pod hostnames (<job>-<index>) fit a DNS label even for the longest run id.
        longest = train_job(mine, run_id="r" * 42)["metadata"]["name"]
        assert len(f"{longest}-99") <= 63, longest
        for objs, allowed in ((mine, True), (theirs, False)):
            policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
            for kind, part, port in [("StatefulSet", "minio", 9000), ("Deployment", "mlflow", 5000),
                                     ("Deployment", "pushgateway", 9091)]:
                (dst,) = [o for o in objs if o["kind"] == kind and _labels(o)["app.kubernetes.io/name"] == part]
                assert admits(policies, pod, dst["spec"]["template"]["metadata"]["labels"], port) is allowed
            assert admits(policies, pod, _job_pod(objs), 29500) is allowed
        # And a service of one release cannot call another release's services.
        policies = [o for o in theirs if o["kind"] == "NetworkPolicy"]
        render = find(mine, "Deployment", _full(mine, "render"))["spec"]["template"]["metadata"]["labels"]
        inference = find(theirs, "Deployment", _full(theirs, "inference"))["spec"]["template"]["metadata"]["labels"]
        assert not admits(policies, render, inference, 50051)


def test_train_service_refuses_job_settings_it_does_not_know():
    # A chart and a train service that disagree on a setting's name fail at start-up, not on the first Job.
    from services.train import server
    from shared.errors import InvalidArgument

    for bad, match in [('{"config_mapp": "x"}', "config_mapp"), ("[1]", "JSON object"), ("{", "not JSON")]:
        with pytest.raises(InvalidArgument, match=match):
            server.parse_args([], {"TRAINYARD_TRAIN_JOB_SETTINGS": bad})
    _, settings = server.parse_args([], {"TRAINYARD_TRAIN_JOB_SETTINGS": '{"name_prefix": "b-"}'})
    assert settings.name_prefix == "b-" and settings.config_map == "trainyard-config"


def test_fullname_follows_the_release_and_the_overrides():
    def minio(values=None, release="trainyard"):
        return [o["metadata"]["name"] for o in render_chart(values, release=release) if o["kind"] == "StatefulSet"]

    assert minio(release="trainyard-staging") == ["trainyard-staging-minio"]  # already holds the chart's name
    assert minio(release="ml") == ["ml-trainyard-minio"]
    assert minio({"fullnameOverride": "vision"}, release="ml") == ["vision-minio"]
    assert minio({"nameOverride": "yard"}, release="ml") == ["ml-yard-minio"]
    # The longest release name Helm allows still gives valid names everywhere.
    assert validate_strict(render_chart(release="r" * 53)) == []


# ---------------------------------------------------------------- every values file, strictly


@pytest.mark.parametrize("name", values_files())
def test_every_values_file_lints_and_renders_strictly(name):
    values = values_file(name)
    for extra in (None, EVERYTHING):
        merged = copy.deepcopy(values) if extra is None else _merge(values, extra)
        report = helm.lint(CHART, merged, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
        objs = render_chart(merged)
        assert validate_strict(objs) == [], name


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def test_strict_validation_catches_mistakes_in_a_service_monitor():
    (monitor,) = [o for o in render_chart(EVERYTHING) if o["kind"] == "ServiceMonitor"]
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["intervall"] = bad["spec"]["endpoints"][0].pop("interval")
    bad["metadata"]["lables"] = {}
    wrong_type = copy.deepcopy(monitor)
    wrong_type["spec"]["endpoints"][0]["port"] = 9090
    problems = validate_strict([bad, wrong_type])
    assert len(problems) == 3 and any("intervall" in p for p in problems) and any("lables" in p for p in problems)


# ---------------------------------------------------------------- labels, images, scheduling


def test_labels_carry_the_app_version_and_selectors_do_not(rendered):
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == APP_VERSION
    chart = f"trainyard-{yaml.safe_load((CHART / 'Chart.yaml').read_text())['version']}"
    for obj in rendered["default"]:
        labels = _labels(obj)
        assert labels.get("app.kubernetes.io/version") == APP_VERSION, obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        assert labels.get("helm.sh/chart") == chart
        selector = _selector(obj)
        if selector:
            assert "app.kubernetes.io/version" not in selector.get("matchLabels", {})


def test_service_images_default_to_the_app_version(rendered):
    for objs in rendered.values():
        for name in SERVICES:
            (c,) = pod_spec(find(objs, "Deployment", f"trainyard-{name}"))["containers"]
            assert c["image"] == f"trainyard-{name}:{APP_VERSION}"
    objs = render_chart({"services": {"train": {"image": {"repository": "registry.example/trainyard-train",
                                                            "tag": "abc123"}}}})
    (c,) = pod_spec(find(objs, "Deployment", "trainyard-train"))["containers"]
    assert c["image"] == "registry.example/trainyard-train:abc123"
    # The training Jobs run the same image as the service that launches them.
    assert train_job(objs)["spec"]["template"]["spec"]["containers"][0]["image"] == c["image"]
    assert train_job(rendered["default"])["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"trainyard-train:{APP_VERSION}"


def test_scheduling_and_pod_settings_per_service():
    objs = render_chart(_merge(values_file("values-gpu.yaml"), EVERYTHING))
    inference = find(objs, "Deployment", "trainyard-inference")
    spec = pod_spec(inference)
    # The service's own settings, and a GPU service's GPU node selector and toleration beside them.
    assert spec["nodeSelector"] == {"pool": "inference", "nvidia.com/gpu.present": "true"}
    assert {t["key"] for t in spec["tolerations"]} == {"dedicated", "nvidia.com/gpu"}
    assert spec["affinity"] == EVERYTHING["services"]["inference"]["affinity"]
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert inference["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "vision"}
    # Nothing leaks to the other services.
    render = pod_spec(find(objs, "Deployment", "trainyard-render"))
    assert not {"nodeSelector", "tolerations", "affinity", "imagePullSecrets"} & set(render)
    assert "annotations" not in find(objs, "Deployment", "trainyard-render")["spec"]["template"]["metadata"]
    # The train service's pull secrets also let its Jobs pull the same image; GPU Jobs go to the GPU nodes.
    assert find(objs, "ServiceAccount", "trainyard-train-job")["imagePullSecrets"] == [{"name": "registry-creds"}]
    job = pod_spec(train_job(objs))
    assert job["serviceAccountName"] == "trainyard-train-job"
    assert job["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert job["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu_job = pod_spec(train_job(render_chart(values_file("values-cpu.yaml"))))
    assert "nodeSelector" not in cpu_job and "nvidia.com/gpu" not in cpu_job["containers"][0]["resources"]["limits"]


def test_inference_pdb_and_autoscaler():
    objs = render_chart(EVERYTHING)
    inference = find(objs, "Deployment", "trainyard-inference")
    pods = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(objs)]
    pdb = find(objs, "PodDisruptionBudget", "trainyard-inference")["spec"]
    assert pdb["maxUnavailable"] == "50%" and "minAvailable" not in pdb
    assert [p for p in pods if selector_matches(pdb["selector"], p)] == \
        [inference["spec"]["template"]["metadata"]["labels"]]
    hpa = find(objs, "HorizontalPodAutoscaler", "trainyard-inference")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "trainyard-inference"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    # The autoscaler owns the replica count; the other services keep theirs.
    assert "replicas" not in inference["spec"]
    assert find(objs, "Deployment", "trainyard-render")["spec"]["replicas"] == 1
    min_available = render_chart({"services": {"inference": {"pdb": {"enabled": True, "minAvailable": 1,
                                                                       "maxUnavailable": None}}}})
    assert find(min_available, "PodDisruptionBudget", "trainyard-inference")["spec"]["minAvailable"] == 1
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmError, match="not both"):
        chart.render({"services": {"inference": {"pdb": {"enabled": True, "minAvailable": 1}}}},
                     name="trainyard", namespace=NAMESPACE)
    # Off by default.
    kinds = {o["kind"] for o in render_chart()}
    assert not kinds & {"PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"}


def test_service_monitor_scrapes_every_service_of_its_release(releases):
    for release, objs in releases.items():
        (monitor,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
        assert _labels(monitor)["release"] == "kube-prometheus-stack"
        spec = monitor["spec"]
        assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        picked = [o for o in objs if o["kind"] == "Service" and selector_matches(spec["selector"], _labels(o))]
        assert sorted(_labels(s)["app.kubernetes.io/name"] for s in picked) == sorted(SERVICES), release
        (endpoint,) = spec["endpoints"]
        for svc in picked:
            assert svc["spec"]["clusterIP"] == "None"  # every replica is its own target
            assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
        # Targets get the short service name as `service`, as from the bundled Prometheus.
        (relabel,) = endpoint["relabelings"]
        assert relabel == {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_name"],
                           "targetLabel": "service"}
    (monitor,) = [o for o in releases["trainyard"] if o["kind"] == "ServiceMonitor"]
    selector = monitor["spec"]["selector"]
    assert not [o for o in releases["team-b"] if o["kind"] == "Service" and selector_matches(selector, _labels(o))]


# ---------------------------------------------------------------- NOTES.txt and the README


@pytest.mark.parametrize("release", ["trainyard", "team-b"])
def test_notes_name_what_the_release_installed(release):
    values = {"repositoryControl": {"enabled": True}}
    notes = render_notes(values, release=release)
    objs = render_chart(values, release=release)
    services = {o["metadata"]["name"] for o in objs if o["kind"] == "Service"}
    forwarded = [(name, port) for name, ports in re.findall(r"port-forward svc/(\S+)((?: \d+:\d+)+)", notes)
                 for port in re.findall(r":(\d+)", ports)]
    assert {name for name, _ in forwarded} >= {_full(objs, "inference"), _full(objs, "mlflow"), _full(objs, "minio")}
    for name, port in forwarded:
        assert name in services and int(port) in {p["port"] for p in find(objs, "Service", name)["spec"]["ports"]}
    assert (_full(objs, "inference"), "8000") in forwarded  # the REST API
    addresses = re.findall(rf"(\S+)\.{NAMESPACE}\.svc:50051", notes)
    assert sorted(addresses) == sorted(_full(objs, n) for n in SERVICES)
    secrets = set(re.findall(r"secret (\S+) ", notes)) | set(re.findall(r"Secret (\S+)\)", notes))
    assert secrets and secrets <= {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    assert f"{train_job(objs, run_id='x')['metadata']['name'][:-1]}<run id>" in notes
    assert "nvidia.com/gpu" in notes
    assert "on CPU" in render_notes(values_file("values-cpu.yaml"), release=release)


def test_chart_readme_is_the_schema():
    assert readme_table() == values_table(), "charts/trainyard/README.md is stale: python -m tests.harness.kube"
    # Every value the chart has is a row (the schema admits no others), and says what it does.
    rows = re.findall(r"^\| `([^`]+)` \|.*\| (.*) \|$", values_table(), re.M)
    assert all(desc.strip() for _, desc in rows), [path for path, desc in rows if not desc.strip()]
    documented = {path for path, _ in rows}

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict) and value and key not in ("resources", "nodeSelector", "labels"):
                yield from leaves(value, path)
            else:
                yield path

    for path in leaves(chart_values()):
        general = re.sub(r"^services\.(render|convert|train|benchmark)\.", "services.<name>.", path)
        general = re.sub(r"^services\.inference\.(?!serveModels|pdb|autoscaling)", "services.<name>.", general)
        assert path in documented or general in documented, path


# ---------------------------------------------------------------- the kustomize overlays


@pytest.fixture(scope="module")
def overlays(tmp_path_factory) -> dict[str, list[dict]]:
    return kustomize_overlays(tmp_path_factory.mktemp("overlays"))


def test_overlays_build_and_validate_strictly(overlays, kustomized):
    assert sorted(overlays) == OVERLAYS
    for name, objs in overlays.items():
        assert validate_strict(objs) == [], name
        # The stack, its credentials, and the service images pinned to the app version by the images transformer.
        assert find(objs, "Secret", "trainyard-s3")
        assert {(o["kind"], o["metadata"]["name"]) for o in objs} == \
            {(o["kind"], o["metadata"]["name"]) for o in kustomized} | {("Secret", "trainyard-s3")}
        images = {c["image"] for w in workloads(objs) for c in pod_spec(w)["containers"]
                  if c["image"].startswith("trainyard-")}
        assert images == {f"trainyard-{n}:{APP_VERSION}" for n in SERVICES}, name
        # The training Jobs run the train service's own image (the overlay's replacement).
        (train,) = pod_spec(find(objs, "Deployment", "trainyard-train"))["containers"]
        job = train_job(objs)
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == train["image"]
        assert validate_strict([job]) == []


def test_gpu_overlay_puts_training_and_inference_on_gpus(overlays, rendered):
    gpu, chart = overlays["gpu"], rendered["gpu"]
    inference = pod_spec(find(gpu, "Deployment", "trainyard-inference"))
    assert inference["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    # As the chart's values-gpu.yaml does.
    chart_inference = pod_spec(find(chart, "Deployment", "trainyard-inference"))
    assert inference["nodeSelector"] == chart_inference["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert inference["tolerations"] == chart_inference["tolerations"]
    job, chart_job = pod_spec(train_job(gpu)), pod_spec(train_job(chart))
    assert job["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["nodeSelector"] == chart_job["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert [t["key"] for t in job["tolerations"]] == ["nvidia.com/gpu"]
    for name in SERVICES:
        if name != "inference":
            (c,) = pod_spec(find(gpu, "Deployment", f"trainyard-{name}"))["containers"]
            assert "nvidia.com/gpu" not in c["resources"]["limits"]


def test_cpu_overlay_requests_no_gpu(overlays, rendered):
    cpu = overlays["cpu"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu)
    for objs in (cpu, rendered["cpu"]):
        job = pod_spec(train_job(objs))
        assert "nvidia.com/gpu" not in job["containers"][0]["resources"]["limits"]
        assert "tolerations" not in job and "nodeSelector" not in job
