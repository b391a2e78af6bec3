"""Studies end to end against real MLflow and S3 servers, with real worker processes: a spec fans out into
trials, a broken trial fails with its reason while the rest finish, a killed trial resumes from its
checkpoint, submitting again starts nothing, and the report rebuilt from MLflow alone is the one written."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from services.train import checkpoint as ckpt
from services.train.server import build_manager
from services.train.studies.manager import StudyManager
from services.train.studies.report import report_from_mlflow
from services.train.studies.spec import expand_grid, load_spec, study_id
from shared.errors import InvalidArgument
from shared.storage import open_store

SPEC = """
name: study-test
base_config:
  experiment: ignored-the-study-names-it
  model: {name: mnist_ultralight}
  data: {kind: synthetic, train_size: 640, val_size: 128, test_size: 128}
  epochs: 3
  batch_size: 64
  optimizer: {name: adamw, lr: 0.002}
grid:
  model.name: [mnist_ultralight, mnist_cake, mobilenetv3_small_050]
  data.subset: [256, 512]
  seed: [0, 1]
linked:
  model.name:
    mnist_ultralight: {model.kwargs: {batchnorm: true}}
    mnist_cake: {model.kwargs: {batchnorm: true}}
parallelism: 2
failure_budget: 1
benchmark: {batch_sizes: [1, 16], iterations: 10, throughput_seconds: 0.2}
"""


def _trial(trials, **axes):
    return next(t for t in trials if all(t.axes[k] == v for k, v in axes.items()))


def _kill_when_trained_an_epoch(home: Path, run_id: str, done: dict) -> None:
    """kill -9 the trial's worker process group once its first epoch is in, mid-run."""
    events, pid_file = home / "runs" / run_id / "events.jsonl", home / "runs" / run_id / "worker.pid"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if events.exists() and '"type": "epoch"' in events.read_text() and pid_file.exists():
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            done["killed"] = True
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_study_fans_out_survives_failure_and_kill_and_reports_from_mlflow(tmp_path, study_env, mlflow_server,
                                                                          s3_store_url):
    home = study_env
    store = open_store(s3_store_url)
    spec = load_spec(SPEC)
    sid = study_id(spec)
    trials = expand_grid(spec, sid)
    assert len(trials) == 12 and len({t.run_id for t in trials}) == 12

    # One trial meets a corrupt checkpoint in the store: it must fail, with the reason, and only it.
    broken = _trial(trials, **{"model.name": "mnist_cake", "data.subset": 512, "seed": 1})
    prefix = ckpt.epoch_prefix(broken.run_id, 1)
    store.publish(prefix, {"model.safetensors": b"not weights", "state.json": b"{}"})
    store.put_bytes(f"{prefix}/model.safetensors", b"tampered after publishing")
    # Another is killed with SIGKILL mid-run: it must resume from its checkpoint and finish.
    killed = _trial(trials, **{"model.name": "mobilenetv3_small_050", "data.subset": 512, "seed": 0})
    kill = {}
    threading.Thread(target=_kill_when_trained_an_epoch, args=(home, killed.run_id, kill), daemon=True).start()

    runs = build_manager(max_concurrent=2)
    studies = StudyManager(runs, store, tracking_uri=mlflow_server.uri, poll_s=0.3)
    record = studies.submit(SPEC)
    assert record.study_id == sid
    record = studies.join(sid, timeout=1500)
    assert record.state == "SUCCEEDED", record.message
    states = {tid: o.state for tid, o in record.outcomes.items()}
    assert states.pop(broken.trial_id) == "FAILED" and set(states.values()) == {"SUCCEEDED"}
    assert "IntegrityError" in record.outcome(broken.trial_id).reason
    assert kill.get("killed") and record.outcome(killed.trial_id).resumes == 1
    killed_events = (home / "runs" / killed.run_id / "events.jsonl").read_text()
    assert '"message": "resumed"' in killed_events

    client = MlflowClient(mlflow_server.uri)
    children = client.search_runs([client.get_experiment_by_name("study-test").experiment_id],
                                  f"tags.mlflow.parentRunId = '{record.parent_run_id}'")
    assert len(children) == 12
    by_trial = {r.data.tags["trainyard.trial"]: r for r in children}
    assert by_trial[broken.trial_id].info.status == "FAILED"
    assert "IntegrityError" in by_trial[broken.trial_id].data.tags["trainyard.failure"]
    finished = by_trial[_trial(trials, **{"model.name": "mnist_cake", "data.subset": 256, "seed": 0}).trial_id]
    assert finished.data.params["model.name"] == "mnist_cake" and finished.data.params["data.subset"] == "256"
    assert finished.data.metrics["bench_latency_p50_ms"] > 0 and finished.data.metrics["test_acc"] >= 0
    # Every trial registered a version of one model named after the study.
    assert len(client.search_model_versions("name='study-test'")) == 11

    # The same spec again: the same study, not one new run.
    n_runs = len(runs.list())
    again = studies.submit(SPEC)
    assert again.study_id == sid and again.state == "SUCCEEDED" and len(runs.list()) == n_runs

    # The report written at the end is exactly the one rebuilt now from MLflow alone.
    written = {name: store.get_bytes(f"studies/{sid}/report/{name}") for name in ("report.md", "report.html")}
    rebuilt = report_from_mlflow(mlflow_server.uri, record.parent_run_id).files()
    assert rebuilt["report.md"] == written["report.md"] and rebuilt["report.html"] == written["report.html"]
    report = written["report.md"].decode()
    assert "failed: IntegrityError" in report and "mobilenetv3_small_050" in report
    assert "(n=2)" in report  # two seeds averaged
    parent = client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["trainyard.study_state"] == "SUCCEEDED"
    assert record.timing["trials_sum_s"] > 0 and record.timing["study_wall_s"] > 0


STUDIES = sorted((Path(__file__).resolve().parent.parent / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_expands(path):
    from services.train.studies.manager import spec_for_submit

    spec = load_spec(spec_for_submit(path.read_text(), str(path)))
    trials = expand_grid(spec, study_id(spec))
    assert trials and len({t.run_id for t in trials}) == len(trials)


def test_spec_validation_and_deterministic_expansion():
    spec = load_spec(SPEC)
    first, second = expand_grid(spec, study_id(spec)), expand_grid(load_spec(SPEC), study_id(load_spec(SPEC)))
    assert [t.run_id for t in first] == [t.run_id for t in second]
    changed = load_spec(SPEC.replace("seed: [0, 1]", "seed: [0, 2]"))
    assert study_id(changed) != study_id(spec)
    same_trials = {t.trial_id for t in first} & {t.trial_id for t in expand_grid(changed, study_id(changed))}
    assert len(same_trials) == 6  # a trial's id is its overrides: seed 0's trials are the same trials
    bad = yaml.safe_load(SPEC)
    for edit, text in (({"objective": {"metric": "test_acc"}}, "validation"),
                       ({"grid": {"model.name": []}}, "no values"),
                       ({"grid": {"epochs": ["many"]}, "linked": {}}, "epochs"),
                       ({"linked": {"model.name": {"resnet50": {"epochs": 2}}}}, "not on grid axis"),
                       ({"report": {"columns": ["nonsense"]}}, "unknown report columns")):
        with pytest.raises(InvalidArgument, match=text):
            expand_grid(s := load_spec(yaml.safe_dump({**bad, **edit})), study_id(s))


def test_kubernetes_trial_jobs_are_labelled_and_strictly_valid():
    from kubernetes import client as k8s

    from services.train import k8s_backend
    from services.train.runs import RunRecord
    from services.train.studies.manager import LABEL_STUDY, LABEL_TRIAL
    from tests.harness.kube import validate_strict

    spec = load_spec(SPEC)
    trial = expand_grid(spec, study_id(spec))[0]
    record = RunRecord(run_id=trial.run_id, backend="kubernetes", config_yaml="{}", overrides=[], replicas=1,
                       experiment="study-test", model="m", epochs=3, created=0.0,
                       labels={LABEL_STUDY: study_id(spec), LABEL_TRIAL: trial.trial_id})
    job = k8s.ApiClient().sanitize_for_serialization(k8s_backend.build_job(record, k8s_backend.JobSettings()))
    assert validate_strict([job]) == []
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels[LABEL_STUDY] == study_id(spec) and labels[LABEL_TRIAL] == trial.trial_id
    assert json.dumps(job)  # plain JSON all the way down
