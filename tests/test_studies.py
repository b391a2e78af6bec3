"""Studies end to end against real MLflow and S3 servers, with real worker processes: a spec fans out into
trials, a broken trial fails with its reason while the rest finish, a killed trial resumes from its
checkpoint, submitting again starts nothing, and the report rebuilt from MLflow alone is the one written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
from tests.harness.services import served, train_registrar

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
    # Every benchmarked model's peak memory was measured (our logs had 0.0 MB).
    assert all(r.data.metrics["bench_peak_memory_mb"] > 0 for tid, r in by_trial.items() if tid != broken.trial_id)
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



# A tiny trial: the smallest net, a few hundred generated samples, one epoch, no benchmark.
TINY = """
name: NAME
base_config:
  experiment: the-study-names-it
  model: {name: mnist_ultralight}
  data: {kind: synthetic, train_size: 256, val_size: 64, test_size: 64, train_eval_size: 64}
  epochs: 1
  batch_size: 64
parallelism: 1
benchmark: {enabled: false}
"""


def _tiny(name: str, base: dict | None = None, **fields) -> str:
    """TINY named ``name``, with ``base`` updating its base config and ``fields`` the spec's own."""
    spec = yaml.safe_load(TINY.replace("NAME", name))
    spec["base_config"].update(base or {})
    return yaml.safe_dump({**spec, **fields}, sort_keys=False)


def _children(tracking_uri: str, experiment: str, parent_run_id: str):
    client = MlflowClient(tracking_uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'")


SEARCH = _tiny("study-search", {"epochs": 2, "data": {"kind": "synthetic", "train_size": 512, "val_size": 128,
                                                     "test_size": 64, "train_eval_size": 64}},
               search={"sampler": "random", "seed": 6, "trials": 4,
                       "params": {"optimizer.lr": {"low": 1.0e-6, "high": 3.0e-2, "log": True}},
                       "pruner_warmup_epochs": 0, "pruner_startup_trials": 1})


@pytest.mark.slow
def test_search_samples_distinct_values_in_range_and_prunes_below_the_median(study_env, mlflow_server, s3_store_url):
    # Random sampling with seed 6 asks lr 9.9e-3 first (it completes and sets the median), then 3.1e-5, 4.8e-3
    # and 1.5e-6: a trial that hardly moves its weights trails the median at its first epoch and is pruned.
    studies = StudyManager(build_manager(max_concurrent=1), open_store(s3_store_url), tracking_uri=mlflow_server.uri,
                           poll_s=0.1)
    record = studies.join(studies.submit(SEARCH).study_id, timeout=900)
    assert record.state == "SUCCEEDED", record.message
    lrs = {t.trial_id: t.overrides["optimizer.lr"] for t in record.trials}
    assert len(lrs) == 4 and len(set(lrs.values())) == 4 and [t.number for t in record.trials] == [0, 1, 2, 3]
    assert all(1e-6 <= lr <= 3e-2 for lr in lrs.values())
    best, slowest = max(lrs, key=lrs.get), min(lrs, key=lrs.get)
    assert record.trials[0].trial_id == best and record.outcome(best).state == "SUCCEEDED"
    pruned = record.outcome(slowest)
    assert pruned.state == "PRUNED" and "val_acc below the median of earlier trials" in pruned.reason
    # The pruned trial's run was stopped — or, two epochs being under a second here, had already finished
    # when the cancel came (CI saw that) — and its child run says why.
    assert studies.runs.get(next(t.run_id for t in record.trials if t.trial_id == slowest)).state in (
        "CANCELLED", "SUCCEEDED")
    by_trial = {r.data.tags["trainyard.trial"]: r for r in _children(mlflow_server.uri, "study-search",
                                                                       record.parent_run_id)}
    assert by_trial[slowest].data.tags["trainyard.pruned"] == pruned.reason


def test_search_reports_epochs_prunes_and_carries_on_after_a_restart(tmp_path):
    """The controller's report path into real Optuna: a trial below the completed ones' median at an epoch is
    pruned; a Search rebuilt over the same journal (a restarted service) reports into the trials asked before it
    and asks new values, not the first ones again."""
    import optuna

    from services.train.runs import RunRecord, RunView
    from services.train.studies.manager import StudyRecord
    from services.train.studies.search import Search

    spec = load_spec(SEARCH)
    record = StudyRecord(study_id=study_id(spec), spec=spec)

    def view(trial, *val_accs):
        run = RunRecord(run_id=trial.run_id, backend="local", config_yaml="{}", overrides=[], replicas=1,
                        experiment="x", model="m", epochs=2, created=0.0)
        return RunView(record=run, state="RUNNING", epoch=len(val_accs), epoch_events=[
            {"type": "epoch", "epoch": i, "metrics": {"val_acc": v}} for i, v in enumerate(val_accs, 1)])

    def ask(search):
        [trial] = search.new_trials(record, 0, 1)
        record.trials.append(trial)
        record.outcome(trial.trial_id).state = "RUNNING"
        return trial

    pruned = []
    search = Search(record, tmp_path)
    first = ask(search)
    record.outcome(first.trial_id).state = "SUCCEEDED"
    search.report(record, {first.trial_id: view(first, 0.6, 0.8)}, lambda t, why: pruned.append((t, why)))
    second, third = ask(search), ask(search)

    search = Search(record, tmp_path)  # the service restarted
    fourth = ask(search)
    lrs = [t.overrides["optimizer.lr"] for t in record.trials]
    assert len(set(lrs)) == 4 and all(1e-6 <= lr <= 3e-2 for lr in lrs)
    assert len({t.trial_id for t in record.trials}) == 4 and [t.number for t in record.trials] == [0, 1, 2, 3]
    views = {second.trial_id: view(second, 0.2), third.trial_id: view(third, 0.7), fourth.trial_id: view(fourth)}
    search.report(record, views, lambda t, why: pruned.append((t.trial_id, why)))
    assert pruned == [(second.trial_id, "at epoch 1: val_acc below the median of earlier trials")]
    states = [t.state for t in search.studies[first.search_point].get_trials(deepcopy=False)]
    TS = optuna.trial.TrialState
    assert states == [TS.COMPLETE, TS.PRUNED, TS.RUNNING, TS.RUNNING]
    assert search.studies[first.search_point].best_value == 0.8  # the best epoch of the completed trial


def test_failure_budget_stops_the_study_and_cancels_the_remaining_trials(tmp_path, study_env, mlflow_server,
                                                                       s3_store_url):
    # Both mnist and cifar10 read data.path, which does not exist; only the synthetic trial could train.
    spec = _tiny("study-budget", {"data": {"kind": "synthetic", "path": str(tmp_path / "missing")}},
                 failure_budget=0, grid={"data.kind": ["mnist", "cifar10", "synthetic"]})
    studies = StudyManager(build_manager(max_concurrent=1), open_store(s3_store_url), tracking_uri=mlflow_server.uri,
                           poll_s=0.1)
    record = studies.join(studies.submit(spec).study_id, timeout=300)
    assert record.state == "FAILED"
    assert record.message == "1 trials failed, more than the failure budget of 0"
    first, *rest = record.trials
    assert record.outcome(first.trial_id).state == "FAILED" and "missing" in record.outcome(first.trial_id).reason
    assert [(record.outcome(t.trial_id).state, record.outcome(t.trial_id).reason) for t in rest] == [
        ("CANCELLED", "the study stopped")] * 2
    assert not any(studies.runs.exists(t.run_id) for t in rest)  # parallelism 1: they never started


def test_a_trial_saved_running_without_a_run_is_submitted_again(study_env, mlflow_server, s3_store_url):
    """_submit saves RUNNING before the registry has the run; a service that died in between must not leave the
    trial RUNNING for ever."""
    from services.train.studies.manager import StudyRecord
    from shared.tracking import Tracker

    store, spec = open_store(s3_store_url), load_spec(_tiny("study-lost-submit", grid={"seed": [0, 1]}))
    sid = study_id(spec)
    parent = Tracker(experiment=spec.name, run_name="study", tracking_uri=mlflow_server.uri).start()
    record = StudyRecord(study_id=sid, spec=spec, trials=expand_grid(spec, sid), parent_run_id=parent.run_id)
    first, second = record.trials
    record.outcome(first.trial_id).state = "RUNNING"
    record.outcome(second.trial_id)
    store.put_bytes(f"studies/{sid}/study.json", record.model_dump_json().encode())

    runs = build_manager(max_concurrent=0)  # runs stay queued: nothing trains
    studies = StudyManager(runs, store, tracking_uri=mlflow_server.uri, poll_s=0.05)  # resumes the study
    deadline = time.monotonic() + 30
    while not runs.exists(first.run_id):
        assert time.monotonic() < deadline, "the trial without a run was never submitted"
        time.sleep(0.05)
    time.sleep(0.3)  # parallelism 1: the second trial waits for the first
    assert runs.get(first.run_id).record.labels["trainyard.dev/trial"] == first.trial_id
    assert not runs.exists(second.run_id)
    saved = StudyRecord.model_validate_json(store.get_bytes(f"studies/{sid}/study.json"))
    assert (saved.outcome(first.trial_id).state, saved.outcome(second.trial_id).state) == ("RUNNING", "QUEUED")
    assert studies.cancel(sid).state == "CANCELLED"


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_study_survives_a_kill_9_of_the_train_service(tmp_path, study_env, mlflow_server, s3_store_url):
    """The service dies (SIGKILL) once the first trial has finished; a new one over the same home, store and
    MLflow rebuilds the study, lets the running trial finish, and launches nothing twice."""
    from shared.grpc_client import channel
    from shared.pb import train_pb2, train_pb2_grpc
    from tests.harness import ManagedProcess, free_ports, tcp_probe

    port, metrics_port = free_ports(2)
    service = ManagedProcess("train", [sys.executable, "-m", "services.train", "--port", port, "--metrics-port",
                                       metrics_port], tmp_path / "train.log", tcp_probe(port),
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, ready_timeout=120)
    service.start()
    try:
        with channel(f"127.0.0.1:{port}") as ch:
            stub = train_pb2_grpc.TrainServiceStub(ch)
            study = stub.SubmitStudy(train_pb2.SubmitStudyRequest(
                spec_yaml=_tiny("study-restart", grid={"seed": [0, 1]})))
            for event in stub.WatchStudy(train_pb2.WatchStudyRequest(study_id=study.study_id), timeout=300):
                if event.HasField("trial") and event.trial.state == "SUCCEEDED":
                    break
        os.kill(service.pid, signal.SIGKILL)
        service.proc.wait(10)
    finally:
        service.stop()

    runs = build_manager(max_concurrent=1)
    studies = StudyManager(runs, open_store(s3_store_url), tracking_uri=mlflow_server.uri, poll_s=0.1)
    record = studies.join(study.study_id, timeout=300)
    assert record.state == "SUCCEEDED", record.message
    assert [(record.outcome(t.trial_id).state, record.outcome(t.trial_id).resumes) for t in record.trials] == [
        ("SUCCEEDED", 0)] * 2
    # One launch per trial, one run per trial in the registry and in MLflow.
    assert sorted(v.record.run_id for v in runs.list()) == sorted(t.run_id for t in record.trials)
    for trial in record.trials:
        events = (study_env / "runs" / trial.run_id / "events.jsonl").read_text()
        assert events.count('"state": "RUNNING"') == 1, events
    children = _children(mlflow_server.uri, "study-restart", record.parent_run_id)
    assert sorted(r.data.tags["trainyard.trial"] for r in children) == sorted(t.trial_id for t in record.trials)
    assert MlflowClient(mlflow_server.uri).get_run(record.parent_run_id).info.status == "FINISHED"


@pytest.fixture
def train_service(study_env, mlflow_server, s3_store_url):
    """The train service (runs and studies) in this process, training one run at a time."""
    runs = build_manager(max_concurrent=1)
    studies = StudyManager(runs, open_store(s3_store_url), tracking_uri=mlflow_server.uri, poll_s=0.1)
    with served("train", train_registrar(runs, studies), grace=1) as address:
        yield address


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_watch_a_study_to_its_end_and_write_its_report(tmp_path, study_env, mlflow_server, s3_store_url,
                                                       train_service):
    from shared.grpc_client import channel
    from shared.pb import train_pb2, train_pb2_grpc

    spec = tmp_path / "study.yaml"
    spec.write_text(_tiny("study-watch", grid={"model.name": ["mnist_ultralight"]}))
    with channel(train_service) as ch:
        stub = train_pb2_grpc.TrainServiceStub(ch)
        study = stub.SubmitStudy(train_pb2.SubmitStudyRequest(spec_yaml=spec.read_text()))
        [trial] = study.trials
        # `study run --watch` submits the same spec (the same study: nothing new starts) and follows it to its end.
        watch = subprocess.Popen([sys.executable, "-m", "cli", "study", "run", str(spec), "--watch", "--json",
                                  "--server", train_service], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        events = list(stub.WatchStudy(train_pb2.WatchStudyRequest(study_id=study.study_id), timeout=300))
    out, err = watch.communicate(timeout=300)
    assert events[0].HasField("study") and events[-1].HasField("study")
    assert events[-1].study.state == "SUCCEEDED" and events[-1].study.report_uri
    trial_events = [(e.trial.trial_id, e.trial.state) for e in events[1:-1]]
    assert trial_events == [(trial.trial_id, "RUNNING"), (trial.trial_id, "SUCCEEDED")]
    assert events[-2].trial.metrics["val_acc"] > 0
    assert watch.returncode == 0, err
    watched = json.loads(out)
    assert watched["study_id"] == study.study_id and watched["state"] == "SUCCEEDED"
    assert [t["state"] for t in watched["trials"]] == ["SUCCEEDED"]

    # `study report` rebuilds the report from MLflow: the very bytes the study wrote at its end.
    out_dir = tmp_path / "report"
    report = _cli("study", "report", study.study_id, "--out", str(out_dir), "--tracking-uri", mlflow_server.uri,
                  "--server", train_service)
    assert report.returncode == 0, report.stderr
    store = open_store(s3_store_url)
    for name in ("report.md", "report.html"):
        assert (out_dir / name).read_bytes() == store.get_bytes(f"studies/{study.study_id}/report/{name}")
    assert "| mnist_ultralight | 6,008 |" in report.stdout and f"{out_dir / 'report.md'}" in report.stdout


def test_a_study_without_grid_axes_reports_a_row_per_trial_named_by_what_it_sets():
    from services.train.studies.report import build_tables
    from services.train.studies.results import DONE, StudyData, TrialData

    trials = [TrialData(f"t{i}", f"r{i}", {}, {"optimizer.lr": lr}, status=DONE, metrics={"val_acc": acc})
              for i, (lr, acc) in enumerate([(0.0123456, 0.5), (0.002, 0.75)])]
    from services.train.studies.spec import StudySpec

    spec = StudySpec.model_validate({"name": "lr-search", "base_config": {"model": {"name": "mnist_ultralight"}},
                                     "report": {"columns": ["val_acc", "status"], "plots": []}})
    study = {"spec": spec.model_dump(mode="json")}
    results = build_tables(StudyData(study, trials))[0]
    assert results.headers == ["Row", "Val acc %", "Status"]
    assert [r[:2] for r in results.rows] == [["optimizer.lr=0.0123", "50.00"], ["optimizer.lr=0.002", "75.00"]]
