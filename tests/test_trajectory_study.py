"""The trajectory log's side-by-side comparison, for real: the shipped studies/trajectory-extractors.yaml
(shortened to a few epochs) trains the four extractors in parallel on 2,000 rendered clips split by the
dataset's own seed, against real MLflow and S3 servers; each must classify the held-out clips and predict
the future position better than the last-position baseline, and the report must hold all four rows."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from services.render.shards import run_sharded
from services.render.trajectories import TrajectoryJob
from services.train.server import build_manager
from services.train.studies.manager import StudyManager, spec_for_submit
from shared.storage import open_store

ROOT = Path(__file__).resolve().parent.parent
EXTRACTORS = ["traj_i3d", "traj_slowfast", "traj_transformer", "traj_magvit"]


@pytest.mark.slow
def test_four_extractors_side_by_side(tmp_path, study_env, mlflow_server, s3_store_url):
    data = tmp_path / "data"
    run_sharded(TrajectoryJob(total=2000, shard_size=100, seed=3), open_store(data), "trajectories", workers=2)

    path = ROOT / "studies" / "trajectory-extractors.yaml"
    spec = yaml.safe_load(spec_for_submit(path.read_text(), str(path)))
    base = spec["base_config"]
    base["data"]["path"] = str(data / "trajectories")
    base["data"]["train_eval_size"] = 200
    base["epochs"] = 4
    spec["benchmark"].update(iterations=10, throughput_seconds=0.3)
    text = yaml.safe_dump(spec)

    store = open_store(s3_store_url)
    studies = StudyManager(build_manager(max_concurrent=2), store, tracking_uri=mlflow_server.uri, poll_s=0.5)
    record = studies.submit(text)
    record = studies.join(record.study_id, timeout=1800)
    assert record.state == "SUCCEEDED", record.message
    assert {o.state for o in record.outcomes.values()} == {"SUCCEEDED"}, {
        tid: o.reason for tid, o in record.outcomes.items() if o.state != "SUCCEEDED"}

    client = MlflowClient(mlflow_server.uri)
    children = client.search_runs([client.get_experiment_by_name("trajectory-extractors").experiment_id],
                                  f"tags.mlflow.parentRunId = '{record.parent_run_id}'")
    by_model = {r.data.params["model.name"]: r.data for r in children}
    assert sorted(by_model) == sorted(EXTRACTORS)
    for name, run in by_model.items():
        m = run.metrics
        assert m["test_acc"] >= 0.9, (name, m["test_acc"])
        assert m["test_rmse"] < m["test_rmse_last_position"], (name, m["test_rmse"], m["test_rmse_last_position"])
        # Same test clips for every trial: the baselines agree to the last digit.
        assert m["test_rmse_last_position"] == by_model["traj_i3d"].metrics["test_rmse_last_position"]
        assert m["bench_gmacs"] > 0 and m["bench_latency_p50_ms"] > 0 and m["bench_peak_memory_mb"] > 0
        assert run.params["data.kind"] == "trajectories" and int(run.params["data.test_samples"]) >= 100

    report = store.get_bytes(f"studies/{record.study_id}/report/report.md").decode()
    print(report)  # the figures, for whoever runs this with -s
    training = report.split("### Training results", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in training.splitlines() if line.startswith("| traj_")]
    assert sorted(r.split("|")[1].strip() for r in rows) == sorted(EXTRACTORS)
    for header in ("Test RMSE (once, at end)", "Test RMSE last-position baseline", "GMACs / sample",
                   "Train samples/s", "Peak memory (MB)"):
        assert header in training
    assert all("failed" not in r and " - |" not in r for r in rows)
