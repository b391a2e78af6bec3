"""TrainService over real gRPC with the local backend: real worker subprocesses train, are followed,
listed, bounded in number and cancelled."""
import time

import grpc
import pytest

from cli.runs import format_run, format_runs
from services.train.server import build_manager
from shared.grpc_client import channel
from shared.pb import train_pb2, train_pb2_grpc
from tests.harness.services import served, train_registrar

CONFIG = """\
experiment: svc-test
model: {name: mnist_ultralight, kwargs: {batchnorm: true}}
data: {kind: synthetic, train_size: 3000, val_size: 500}
epochs: 3
batch_size: 64
optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
deterministic: true
"""


@pytest.fixture
def stub(tmp_path, monkeypatch):
    # The workers inherit this environment: their store, MLflow store and events stay in tmp_path.
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TRAINYARD_PROGRESS", "0")
    with served("train", train_registrar(build_manager(max_concurrent=1)), grace=1) as address:
        yield train_pb2_grpc.TrainServiceStub(channel(address))


def _state(run) -> str:
    return train_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")


def test_submit_watch_list_and_cancel(stub):
    run = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG), timeout=30)
    assert run.run_id.startswith("svc-test-") and run.epochs == 3
    # One slot: a second run waits in the queue while the first trains.
    long_run = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=["epochs=50"]), timeout=30)
    assert _state(stub.GetRun(train_pb2.GetRunRequest(run_id=long_run.run_id))) == "QUEUED"

    states, epochs = [], []
    for event in stub.WatchRun(train_pb2.WatchRunRequest(run_id=run.run_id), timeout=300):
        if event.HasField("run"):
            states.append(_state(event.run))
        else:
            epochs.append((event.epoch.epoch, event.epoch.metrics["val_acc"]))
    assert states[-1] == "SUCCEEDED" and "RUNNING" in states
    assert [e for e, _ in epochs] == [1, 2, 3]
    done = stub.GetRun(train_pb2.GetRunRequest(run_id=run.run_id))
    assert done.epoch == 3 and done.metrics["val_acc"] > 0.5  # chance is 0.1
    assert done.mlflow_run_id and done.model_uri.startswith("models/")

    # The queued run starts once the slot frees, and is cancelled mid-training.
    deadline = time.monotonic() + 120
    while _state(stub.GetRun(train_pb2.GetRunRequest(run_id=long_run.run_id))) != "RUNNING":
        assert time.monotonic() < deadline, "queued run never started"
        time.sleep(0.5)
    cancelled = stub.CancelRun(train_pb2.CancelRunRequest(run_id=long_run.run_id), timeout=60)
    assert _state(cancelled) == "CANCELLED"
    listed = {r.run_id: _state(r) for r in stub.ListRuns(train_pb2.ListRunsRequest(), timeout=30).runs}
    assert listed == {run.run_id: "SUCCEEDED", long_run.run_id: "CANCELLED"}
    only_done = stub.ListRuns(train_pb2.ListRunsRequest(state=train_pb2.RUN_STATE_SUCCEEDED), timeout=30).runs
    assert [r.run_id for r in only_done] == [run.run_id]
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelRun(train_pb2.CancelRunRequest(run_id=run.run_id), timeout=30)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_runs_that_select_on_test_are_marked(stub):
    honest = stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, overrides=["epochs=50"]), timeout=30)
    peeked = stub.SubmitRun(train_pb2.SubmitRunRequest(
        config_yaml=CONFIG, overrides=["epochs=50", "data.val_split=test"]), timeout=30)
    try:
        assert (honest.selection_split, peeked.selection_split) == ("val", "test")
        listed = stub.ListRuns(train_pb2.ListRunsRequest(), timeout=30).runs
        rows = {line.split()[0]: line for line in format_runs(listed).splitlines()}
        assert rows[honest.run_id].endswith("  val") and rows[peeked.run_id].endswith("  test (!)")
        assert "selected on the test split" in rows["(!)"]
        assert "selected on the test split" in format_run(peeked) and "test split" not in format_run(honest)
    finally:
        for run in (peeked, honest):
            stub.CancelRun(train_pb2.CancelRunRequest(run_id=run.run_id), timeout=60)


@pytest.mark.parametrize("config, overrides, code, text", [
    ("epochs: [", [], grpc.StatusCode.INVALID_ARGUMENT, "not valid YAML"),
    (CONFIG, ["optimizer.learning_rate=1"], grpc.StatusCode.INVALID_ARGUMENT, "optimizer.learning_rate"),
    (CONFIG, ["epochs=0"], grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
])
def test_bad_configs_are_invalid_argument(stub, config, overrides, code, text):
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=config, overrides=overrides), timeout=30)
    assert info.value.code() == code and text in info.value.details()


def test_unknown_run_and_backend(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRun(train_pb2.GetRunRequest(run_id="nope-123"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.GetRun(train_pb2.GetRunRequest(run_id="../etc"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitRun(train_pb2.SubmitRunRequest(config_yaml=CONFIG, backend="slurm"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
