"""`k8s/train-job.yaml` is the Job the kubernetes backend builds for the same config, names and ids aside,
and both are valid Kubernetes objects."""
from pathlib import Path

import yaml
from kubernetes import client as k8s

from services.train.config import parse_train_config
from services.train.k8s_backend import CONFIG_ENV, RUN_ID_LABEL, JobSettings, build_job
from services.train.runs import RunRecord
from shared.config import load_yaml

MANIFEST = Path(__file__).resolve().parent.parent / "k8s" / "train-job.yaml"


def _normalise(job: dict, run_id: str) -> dict:
    """The object with its run id and image replaced by placeholders: those are what legitimately differ."""
    text = yaml.safe_dump(job, sort_keys=True).replace(run_id, "<run-id>")
    out = yaml.safe_load(text)
    out["spec"]["template"]["spec"]["containers"][0]["image"] = "<image>"
    return out


def test_train_job_yaml_matches_the_backend():
    manifest = yaml.safe_load(MANIFEST.read_text())
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    config_yaml = {e["name"]: e.get("value") for e in container["env"]}[CONFIG_ENV]
    config = parse_train_config(load_yaml(config_yaml))
    assert config.model.name == "mnist_ultralight" and config.device == "cuda"
    run_id = manifest["metadata"]["labels"][RUN_ID_LABEL]
    record = RunRecord(run_id=f"{run_id}x", backend="kubernetes", config_yaml=config_yaml, overrides=[], replicas=1,
                       experiment=config.experiment, model=config.model.name, epochs=config.epochs, created=0.0)
    built = k8s.ApiClient().sanitize_for_serialization(build_job(record, JobSettings(image="some/registry:tag")))
    assert _normalise(built, f"{run_id}x") == _normalise(manifest, run_id)
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert manifest["spec"]["backoffLimit"] >= 1
    assert {"configMapRef": {"name": "trainyard-config"}} in container["envFrom"]
    assert {"secretRef": {"name": "trainyard-s3"}} in container["envFrom"]


def test_train_job_yaml_and_built_jobs_pass_strict_validation(tmp_path):
    import kubernetes_validate

    manifest = yaml.safe_load(MANIFEST.read_text())
    config_yaml = manifest["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    for replicas in (1, 2):
        record = RunRecord(run_id="validate-me", backend="kubernetes", config_yaml=config_yaml, overrides=["epochs=1"],
                           replicas=replicas, experiment="x", model="mnist_ultralight", epochs=1, created=0.0)
        built = k8s.ApiClient().sanitize_for_serialization(build_job(record, JobSettings()))
        kubernetes_validate.validate(built, "1.33", strict=True)
    kubernetes_validate.validate(manifest, "1.33", strict=True)
