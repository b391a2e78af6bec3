"""A study with rows that are not training runs, end to end against real MLflow and S3 servers with real worker
processes: the feature baseline and the ensemble are scored on the trials' own validation and test splits,
the selected model's int8 variant and misclassified images are reported, the criteria table is filled, and
the report rebuilt from MLflow alone is the one written."""
from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from services.render.datasets import RenderSpec, render
from services.train.engine.data import load_data
from services.train.server import build_manager
from services.train.studies.extras import EXTRAS_FILE, model_probs, read_extras
from services.train.studies.manager import StudyManager
from services.train.studies.report import report_from_mlflow
from services.train.studies.spec import Trial, load_spec, trial_config
from shared.modelcard import load_published, parse_model_ref
from shared.storage import open_store

SPEC = """
name: logo-extras-test
base_config:
  experiment: ignored
  model: {{name: mnist_cake, kwargs: {{batchnorm: true, gap_head: true}}}}
  data: {{kind: imagefolder, path: {data}, image_size: 32}}
  epochs: 4
  batch_size: 32
  optimizer: {{name: adamw, lr: 0.003}}
  calibration: {{temperature: true}}
grid:
  model.name: [mnist_cake, mnist_ultralight]
objective: {{metric: val_acc, direction: maximize}}
benchmark: {{batch_sizes: [1, 8], iterations: 5, throughput_seconds: 0.2}}
baselines: [image_features]
ensemble: {{top_k: 2}}
criteria:
  - {{metric: test_acc, min: 0.3, label: test accuracy}}
  - {{metric: min_test_class_acc, min: 0.99}}
  - {{metric: bench_peak_memory_mb, max: 200}}
report:
  columns: [backbone, val_acc, test_acc, min_test_class_acc, test_ece, latency_ms, batched_ms, status]
  plots: [accuracy_curves, per_class, misclassified]
"""


@pytest.mark.slow
def test_baseline_ensemble_and_criteria_rows(tmp_path, study_env, mlflow_server, s3_store_url):
    data = tmp_path / "logos"
    render(RenderSpec("logos", str(data), count=240, seed=5,
                      options={"image_size": 32, "val_per_class": 20, "test_per_class": 30}))
    spec_text = SPEC.format(data=data)
    store = open_store(s3_store_url)
    studies = StudyManager(build_manager(max_concurrent=1), store, tracking_uri=mlflow_server.uri, poll_s=0.3)
    record = studies.join(studies.submit(spec_text).study_id, timeout=900)
    assert record.state == "SUCCEEDED", record.message

    client = MlflowClient(mlflow_server.uri)
    doc, gallery = read_extras(client, record.parent_run_id)
    assert doc["splits"] == {"val": 80, "test": 120} and doc["classes"] == ["complex", "gradient", "simple", "text"]
    rows = {r["kind"]: r for r in doc["rows"]}
    assert set(rows) == {"baseline", "ensemble"}
    assert rows["baseline"]["metrics"]["test_acc"] > 0.5  # hand-made features separate rendered logo classes
    assert rows["baseline"]["metrics"]["bench_latency_p50_ms"] > 0

    # The ensemble row is the mean of the two published models' probabilities on the same test split.
    spec = load_spec(spec_text)
    bundle = load_data(trial_config(spec, Trial(trial_id="b", run_id="b", overrides={}, axes={})).data, 0,
                       tmp_path / "cache")
    children = client.search_runs([client.get_experiment_by_name("logo-extras-test").experiment_id],
                                  f"tags.mlflow.parentRunId = '{record.parent_run_id}'")
    probs = []
    for run in children:
        ref = parse_model_ref(run.data.tags["model_uri"])
        probs.append(model_probs(*load_published(store, ref.name, ref.version), bundle.test_x))
    ensemble_acc = float((torch.stack(probs).mean(0).argmax(1) == bundle.test_y).double().mean())
    assert rows["ensemble"]["metrics"]["test_acc"] == pytest.approx(ensemble_acc)
    assert rows["ensemble"]["members"] and len(rows["ensemble"]["members"]) == 2
    best = max(children, key=lambda r: r.data.metrics["val_acc"])  # the selection rule, on validation
    assert doc["selected"]["model_uri"] == best.data.tags["model_uri"]
    assert 0 <= doc["selected"]["int8"]["test_acc"] <= 1

    written = {name: store.get_bytes(f"studies/{record.study_id}/report/{name}")
               for name in ("report.md", "report.html", "plots/misclassified_test.png", "plots/per_class_test.png")}
    assert written["plots/misclassified_test.png"] == gallery and gallery.startswith(b"\x89PNG")
    rebuilt = report_from_mlflow(mlflow_server.uri, record.parent_run_id).files()
    assert rebuilt["report.md"] == written["report.md"]
    report = written["report.md"].decode()
    for needle in ("image features + ", "ensemble of the top 2", "### Per-class accuracy % (test",
                   "### Success criteria", "fp32 and its int8 variant", "| test accuracy | > 30% |",
                   "none (random init)", "![misclassified_test.png]", "![accuracy_curves.png]"):
        assert needle in report, needle
    criteria = report.split("### Success criteria")[1].split("###")[0]
    assert "NOT met" in criteria and " met" in criteria  # 99% per class is out of reach here
    assert client.get_run(record.parent_run_id).data.metrics["baseline_test_acc"] == rows["baseline"]["metrics"][
        "test_acc"]
    assert any(f.path == EXTRAS_FILE for f in client.list_artifacts(record.parent_run_id, "extras"))
