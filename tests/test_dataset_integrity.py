"""Damaged datasets are refused, not trained on or indexed: a local data.path whose bytes no longer match its
manifest fails the run with DATA_LOSS naming the file; the trajectory reader checks a shard before any of its
samples; IndexTrajectories and IndexImageFolder (over real gRPC) check every file, not just the manifest."""
from __future__ import annotations

import grpc
import pytest

from services.convert.server import register as register_convert
from services.render.datasets import RenderSpec, render
from services.train.config import parse_train_config
from services.train.engine import Engine
from services.train.events import read_events
from shared.data.trajectories import TrajectoryShards
from shared.errors import IntegrityError
from shared.pb import convert_pb2, convert_pb2_grpc
from shared.storage import open_store
from tests.harness.services import serving


def flip_byte(path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def convert_stub():
    with serving("convert", register_convert) as ch:
        yield convert_pb2_grpc.ConvertServiceStub(ch)


def test_a_run_on_a_local_dataset_with_flipped_bytes_fails_with_data_loss(home, tmp_path):
    digits, _ = render(RenderSpec("digits", str(tmp_path / "digits"), count=200, seed=1,
                                  options={"test_count": 50}))
    images = tmp_path / "digits" / "train-images-idx3-ubyte"
    flip_byte(images, 5000)  # still a well-formed IDX file: only the manifest can tell
    cfg = parse_train_config({
        "experiment": "integrity", "model": {"name": "mnist_ultralight"},
        "data": {"kind": "mnist", "path": digits}, "epochs": 1, "batch_size": 32, "num_threads": 1,
    })
    with pytest.raises(IntegrityError, match="train-images-idx3-ubyte: sha256"):
        Engine(cfg, "flipped", store=open_store(tmp_path / "store"), tracking=False).run()
    state = [e for e in read_events(home / "runs/flipped/events.jsonl") if e["type"] == "state"][-1]
    assert state["state"] == "FAILED" and "IntegrityError" in state["message"]


@pytest.fixture
def trajectories(tmp_path) -> str:
    return render(RenderSpec("trajectories", str(tmp_path / "traj"), count=8, seed=2,
                             options={"shard_size": 4}))[0]


@pytest.mark.parametrize("part", ["labels.npy", "videos.npy.zst"])
def test_the_trajectory_reader_checks_a_shard_before_its_samples(trajectories, tmp_path, part):
    flip_byte(tmp_path / "traj" / "shards" / f"00001.{part}")
    seen = []
    with pytest.raises(IntegrityError, match=f"shards/00001.{part}"):
        for item in TrajectoryShards(f"file://{tmp_path}", "traj"):
            seen.append(int(item["index"]))
    assert seen == [0, 1, 2, 3]  # shard 0 whole, nothing of the damaged shard 1


def test_index_trajectories_checks_the_shards(convert_stub, trajectories, tmp_path):
    flip_byte(tmp_path / "traj" / "shards" / "00001.videos.npy.zst")
    out = tmp_path / "traj-index"
    with pytest.raises(grpc.RpcError) as err:
        convert_stub.IndexTrajectories(convert_pb2.IndexRequest(path=trajectories, out=str(out)), timeout=60)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert "shards/00001.videos.npy.zst: sha256" in err.value.details()
    assert not out.exists()


def test_index_image_folder_checks_the_images(convert_stub, tmp_path):
    logos, _ = render(RenderSpec("logos", str(tmp_path / "logos"), count=4, seed=1,
                                 options={"image_size": 32, "val_per_class": 1}))
    png = sorted((tmp_path / "logos").rglob("*.png"))[0]
    flip_byte(png)
    with pytest.raises(grpc.RpcError) as err:
        convert_stub.IndexImageFolder(convert_pb2.IndexRequest(path=logos), timeout=60)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and png.name in err.value.details()
    assert not (tmp_path / "logos-index").exists()
