"""kill -9 a real training worker mid-epoch, restart it with the same run id, and get bit-identical results.

Runs against a real S3 store (SeaweedFS) and a real MLflow server. The uninterrupted reference run goes
concurrently with the interrupted one to save wall time; determinism does not depend on timing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from services.train.checkpoint import epoch_prefix, latest_checkpoint
from services.train.events import read_events
from shared.storage import open_store
from tests.test_train_engine import write_digits_idx

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 4
# Wall-clock figures differ between runs by nature; everything else must match bit for bit.
TIMING = {"epoch_time", "train_time", "samples_per_second"}


def start_worker(run_id: str, config: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.train.worker", "--run-id", run_id, "--config", str(config)],
        cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def epoch_records(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "epoch"]


@pytest.mark.slow
def test_kill9_mid_epoch_then_resume_is_bitwise_identical(tmp_path, s3_store_url, mlflow_server):
    data = write_digits_idx(tmp_path / "mnist", n_train=1024, n_test=256)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "resume-test",
        "model": {"name": "mnist_ultralight", "kwargs": {"batchnorm": True, "dropout": 0.1}},
        "data": {"kind": "mnist", "path": str(data), "augment": {"crop": 2, "rotation": 10}},
        "epochs": EPOCHS, "batch_size": 32,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
        "scheduler": {"name": "step", "step_size": 2, "gamma": 0.5},
        "deterministic": True, "num_threads": 1, "seed": 7,
        "export": {"name": "resume-digits"},
    }))
    home = tmp_path / "home"
    env = {**os.environ, "TRAINYARD_HOME": str(home), "TRAINYARD_STORE": s3_store_url,
           "MLFLOW_TRACKING_URI": mlflow_server.uri, "TRAINYARD_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    env.pop("TRAINYARD_PUSHGATEWAY", None)
    events = {rid: home / "runs" / rid / "events.jsonl" for rid in ("straight", "killed")}

    straight = start_worker("straight", config, env, tmp_path / "straight.log")
    victim = start_worker("killed", config, env, tmp_path / "killed.log")

    def in_epoch_3():
        ev = read_events(events["killed"])
        done = [e["epoch"] for e in epoch_records(ev)]
        started = [e["epoch"] for e in ev if e["type"] == "epoch_start"]
        return 2 in done and 3 in started

    wait_for(in_epoch_3, 300, "epoch 2 done and epoch 3 started", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL
    store = open_store(s3_store_url)
    assert latest_checkpoint(store, "killed") == epoch_prefix("killed", 2)
    first_life = read_events(events["killed"])
    assert not any(e["type"] == "epoch" and e["epoch"] == 3 for e in first_life)

    resumed = start_worker("killed", config, env, tmp_path / "killed.log")
    assert resumed.wait(600) == 0, (tmp_path / "killed.log").read_text()[-4000:]
    assert straight.wait(600) == 0, (tmp_path / "straight.log").read_text()[-4000:]

    # Same final weights, bit for bit (sha256 from the checkpoints' manifests).
    final = {rid: store.read_manifest(epoch_prefix(rid, EPOCHS)).files["model.safetensors"].sha256
             for rid in ("straight", "killed")}
    assert final["straight"] == final["killed"]

    # Same metrics for every epoch, bit for bit, apart from wall-clock figures.
    ev_straight, ev_killed = read_events(events["straight"]), read_events(events["killed"])
    def metrics(ev):
        return {e["epoch"]: {k: v for k, v in e["metrics"].items() if k not in TIMING} for e in epoch_records(ev)}
    assert metrics(ev_killed) == metrics(ev_straight)
    assert sorted(metrics(ev_killed)) == list(range(1, EPOCHS + 1))

    # The restart continued the same MLflow run, which holds every epoch once with the same values.
    states = [e for e in ev_killed if e["type"] == "state"]
    assert [s["state"] for s in states] == ["RUNNING", "RUNNING", "SUCCEEDED"]
    assert states[1]["message"] == "resumed" and states[1]["epoch"] == 2
    mlflow_ids = {s["mlflow_run_id"] for s in states}
    assert len(mlflow_ids) == 1
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    history = client.get_metric_history(mlflow_ids.pop(), "val_acc")
    assert [m.step for m in history] == list(range(1, EPOCHS + 1))
    assert [m.value for m in history] == [metrics(ev_straight)[e]["val_acc"] for e in range(1, EPOCHS + 1)]
    # One exported model per run (the killed run did not export twice).
    assert sorted(s.get("model_uri") for s in (states[-1], [e for e in ev_straight if e["type"] == "state"][-1])) \
        == ["models/resume-digits/1", "models/resume-digits/2"]
