"""Trajectory models through the platform: splits by the dataset's own seed, the multi-task run and its
baselines checked against the labels, and the served model answering over gRPC exactly as in process (the
Open Inference Protocol, ``trainyard predict`` on a sample file, and the MLflow pyfunc model)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cli.datasets import write_trajectory_sample
from cli.predict import cmd_predict
from services.render.shards import run_sharded
from services.render.trajectories import TrajectoryJob
from services.train.config import parse_train_config
from services.train.engine import Engine
from services.train.engine.distributed import DistInfo
from services.train.engine.tasks import Runtime, build_task
from shared.data.trajectories import TrajectoryShards, read_index, read_labels, three_way_split
from shared.errors import InvalidArgument
from shared.inference_client import InferenceClient
from shared.modelcard import load_published, read_card
from shared.models import create_model
from shared.storage import open_store
from tests.harness.inference import serving

CLIP = (4, 32, 3, 64, 64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """400 clips in 8 shards of 50 (the dataset's seed 11 assigns them to train / val / test)."""
    root = tmp_path_factory.mktemp("traj-data")
    run_sharded(TrajectoryJob(total=400, shard_size=50, seed=11), open_store(root), "clips", workers=1)
    return root / "clips"


def _config(path, **over):
    base = {"experiment": "traj-test", "task": "trajectory", "model": {"name": "traj_transformer"},
            "data": {"kind": "trajectories", "path": str(path), "val_fraction": 0.15, "test_fraction": 0.15,
                     "workers": 1, "train_eval_size": 64},
            "epochs": 2, "batch_size": 16, "num_threads": 1,
            "optimizer": {"name": "adamw", "lr": 0.004, "weight_decay": 0.05},
            "scheduler": {"name": "cosine", "warmup_steps": 10}, "export": {"name": "traj-served"}}
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return parse_train_config(base)


def _task(cfg, tmp_path):
    task = build_task(cfg, Runtime(torch.device("cpu"), DistInfo(), False, tmp_path))
    task.load()
    return task


def test_splits_follow_the_dataset_seed_not_the_run(dataset, tmp_path):
    store = open_store(dataset.parent)
    index = read_index(store, "clips")
    expected = three_way_split(index, 0.15, 0.15, 11)
    tasks = [_task(_config(dataset, seed=seed, model={"name": name}), tmp_path)
             for seed, name in ((0, "traj_i3d"), (5, "traj_magvit"))]
    assert tasks[0].splits == tasks[1].splits == expected
    assert tasks[0].data_version == tasks[1].data_version
    assert set(sum(expected.values(), [])) == set(range(8)) and all(expected.values())
    # The target statistics come from the training shards' labels alone.
    train = np.concatenate([read_labels(store, "clips", index["shards"][i])["future_position"]
                            for i in expected["train"]])
    np.testing.assert_allclose(tasks[0].target_mean, train.mean(0), atol=1e-5)
    np.testing.assert_allclose(tasks[0].target_std, train.std(0), atol=1e-5)
    assert tasks[0].model_kwargs()["target_std"] == tasks[0].target_std


def test_config_rejects_mismatched_task_and_data(dataset):
    with pytest.raises(ValueError, match="trajectory"):
        _config(dataset, task="classification")


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """One short multi-task run, published to a store."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRAINYARD_HOME", str(home))
    mp.setenv("TRAINYARD_PROGRESS", "0")
    store = open_store(tmp_path_factory.mktemp("store"))
    result = Engine(_config(dataset), "traj-run", store=store, tracking=False).run()
    yield {"store": store, "result": result}
    mp.undo()


def test_run_reports_regression_beside_baselines_on_the_test_split(trained, dataset):
    result = trained["result"]
    m = result.final_metrics
    assert result.state == "SUCCEEDED" and result.model_version == 1
    for key in ("test_acc", "test_rmse", "test_mae", "test_rmse_x", "test_rmse_last_position",
                "test_rmse_const_velocity", "test_class_acc/Helical", "test_f1/Parabolic"):
        assert np.isfinite(m[key]), key
    # The baselines, recomputed here from the test shards' labels, are on exactly the test samples.
    store = open_store(dataset.parent)
    index = read_index(store, "clips")
    test = np.concatenate([read_labels(store, "clips", index["shards"][i])
                           for i in three_way_split(index, 0.15, 0.15, 11)["test"]])
    pos, target = test["positions"].astype(np.float64), test["future_position"].astype(np.float64)
    last = pos[:, -1]
    const_velocity = last + 5 * (last - pos[:, -2])
    for name, pred in (("last_position", last), ("const_velocity", const_velocity)):
        assert m[f"test_rmse_{name}"] == pytest.approx(np.sqrt(((pred - target) ** 2).sum(1).mean()), rel=1e-6)
        assert m[f"test_mae_{name}"] == pytest.approx(np.abs(pred - target).mean(), rel=1e-6)
    history = result.history[-1]
    assert {"val_acc", "val_rmse", "train_acc", "train_rmse", "overfit_gap"} <= set(history)
    card = read_card(trained["store"], "traj-served", 1)
    assert card.task == "trajectory" and card.clip_size == list(CLIP) and card.input_size == [4, 3, 16, 32, 32]
    assert card.model_kwargs["target_mean"] and card.metrics["test_rmse"] == pytest.approx(m["test_rmse"])


def _in_process(store, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model, card = load_published(store, "traj-served", 1)
    with torch.inference_mode():
        out = model(model.prepare(torch.from_numpy(videos)))
    return (torch.softmax(out["logits"] / card.temperature, 1).numpy(), out["future_position"].numpy())


@pytest.fixture(scope="module")
def served(trained):
    with serving(trained["store"], "traj-served") as address:
        yield address


def _clips(dataset, n: int) -> np.ndarray:
    return np.stack([item["video"].numpy() for item in itertools.islice(
        TrajectoryShards(open_store(dataset.parent), "clips"), n)])


def test_served_trajectory_model_matches_in_process(served, trained, dataset):
    videos = _clips(dataset, 6)
    probs, position = _in_process(trained["store"], videos)
    with InferenceClient(served) as client:
        meta = client.model_metadata("traj-served")
        assert [(t.name, list(t.shape)) for t in meta.inputs] == [("videos", [-1, *CLIP])]
        assert {t.name for t in meta.outputs} == {"probabilities", "labels", "future_position"}
        res = client.infer_videos("traj-served", videos)
        # One clip at a time goes through the dynamic batcher: each sample's outputs are its own.
        singles = [client.infer_videos("traj-served", videos[i:i + 1]) for i in range(2)]
    classes = read_card(trained["store"], "traj-served", 1).classes
    np.testing.assert_allclose(res.probabilities, probs, atol=1e-5)
    np.testing.assert_allclose(res.future_position, position, atol=1e-5)
    assert res.labels == [classes[i] for i in probs.argmax(1)]
    for i, single in enumerate(singles):
        np.testing.assert_allclose(single.future_position[0], position[i], atol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((1, 4, 16, 3, 64, 64), np.uint8), np.zeros((2, 3, 32, 3, 64, 64), np.uint8)])
def test_served_trajectory_model_rejects_wrong_clips(served, bad):
    with InferenceClient(served) as client, pytest.raises(InvalidArgument, match="videos must be uint8"):
        client.infer_videos("traj-served", bad)


def test_served_trajectory_model_refuses_image_inputs(served):
    with InferenceClient(served) as client, pytest.raises(InvalidArgument, match="this model takes videos"):
        client.infer("traj-served", np.zeros((1, 64, 64, 3), np.uint8))


def test_predict_cli_runs_a_sample_file(served, trained, dataset, tmp_path):
    out = tmp_path / "sample.npz"
    assert "sample 3" in write_trajectory_sample(str(dataset), 3, str(out))
    with np.load(out) as f:
        video, truth = f["video"], str(f["class_name"])
    probs, position = _in_process(trained["store"], video[None])
    text = cmd_predict(served, "traj-served", None, [str(out)])
    line = text.splitlines()[1]
    classes = read_card(trained["store"], "traj-served", 1).classes
    x, y, z = position[0]
    assert line.startswith(f"sample.npz[0]  {classes[probs[0].argmax()]} {probs[0].max():.4f}")
    assert f"future_position ({x:.3f}, {y:.3f}, {z:.3f})" in line and f"truth {truth}" in line


def test_mlflow_pyfunc_trajectory_model(trained, dataset, tmp_path):
    import mlflow

    from shared.modelcard import WEIGHTS_FILE, model_prefix
    from shared.tracking.pyfunc import save_pyfunc_model

    store = trained["store"]
    card = read_card(store, "traj-served", 1)
    path = save_pyfunc_model(tmp_path / "model", card, store.get_verified(model_prefix("traj-served", 1),
                                                                          WEIGHTS_FILE))
    videos = _clips(dataset, 3)
    frame = mlflow.pyfunc.load_model(str(path)).predict(videos)
    probs, position = _in_process(store, videos)
    assert list(frame["label"]) == [card.classes[i] for i in probs.argmax(1)]
    np.testing.assert_allclose(frame[["future_x", "future_y", "future_z"]].to_numpy(), position, atol=1e-5)


def _epoch_order(batches, epoch: int) -> list[int]:
    batches.set_epoch(epoch)
    return [int(i) for batch in batches for i in batch["index"]]


@pytest.mark.parametrize("cache_mb", [0, 1024])
def test_every_training_clip_once_per_epoch_and_resume_sees_the_same_order(dataset, tmp_path, cache_mb):
    """Streamed (cache off) or from memory after epoch 1 (cache on): each epoch is a fresh shuffle of exactly
    the training clips, and a resumed run (a fresh reader starting at epoch 3) gets epoch 3's order."""
    cfg = _config(dataset, data={"cache_mb": cache_mb})
    task = _task(cfg, tmp_path)
    task.attach(create_model(cfg.model.name, **task.model_kwargs()))
    batches = task.train_batches()
    assert batches.cacheable == bool(cache_mb)
    orders = [_epoch_order(batches, epoch) for epoch in (1, 2, 3)]
    train = sorted(int(i) for s in task.splits["train"]
                   for i in read_labels(open_store(dataset.parent), "clips", task.index["shards"][s])["index"])
    assert all(sorted(order) == train for order in orders)
    assert orders[0] != orders[1] != orders[2]
    resumed = task.train_batches()
    assert _epoch_order(resumed, 3) == orders[2]
    # The clips a batch carries are the ones its indices name, whichever way it was read.
    batches.set_epoch(4)
    batch = next(iter(batches))
    by_index = {int(item["index"]): item for item in TrajectoryShards(open_store(dataset.parent), "clips")
                if int(item["index"]) in {int(i) for i in batch["index"]}}
    for row, index in enumerate(batch["index"].tolist()):
        expected = by_index[index]["video"][:, 1::2, :, ::2, ::2].transpose(1, 2)  # (cameras, C, T, H, W)
        assert torch.equal(batch["clip"][row], expected)
        assert int(batch["label"][row]) == int(by_index[index]["label"])
