"""The kubernetes backend against a local HTTP server implementing the Job endpoints it uses.

These tests check the exact API requests and how Job and Pod status become run states. They do
not replace a cluster: scheduling, GPUs, image pulls and pod restarts are only shown by a real one.
"""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from kubernetes import client as k8s

from services.train.events import events_key
from services.train.k8s_backend import CONFIG_ENV, JobSettings, KubernetesBackend, build_job, job_name
from services.train.runs import RunManager
from shared.errors import FailedPrecondition
from shared.storage import open_store
from tests.harness.fake_kube import FakeKubeServer

CONFIG = """\
experiment: mnist
model: {name: mnist_ultralight}
data: {kind: mnist, path: datasets/digits}
epochs: 2
batch_size: 64
"""
NS = "trainyard"


@pytest.fixture
def kube():
    with FakeKubeServer() as server:
        yield server


@pytest.fixture
def manager(kube, tmp_path):
    conf = k8s.Configuration(host=kube.url)
    backend = KubernetesBackend(JobSettings(namespace=NS, image="registry.example/trainyard-train:1.0"),
                                api_client=k8s.ApiClient(conf), store_url=f"file://{tmp_path / 'store'}", poll_s=0.1)
    return RunManager({"kubernetes": backend}, default_backend="kubernetes", root=tmp_path / "runs")


def _job_requests(kube):
    return [(r.method, r.path) for r in kube.state.requests if "/jobs" in r.path]


def test_submit_creates_exactly_the_built_job(kube, manager):
    view = manager.submit(CONFIG, ["optimizer.lr=0.02"], run_id="mnist-k8s-1")
    name = job_name("mnist-k8s-1")
    base = f"/apis/batch/v1/namespaces/{NS}/jobs"
    assert _job_requests(kube) == [("DELETE", f"{base}/{name}"), ("POST", base), ("GET", f"{base}/{name}/status")]
    posted = kube.state.requests[1].body
    settings = manager.backends["kubernetes"].settings
    expected = k8s.ApiClient().sanitize_for_serialization(build_job(view.record, settings))
    assert posted == expected
    container = posted["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/trainyard-train:1.0"
    assert container["args"][:4] == ["-m", "services.train.worker", "--run-id", "mnist-k8s-1"]
    assert container["args"][-2:] == ["--set", "optimizer.lr=0.02"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e.get("value") for e in container["env"]}[CONFIG_ENV] == CONFIG
    assert posted["metadata"]["labels"]["trainyard.dev/run-id"] == "mnist-k8s-1"
    assert view.state == "QUEUED"


def unschedulable_pod(job: str, suffix: str) -> dict:
    """A Pending pod of ``job`` that the scheduler cannot place (no free GPU)."""
    return {"metadata": {"name": f"{job}-{suffix}", "labels": {"job-name": job}},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}


def test_job_and_pod_status_become_run_states(kube, manager, tmp_path):
    manager.submit(CONFIG, run_id="mnist-k8s-2")
    name = job_name("mnist-k8s-2")
    kube.state.pods.append(unschedulable_pod(name, "abcde"))
    pending = manager.get("mnist-k8s-2")
    assert pending.state == "QUEUED"
    kube.state.set_status(NS, name, {"active": 1})
    assert manager.get("mnist-k8s-2").state == "RUNNING"

    store = open_store(f"file://{tmp_path / 'store'}")
    events = [{"type": "state", "state": "RUNNING", "ts": 1.0, "mlflow_run_id": "abc"},
              {"type": "epoch", "epoch": 1, "epochs": 2, "metrics": {"val_acc": 0.9, "train_loss": 0.3}}]
    store.put_bytes(events_key("mnist-k8s-2"), "".join(json.dumps(e) + "\n" for e in events).encode())
    view = manager.get("mnist-k8s-2")
    assert (view.state, view.epoch, view.metrics["val_acc"], view.mlflow_run_id) == ("RUNNING", 1, 0.9, "abc")

    kube.state.set_status(NS, name, {"failed": 4, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit"}]})
    failed = manager.get("mnist-k8s-2")
    assert failed.state == "FAILED" and "BackoffLimitExceeded" in failed.message


def test_pending_reason_comes_from_the_pod(kube, manager):
    backend = manager.backends["kubernetes"]
    record = manager.submit(CONFIG, run_id="mnist-k8s-3").record
    name = job_name("mnist-k8s-3")
    kube.state.pods.append(unschedulable_pod(name, "x"))
    status = backend.status(record)
    assert status.phase == "pending" and "Insufficient nvidia.com/gpu" in status.message
    assert any(r.path == f"/api/v1/namespaces/{NS}/pods" and r.query["labelSelector"] == f"job-name={name}"
               for r in kube.state.requests)


def test_watch_follows_the_job_until_it_completes(kube, manager, tmp_path):
    manager.submit(CONFIG, run_id="mnist-k8s-4")
    name = job_name("mnist-k8s-4")
    store = open_store(f"file://{tmp_path / 'store'}")

    def cluster():
        time.sleep(0.5)
        kube.state.set_status(NS, name, {"active": 1})
        time.sleep(0.5)
        store.put_bytes(events_key("mnist-k8s-4"), (json.dumps(
            {"type": "epoch", "epoch": 1, "epochs": 2, "metrics": {"val_acc": 0.5}}) + "\n").encode())
        kube.state.set_status(NS, name, {"active": 1, "ready": 1})
        time.sleep(0.5)
        store.put_bytes(events_key("mnist-k8s-4"), "".join(json.dumps(e) + "\n" for e in [
            {"type": "epoch", "epoch": 1, "epochs": 2, "metrics": {"val_acc": 0.5}},
            {"type": "epoch", "epoch": 2, "epochs": 2, "metrics": {"val_acc": 0.8}},
            {"type": "state", "state": "SUCCEEDED", "ts": 2.0}]).encode())
        kube.state.set_status(NS, name, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})

    threading.Thread(target=cluster, daemon=True).start()
    seen = list(manager.watch("mnist-k8s-4", poll=5))
    states = [item.state for kind, item in seen if kind == "run"]
    epochs = [item["epoch"] for kind, item in seen if kind == "epoch"]
    assert states[0] == "QUEUED" and states[-1] == "SUCCEEDED" and "RUNNING" in states
    assert epochs == [1, 2]
    # it waited on the watch endpoint rather than sleeping blindly
    assert any(r.query.get("watch") in ("true", "True") for r in kube.state.requests)


def test_cancel_deletes_the_job_with_its_pods(kube, manager):
    manager.submit(CONFIG, run_id="mnist-k8s-5")
    kube.state.set_status(NS, job_name("mnist-k8s-5"), {"active": 1})
    view = manager.cancel("mnist-k8s-5")
    delete = [r for r in kube.state.requests if r.method == "DELETE"][-1]
    assert delete.path.endswith(f"/jobs/{job_name('mnist-k8s-5')}")
    assert delete.query["propagationPolicy"] == "Foreground"
    assert view.state == "CANCELLED"
    assert (NS, job_name("mnist-k8s-5")) not in kube.state.jobs


def test_cancel_of_a_job_already_gone_is_not_an_error(kube, manager):
    # The Job may be gone already (TTL controller, an operator's kubectl delete): the delete's 404 means done.
    view = manager.submit(CONFIG, run_id="mnist-k8s-9")
    name = job_name("mnist-k8s-9")
    kube.state._remove(NS, name)
    manager.backends["kubernetes"].cancel(view.record)
    delete = kube.state.requests[-1]
    assert (delete.method, delete.path) == ("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{name}")


def test_replicas_make_an_indexed_job_running_torchrun(manager):
    view = manager.submit(CONFIG, run_id="mnist-k8s-6", replicas=2)
    job = k8s.ApiClient().sanitize_for_serialization(build_job(view.record, JobSettings()))
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    assert "--nnodes=2" in container["args"] and "--node-rank=$(JOB_COMPLETION_INDEX)" in container["args"]
    assert spec["template"]["spec"]["subdomain"] == "trainyard-train-workers"


def test_study_trials_become_labelled_jobs_one_at_a_time_and_cancel_deletes_them(kube, manager, tmp_path,
                                                                                monkeypatch):
    from services.train.studies.manager import LABEL_STUDY, LABEL_TRIAL, StudyManager
    from tests.harness.kube import validate_strict

    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    spec = f"""
name: k8s-study
base_config: {json.dumps({"experiment": "x", "model": {"name": "mnist_ultralight"}, "epochs": 2,
                          "data": {"kind": "mnist", "path": "store:datasets/digits"}})}
grid: {{seed: [0, 1]}}
parallelism: 1
"""
    studies = StudyManager(manager, open_store(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'ml.db'}",
                           poll_s=0.1)
    record = studies.submit(spec, backend="kubernetes")
    first, second = record.trials
    base = f"/apis/batch/v1/namespaces/{NS}/jobs"
    deadline = time.monotonic() + 30
    while ("POST", base) not in _job_requests(kube):
        assert time.monotonic() < deadline, "the study never created its first Job"
        time.sleep(0.05)
    time.sleep(1.0)  # parallelism 1: no second Job may follow while the first one runs
    posts = [r for r in kube.state.requests if r.method == "POST" and r.path == base]
    assert len(posts) == 1
    job = posts[0].body
    assert job["metadata"]["name"] == job_name(first.run_id)
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[LABEL_STUDY] == record.study_id and labels[LABEL_TRIAL] == first.trial_id
    assert validate_strict([job]) == []
    config = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}[CONFIG_ENV]
    # A pod has its own cores: only local trials get a share of this machine's.
    assert yaml.safe_load(config)["num_threads"] is None

    before = len(kube.state.requests)
    cancelled = studies.cancel(record.study_id)
    assert cancelled.state == "CANCELLED"
    after = [(r.method, r.path) for r in kube.state.requests[before:] if "/jobs" in r.path]
    assert ("DELETE", f"{base}/{job_name(first.run_id)}") in after
    assert not any(job_name(second.run_id) in path for _, path in after)
    assert {t: o.state for t, o in cancelled.outcomes.items()} == {first.trial_id: "CANCELLED",
                                                                    second.trial_id: "CANCELLED"}


def test_resume_waits_for_the_old_jobs_pods_without_blocking_other_calls(kube, manager):
    """Resubmitting an ended run deletes its Job in the foreground and polls until the Job (and with it its pods)
    is gone before creating the next one; other calls are answered meanwhile."""
    kube.state.deletion_delay_s = 1.5  # the old Job's pods take that long to terminate
    manager.submit(CONFIG, run_id="mnist-k8s-7")
    name, base = job_name("mnist-k8s-7"), f"/apis/batch/v1/namespaces/{NS}/jobs"
    kube.state.set_status(NS, name, {"failed": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    assert manager.get("mnist-k8s-7").state == "FAILED"
    before = len(kube.state.requests)

    pool = ThreadPoolExecutor(2)
    try:
        started = time.monotonic()
        resumed = pool.submit(manager.submit, CONFIG, run_id="mnist-k8s-7")
        while not any(r.method == "DELETE" for r in kube.state.requests[before:]):
            assert time.monotonic() - started < 5, "the resume never deleted the old Job"
            time.sleep(0.02)
        # While the old Job is being deleted: listing, reading and submitting another run are not held up.
        other = pool.submit(lambda: (manager.list(), manager.get("mnist-k8s-7"),
                                     manager.submit(CONFIG, run_id="mnist-k8s-8")))
        other.result(timeout=1.0)
        assert not resumed.done()
        with pytest.raises(FailedPrecondition, match="being launched"):
            manager.submit(CONFIG, run_id="mnist-k8s-7")
        view = resumed.result(timeout=10)
        took = time.monotonic() - started
    finally:
        pool.shutdown(wait=False)
    assert 1.4 < took < 5
    assert view.state == "QUEUED" and kube.state.jobs[(NS, name)]["status"] == {}
    calls = [(r.method, r.path, r.query.get("propagationPolicy")) for r in kube.state.requests[before:]
             if r.path == f"{base}/{name}" or (r.method == "POST" and r.body["metadata"]["name"] == name)]
    delete, *polls, create = calls
    assert delete == ("DELETE", f"{base}/{name}", "Foreground")
    assert len(polls) >= 2 and set(polls) == {("GET", f"{base}/{name}", None)}
    assert create[:2] == ("POST", base)
