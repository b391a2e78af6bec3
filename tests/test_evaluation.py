"""Honest evaluation: metrics as scikit-learn defines them, calibration, three splits used for what they are
for, and recipes (weight-decay groups, gradient accumulation, EMA) doing what they claim."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.exceptions import MlflowException
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from cli.demo import print_comparison
from services.train import checkpoint as ckpt
from services.train.config import load_train_config, parse_train_config
from services.train.engine import Engine
from services.train.engine.data import load_data
from services.train.engine.export import model_uri
from services.train.engine.optim import build_optimizer
from services.train.events import read_events
from services.train.studies.spec import Trial, expand_grid, load_spec, study_id, trial_config
from shared.data import synthetic_digits, write_idx
from shared.errors import InvalidArgument
from shared.evaluation import (
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
)
from shared.modelcard import load_published, read_card
from shared.models import create_model
from shared.pb import train_pb2
from shared.storage import open_store
from tests.test_train_engine import base_config

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ metric definitions


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 6
    # Class 5 never occurs and is never predicted; class 4 is only ever predicted (wrongly).
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    cm = torch.as_tensor(confusion_matrix(y_true, y_pred, labels=list(range(k))))
    ours = classification_metrics(cm, [f"c{i}" for i in range(k)], prefix="test")
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0)
    assert ours["test_precision"] == pytest.approx(p) and ours["test_recall"] == pytest.approx(r)
    assert ours["test_f1"] == pytest.approx(f)
    assert ours["test_acc"] == pytest.approx(float(np.mean(y_true == y_pred)))
    pc, rc, fc, _ = precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)), zero_division=0)
    for i in range(k):
        assert ours[f"test_precision/c{i}"] == pytest.approx(pc[i])
        assert ours[f"test_recall/c{i}"] == pytest.approx(rc[i])
        assert ours[f"test_f1/c{i}"] == pytest.approx(fc[i])


def test_expected_calibration_error_by_hand():
    # Four samples, 15 bins: confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.25 (wrong).
    # Bin (14/15, 1]: 2 samples, accuracy 0.5, confidence 0.95 -> |0.5 - 0.95| * 2/4 = 0.225
    # Bin (8/15, 9/15]: 1 sample, accuracy 1, confidence 0.55 -> 0.45 * 1/4 = 0.1125
    # Bin (3/15, 4/15]: 1 sample, accuracy 0, confidence 0.25 -> 0.25 * 1/4 = 0.0625
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.25, 0.75]])
    probs[3] = torch.tensor([0.25, 0.25])  # max 0.25, predicted class 0 (ties resolve to the first)
    labels = torch.tensor([0, 1, 1, 1])
    bins = calibration_bins(probs, labels)
    assert bins[0].sum() == 4
    assert expected_calibration_error(bins) == pytest.approx(0.225 + 0.1125 + 0.0625)
    # Batches add up: the same figure from two halves.
    halves = calibration_bins(probs[:2], labels[:2]) + calibration_bins(probs[2:], labels[2:])
    assert expected_calibration_error(halves) == pytest.approx(expected_calibration_error(bins))


def test_temperature_scaling_recovers_a_known_temperature():
    # Labels drawn from softmax(z), then logits reported 3x too sharp: the fitted temperature is ~3.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    t = fit_temperature(z * 3, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    before = expected_calibration_error(calibration_bins(torch.softmax(z * 3, 1), labels))
    after = expected_calibration_error(calibration_bins(torch.softmax(z * 3 / t, 1), labels))
    assert after < before / 3


# ------------------------------------------------------------------ recipes


def test_no_weight_decay_on_norms_and_biases_by_default():
    model = create_model("mnist_ultralight", batchnorm=True)
    cfg = parse_train_config(base_config(optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}))
    groups = build_optimizer(cfg, model).param_groups
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    everything = parse_train_config(base_config(optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05,
                                                           "decay_norm_and_bias": True}))
    assert all(g["weight_decay"] == 0.05 for g in build_optimizer(everything, model).param_groups)


def test_gradient_accumulation_equals_the_large_batch(home, tmp_path):
    """Two accumulated batches of 32 take the same optimiser steps as batches of 64 (no BatchNorm, no dropout).

    Two steps: float rounding differs between the two ways of summing, and a few more steps can flip a ReLU
    and let that difference grow.
    """
    common = {"model": {"name": "mnist_ultralight"}, "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05},
              "data": {"kind": "synthetic", "train_size": 128, "val_size": 64, "test_size": 64}}
    big = Engine(parse_train_config(base_config(**common, batch_size=64)), "acc-big",
                 store=open_store(tmp_path / "a"), tracking=False, export=False).run()
    small = Engine(parse_train_config(base_config(**common, batch_size=32, accumulate_steps=2)), "acc-small",
                   store=open_store(tmp_path / "b"), tracking=False, export=False).run()
    a = ckpt.load_checkpoint(open_store(tmp_path / "a"), ckpt.epoch_prefix("acc-big", 1)).model_state
    b = ckpt.load_checkpoint(open_store(tmp_path / "b"), ckpt.epoch_prefix("acc-small", 1)).model_state
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert big.history[-1]["val_loss"] == pytest.approx(small.history[-1]["val_loss"], rel=1e-4)


def test_ema_weights_are_evaluated_and_exported(home, tmp_path):
    store = open_store(tmp_path / "store")
    cfg = parse_train_config(base_config(epochs=2, ema={"enabled": True, "decay": 0.9, "warmup": False},
                                         data={"kind": "synthetic", "train_size": 256, "val_size": 128}))
    Engine(cfg, "ema-run", store=store, tracking=False).run()
    best = ckpt.load_checkpoint(store, ckpt.best_prefix("ema-run"))
    assert set(best.extra_states) == {"ema"}
    raw, ema = best.model_state, best.extra_states["ema"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    model, _ = load_published(store, "engine-test")
    exported = model.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


# ------------------------------------------------------------------ the three splits


def write_shifted_digits(root, n_train: int = 1200, n_test: int = 400):
    """Digits whose test split is labelled one class off, on purpose: the better a model learns the task, the
    worse it does on this test split, so a run that looked at the test split while selecting would show it."""
    root.mkdir(parents=True)
    x, y = synthetic_digits(n_train, seed=0)
    write_idx(root / "train-images-idx3-ubyte", x[:, 0].numpy())
    write_idx(root / "train-labels-idx1-ubyte", y.numpy().astype(np.uint8))
    x, y = synthetic_digits(n_test, seed=1)
    write_idx(root / "t10k-images-idx3-ubyte", x[:, 0].numpy())
    write_idx(root / "t10k-labels-idx1-ubyte", ((y + 1) % 10).numpy().astype(np.uint8))
    return root


def test_selection_and_early_stopping_follow_validation_and_test_is_evaluated_once(home, tmp_path, mlflow_server,
                                                                                  monkeypatch, capsys):
    data = write_shifted_digits(tmp_path / "digits")
    over = dict(data={"kind": "mnist", "path": str(data), "val_fraction": 0.2}, epochs=4, batch_size=32,
                checkpoint={"keep_best_metric": "val_acc", "mode": "max", "keep_last": 10},
                # val_loss falls while the model learns; test_loss rises: stopping on the test split would stop.
                early_stopping={"enabled": True, "metric": "val_loss", "mode": "min", "patience": 2},
                calibration={"temperature": True}, export={"name": "honest"})
    store = open_store(tmp_path / "store")
    result = Engine(parse_train_config(base_config(**over)), "honest-run", store=store,
                    tracking_uri=mlflow_server.uri).run()
    history = result.history
    assert result.epochs_done == 4 and not result.message  # validation kept improving: no early stop
    assert all("test_acc" not in row for row in history)  # the test split is not looked at per epoch
    best_epoch = max(history, key=lambda h: h["val_acc"])["epoch"]
    assert result.best_epoch == best_epoch
    # The exported weights are the ones of the epoch validation picked.
    model, card = load_published(store, "honest")
    chosen = ckpt.load_checkpoint(store, ckpt.epoch_prefix("honest-run", best_epoch)).model_state
    assert all(torch.equal(model.state_dict()[k], chosen[k]) for k in chosen)
    # The card holds both: validation from the selected epoch, test from the one final evaluation.
    assert card.metrics["val_acc"] == pytest.approx(history[best_epoch - 1]["val_acc"])
    assert card.metrics["val_acc"] > 0.9 and card.metrics["test_acc"] < 0.2
    assert card.metrics["test_acc"] == pytest.approx(result.final_metrics["test_acc"])
    assert {"test_loss", "test_f1", "test_precision", "test_recall", "test_ece", "test_class_acc/3"} \
        <= set(card.metrics)
    assert card.selection_split == "val" and "20% of train" in card.val_source
    assert np.asarray(card.confusion["test"]).sum() == 400
    assert card.temperature > 0 and "val_ece_calibrated" in card.metrics
    events = [e for e in read_events(home / "runs/honest-run/events.jsonl") if e["type"] == "epoch"]
    assert all(not any(k.startswith("test_") for k in e["metrics"]) for e in events)

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    assert len(client.get_metric_history(result.mlflow_run_id, "test_acc")) == 1
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["selection_split"] == "val"
    assert np.asarray(card.confusion["val"]).sum() == int(run.data.params["data.val_samples"])
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"reliability_val.png", "reliability_test.png", "confusion_matrix_test.png"} <= artifacts
    # A restart of the finished run neither evaluates the test split again nor logs it twice.
    Engine(parse_train_config(base_config(**over)), "honest-run", store=store, tracking_uri=mlflow_server.uri).run()
    assert len(client.get_metric_history(result.mlflow_run_id, "test_acc")) == 1

    # Selecting on the test split is possible only when asked for, and it says so.
    peeked = dict(over, data={**over["data"], "val_split": "test"}, export={"name": "peeked"}, early_stopping={})
    again = Engine(parse_train_config(base_config(**peeked)), "peeked-run", store=store,
                   tracking_uri=mlflow_server.uri).run()
    peek_card = read_card(store, "peeked")
    assert peek_card.selection_split == "test" and "test split" in peek_card.val_source
    assert client.get_run(again.mlflow_run_id).data.tags["selection_split"] == "test"
    assert again.best_epoch == max(again.history, key=lambda h: h["val_acc"])["epoch"]
    # Its registered version is never the champion, though it is the model's first (which would otherwise be).
    (version,) = client.search_model_versions("name='peeked'")
    assert version.tags["selection_split"] == "test"
    assert client.get_model_version_by_alias("peeked", "challenger").version == version.version
    assert client.get_run(again.mlflow_run_id).data.tags["model_alias"] == "challenger"
    with pytest.raises(MlflowException, match="champion"):
        client.get_model_version_by_alias("peeked", "champion")

    # The demo's comparison table says which run selected on the test split.
    monkeypatch.setenv("TRAINYARD_STORE", store.url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    capsys.readouterr()
    print_comparison([train_pb2.Run(model="honest", model_uri=model_uri(result.model_name, result.model_version),
                                    mlflow_run_id=result.mlflow_run_id),
                      train_pb2.Run(model="peeked", model_uri=model_uri(again.model_name, again.model_version),
                                    mlflow_run_id=again.mlflow_run_id)])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["honest"].split()[-2:] == ["val", "mnist_ultralight-mnist-all-s0"]
    assert "test (!)" in rows["peeked"] and "(!)" in rows and "selected on the test split" in rows["(!)"]


def write_digit_folders(root):
    """Image folders train/, val/, test/ of digits whose validation split is labelled one class off, on purpose
    (train and test are labelled truly): every epoch that learns the task more is worse on validation."""
    for split, n, seed in (("train", 600, 0), ("val", 200, 1), ("test", 200, 2)):
        x, y = synthetic_digits(n, seed=seed)
        if split == "val":
            y = (y + 1) % 10
        for i, (image, label) in enumerate(zip(x[:, 0].numpy(), y.tolist(), strict=True)):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    return root


def test_selection_keeps_an_earlier_epoch_when_validation_worsens(home, tmp_path):
    data = write_digit_folders(tmp_path / "digits")
    cfg = parse_train_config(base_config(
        # MNIST's constants: the digits look like MNIST (ImageNet's make the first steps overshoot).
        data={"kind": "imagefolder", "path": str(data), "image_size": 28, "mean": [0.1307] * 3, "std": [0.3081] * 3},
        epochs=6, batch_size=32,
        checkpoint={"keep_best_metric": "val_loss", "mode": "min", "keep_last": 10},
        early_stopping={"enabled": True, "metric": "val_loss", "mode": "min", "patience": 2},
        export={"name": "worse-later"}))
    store = open_store(tmp_path / "store")
    result = Engine(cfg, "worse-later", store=store, tracking=False).run()
    losses = [h["val_loss"] for h in result.history]
    assert result.history[-1]["train_acc"] > result.history[0]["train_acc"] + 0.2  # it did learn
    # Validation worsens after the first epoch: epoch 1 stays selected, and early stopping ends the run after
    # two more epochs of the six.
    assert losses == sorted(set(losses)) and result.best_epoch == 1
    assert result.epochs_done == 3 and result.message.startswith("early stopped at epoch 3")
    # The exported weights are epoch 1's, not the last epoch's, and the card's figures are theirs.
    model, card = load_published(store, "worse-later")
    exported = model.state_dict()
    first = ckpt.load_checkpoint(store, ckpt.epoch_prefix("worse-later", 1)).model_state
    last = ckpt.load_checkpoint(store, ckpt.epoch_prefix("worse-later", 3)).model_state
    assert all(torch.equal(exported[k], first[k]) for k in first)
    assert not all(torch.equal(exported[k], last[k]) for k in last)
    assert card.metrics["epoch"] == 1 and card.metrics["val_loss"] == pytest.approx(losses[0])
    assert card.val_source == "the dataset's own val split"


def test_train_loss_is_plain_cross_entropy_when_the_objective_is_focal(home, tmp_path):
    cfg = parse_train_config(base_config(epochs=1, loss={"name": "focal", "focal_gamma": 2.0},
                                         data={"kind": "synthetic", "train_size": 512, "val_size": 128,
                                               "train_eval_size": 200}))
    store = open_store(tmp_path / "store")
    (row,) = Engine(cfg, "focal-run", store=store, tracking=False, export=False).run().history
    # By hand: the epoch's weights in eval mode on the run's fixed training sample, plain cross-entropy.
    bundle = load_data(cfg.data, cfg.seed, home / "cache")
    x, y = bundle.split("train")
    assert len(y) == 200
    model = create_model("mnist_ultralight", batchnorm=True)
    model.load_state_dict(ckpt.load_checkpoint(store, ckpt.epoch_prefix("focal-run", 1)).model_state)
    with torch.no_grad():
        logits = model.eval()((x.float() / 255 - bundle.mean[0]) / bundle.std[0])
    assert row["train_loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-4)
    assert row["train_acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    # The objective the steps minimised (focal, train mode) is logged beside it, and is another figure.
    assert abs(row["train_objective"] - row["train_loss"]) > 0.05
    (epoch,) = [e for e in read_events(home / "runs/focal-run/events.jsonl") if e["type"] == "epoch"]
    assert epoch["metrics"]["train_loss"] == pytest.approx(row["train_loss"])
    assert epoch["metrics"]["train_objective"] == pytest.approx(row["train_objective"])


def test_channels_last_trains_like_the_default_layout(home, tmp_path):
    store = open_store(tmp_path / "store")
    history = {}
    for layout in ("nchw", "nhwc"):
        # Two steps: more at this learning rate amplify the kernels' rounding differences (four steps put the
        # weights 0.03 apart), as in test_gradient_accumulation_equals_the_large_batch.
        cfg = parse_train_config(base_config(epochs=1, channels_last=layout == "nhwc", device="cpu",
                                             data={"kind": "synthetic", "train_size": 128, "val_size": 128,
                                                   "test_size": 128}, export={"name": f"layout-{layout}"}))
        history[layout] = Engine(cfg, f"layout-{layout}", store=store, tracking=False).run().history[0]
    # Same seed, same batches: the same model up to the float rounding of the NHWC kernels.
    x = (synthetic_digits(64, seed=5)[0].float() / 255 - 0.1307) / 0.3081
    with torch.no_grad():
        nchw, nhwc = (torch.softmax(load_published(store, f"layout-{layout}")[0].eval()(x), 1)
                      for layout in ("nchw", "nhwc"))
    # Measured: 1.5e-3 apart at most in probability, validation loss 4e-4 apart (relative).
    torch.testing.assert_close(nhwc, nchw, rtol=0, atol=1e-2)
    assert history["nhwc"]["val_loss"] == pytest.approx(history["nchw"]["val_loss"], rel=2e-3)
    assert history["nhwc"]["train_objective"] == pytest.approx(history["nchw"]["train_objective"], rel=1e-4)


def test_shipped_configs_and_study_bases_select_on_validation():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 11
    for path in configs:
        assert load_train_config(path).selection_split == "val", path.name
    studies = sorted((REPO / "studies").glob("*.yaml"))
    assert studies
    for path in studies:
        spec = load_spec(path.read_text(), str(path), base_dir=path.parent)
        base = trial_config(spec, Trial(trial_id="base", run_id="base", overrides={}, axes={}))
        trials = [trial_config(spec, trial) for trial in expand_grid(spec, study_id(spec))]
        assert all(cfg.selection_split == "val" for cfg in (base, *trials)), path.name


def test_configs_cannot_select_on_test_metrics_by_accident():
    for where in ({"checkpoint": {"keep_best_metric": "test_acc"}}, {"early_stopping": {"metric": "test_loss"}},
                  {"scheduler": {"metric": "test_loss"}}):
        with pytest.raises(InvalidArgument, match="validation only"):
            parse_train_config(base_config(**where))


def test_card_round_trips_through_json(home, tmp_path):
    store = open_store(tmp_path / "store")
    Engine(parse_train_config(base_config(epochs=1)), "card-run", store=store, tracking=False).run()
    card = read_card(store, "engine-test")
    doc = json.loads(card.to_json())
    assert doc["selection_split"] == "val" and doc["temperature"] == 1.0 and "test_acc" in doc["metrics"]
