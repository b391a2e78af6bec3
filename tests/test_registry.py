"""Runs and models as MLflow users expect them, against a real `mlflow server`: readable runs with their
source, dataset and system metrics; registered models that are MLflow pyfunc models, with one version
number in the registry and the store, champion/challenger aliases (set by the engine and by `trainyard models
promote`), and an inference server that serves ``models:/name@champion`` with the same answers as
``mlflow.pyfunc.load_model("models:/name@champion")``: the calibrated probabilities of the exported weights."""
from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from safetensors.torch import load as st_load

from cli.main import main as cli_main
from services.inference.repository import ModelRepository, parse_model_specs
from services.inference.server import build_parser, start_server
from services.train.config import parse_train_config
from services.train.engine import Engine
from shared.data import synthetic_digits
from shared.grpc_client import wait_serving
from shared.inference_client import InferenceClient
from shared.modelcard import WEIGHTS_FILE, ModelRef, list_versions, model_prefix, read_card
from shared.models import create_model
from shared.storage import open_store
from shared.tracking import git_commit
from tests.test_train_engine import base_config


def test_registered_runs_pyfunc_aliases_and_serving(home, tmp_path, mlflow_server, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    store = open_store(tmp_path / "store")
    data = {"kind": "synthetic", "train_size": 512, "val_size": 256, "test_size": 256}
    runs = {}
    for run_id, epochs, seed in (("reg-weak", 1, 1), ("reg-strong", 4, 0)):
        # The champion-to-be fits a softmax temperature on validation, which serving must apply.
        cfg = parse_train_config(base_config(experiment="registry-test", data=data, epochs=epochs, seed=seed,
                                             calibration={"temperature": run_id == "reg-strong"},
                                             export={"name": "reg-digits"}))
        runs[run_id] = Engine(cfg, run_id, store=store, tracking_uri=mlflow_server.uri).run()
    weak, strong = runs["reg-weak"], runs["reg-strong"]
    assert strong.best_metric > weak.best_metric
    client = MlflowClient(mlflow_server.uri)

    # Readable runs: distinct names, the source commit, the dataset with its digest, system metrics.
    names = {client.get_run(r.mlflow_run_id).info.run_name for r in runs.values()}
    assert names == {"mnist_ultralight-synthetic-all-s1", "mnist_ultralight-synthetic-all-s0"}
    run = client.get_run(strong.mlflow_run_id)
    assert run.data.tags["mlflow.source.git.commit"] == git_commit() and run.data.tags["mlflow.source.type"] == "JOB"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest and dataset.dataset.name == "synthetic:seed0"
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    with_bn = create_model("mnist_ultralight", batchnorm=True)  # base_config's model
    assert run.data.metrics["num_params"] == sum(p.numel() for p in with_bn.parameters())

    # One version number for the registry and the store; aliases by the validation rule.
    versions = {int(v.version): v.run_id for v in client.search_model_versions("name='reg-digits'")}
    assert versions == {1: weak.mlflow_run_id, 2: strong.mlflow_run_id}
    assert list_versions(store, "reg-digits") == [1, 2]
    assert read_card(store, "reg-digits", 2).mlflow_run_id == strong.mlflow_run_id
    assert weak.model_version == 1 and strong.model_version == 2
    assert int(client.get_model_version_by_alias("reg-digits", "champion").version) == 2
    assert int(client.get_model_version_by_alias("reg-digits", "challenger").version) == 1

    # The registered model is an MLflow model: pyfunc predicts, and the inference server, loading the same
    # alias, gives the same classes for the same images.
    mlflow.set_tracking_uri(mlflow_server.uri)
    mlflow.set_registry_uri(mlflow_server.uri)
    pyfunc = mlflow.pyfunc.load_model("models:/reg-digits@champion")
    digits = synthetic_digits(16, seed=9)[0]
    images = digits.permute(0, 2, 3, 1).numpy()
    predicted = pyfunc.predict(images)
    assert list(predicted.columns) == ["label", "confidence"] and len(predicted) == 16

    # What both must answer, computed here from the exported weights: softmax(logits / T), T from the card.
    card = read_card(store, "reg-digits", 2)
    assert abs(card.temperature - 1.0) > 1e-3, card.temperature
    module = create_model(card.architecture, **card.model_kwargs)
    module.load_state_dict(st_load(store.get_verified(model_prefix("reg-digits", 2), WEIGHTS_FILE)))
    (mean,), (std,) = card.normalization.mean, card.normalization.std
    with torch.no_grad():
        logits = module.eval()((digits.float() / 255 - mean) / std)
    confidence, index = torch.softmax(logits / card.temperature, 1).max(1)
    expected = [card.classes[i] for i in index.tolist()]
    assert list(predicted["label"]) == expected
    np.testing.assert_allclose(predicted["confidence"], confidence.numpy(), atol=1e-5)
    uncalibrated = torch.softmax(logits, 1).max(1).values.numpy()
    assert np.abs(uncalibrated - confidence.numpy()).max() > 1e-3  # the temperature is not a no-op here

    # The inference server started as `python -m services.inference` would be, with the model named in MLflow's
    # string form in TRAINYARD_SERVE_MODELS.
    monkeypatch.setenv("TRAINYARD_SERVE_MODELS", "models:/reg-digits@champion")
    monkeypatch.setenv("TRAINYARD_REPOSITORY_TOKEN", "registry-test-token")
    startup = parse_model_specs(build_parser().parse_args([]).models)
    assert startup == [ModelRef("reg-digits", alias="champion")]
    repository = ModelRepository(store, tracking_uri=mlflow_server.uri)
    host, _ = start_server(repository, startup, repository_token="registry-test-token")
    try:
        address = f"127.0.0.1:{host.port}"
        wait_serving(address, 60)
        with InferenceClient(address) as inference:
            served = inference.classify("reg-digits", list(images), top_k=1)
            assert {p.version for p in served} == {"2"}
            assert [p.label for p in served] == expected
            np.testing.assert_allclose([p.confidence for p in served], confidence.numpy(), atol=1e-5)

            # `trainyard models promote` moves the alias in the registry; a load request naming the model by
            # the string form then loads the version the alias names now.
            assert cli_main(["models", "promote", "reg-digits", "--version", "1", "--alias", "champion"]) == 0
            assert "reg-digits@champion -> version 1" in capsys.readouterr().out
            assert int(client.get_model_version_by_alias("reg-digits", "champion").version) == 1
            inference.load_model("models:/reg-digits@champion")
            weak = inference.classify("reg-digits", list(images), version=1, top_k=1)
            assert {p.version for p in weak} == {"1"}
    finally:
        host.stop()
        repository.close()
