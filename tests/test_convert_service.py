"""ConvertService over real gRPC, on datasets the render service's code path publishes: ToTinyLlava
streams to a published TinyLLaVA set that Validate passes, Validate names what is wrong with a broken
one, and the two index RPCs publish indexes that match the rendered datasets."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import grpc
import pytest

from services.convert.server import register
from services.render.datasets import RenderSpec, render
from shared.grpc_client import channel, health_status
from shared.grpc_server import start
from shared.pb import convert_pb2, convert_pb2_grpc
from shared.storage import open_location
from tests.harness.gates import stop_at_gate

MODELS = 8
CAD_SIZE = 64


@pytest.fixture(scope="module")
def server():
    host = start("convert", register, port=0)
    address = f"127.0.0.1:{host.port}"
    with channel(address) as ch:
        yield address, convert_pb2_grpc.ConvertServiceStub(ch)
    host.stop(grace=5)


@pytest.fixture(scope="module")
def stub(server):
    return server[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Small published datasets: cad-synth models, their rendered views, logos, trajectories."""
    root = tmp_path_factory.mktemp("datasets")
    specs = {
        "synth": RenderSpec("cad-synth", str(root / "synth"), count=MODELS, seed=7),
        "logos": RenderSpec("logos", str(root / "logos"), count=8, seed=1,
                            options={"image_size": 32, "val_per_class": 1}),
        "traj": RenderSpec("trajectories", str(root / "traj"), count=8, seed=2, options={"shard_size": 4}),
    }
    out = {name: render(spec)[0] for name, spec in specs.items()}
    out["cad"] = render(RenderSpec("cad", str(root / "cad"), options={"input": out["synth"],
                                                                    "image_size": CAD_SIZE}))[0]
    out["models"] = out["synth"]  # the cad-synth dataset itself: its manifest and metadata are no models
    return out


def to_tinyllava(stub, **fields) -> list:
    return list(stub.ToTinyLlava(convert_pb2.TinyLlavaRequest(**fields), timeout=120))


def test_to_tinyllava_streams_to_a_dataset_that_validates(stub, data, tmp_path):
    out = str(tmp_path / "llava")
    stream = to_tinyllava(stub, cad_json=data["models"], images=data["cad"], out=out, seed=1, val_fraction=0.25)
    assert [p.state for p in stream] == ["running"] * (len(stream) - 1) + ["succeeded"]
    assert len({p.job_id for p in stream}) == 1
    last = stream[-1]
    records = 3 * MODELS  # one record per view
    assert (last.done, last.total, last.failed) == (records, records, 0)
    stats = json.loads(last.message)
    assert stats["models"] == MODELS and stats["val_records"] == 3 * 2  # 25 % of 8 models, by model
    assert stats["train_records"] + stats["val_records"] == records

    # The output is a published dataset: manifest last, every file verifies.
    store, prefix = open_location(out)
    manifest = store.read_manifest(prefix)
    assert last.outputs["dataset"] == f"{store.url}/{prefix}"
    train = json.loads(store.get_verified(prefix, "train.json"))
    assert len(train) == stats["train_records"]
    assert train[0]["conversations"][0]["value"].startswith("<image>\n")
    assert manifest.meta["num_records"] == records

    report = stub.Validate(convert_pb2.ValidateRequest(path=out))
    assert report.ok, report.text
    assert (report.records, report.images, list(report.problems)) == (records, records, [])
    assert "OK" in report.text

    # image_size in the request overrides what the dataset records.
    report = stub.Validate(convert_pb2.ValidateRequest(path=out, image_size=2 * CAD_SIZE))
    assert not report.ok
    assert f"is {CAD_SIZE}x{CAD_SIZE}, expected {2 * CAD_SIZE}x{2 * CAD_SIZE}" in report.problems[0]


def test_validate_names_the_missing_image_of_a_corrupted_copy(stub, data, tmp_path):
    images = tmp_path / "cad-copy"
    shutil.copytree(data["cad"], images)
    out = str(tmp_path / "llava")
    assert to_tinyllava(stub, cad_json=data["models"], images=str(images), out=out)[-1].state == "succeeded"
    assert stub.Validate(convert_pb2.ValidateRequest(path=out)).ok

    victim = sorted((images / "images").glob("*_top.png"))[2]
    victim.unlink()
    report = stub.Validate(convert_pb2.ValidateRequest(path=out))
    assert not report.ok
    assert len(report.problems) == 1
    assert f"image {victim.name} is missing" in report.problems[0]
    assert victim.name in report.text

    # A record file that no longer matches its manifest entry is named too.
    (Path(out) / "val.json").write_text("[]")
    problems = stub.Validate(convert_pb2.ValidateRequest(path=out)).problems
    assert any("val.json does not match its size/sha256" in p for p in problems), problems


def test_to_tinyllava_bad_requests(server, data, tmp_path):
    address, stub = server
    with pytest.raises(grpc.RpcError) as err:
        to_tinyllava(stub, cad_json=data["models"], out=str(tmp_path / "x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs cad_json, images and out" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        to_tinyllava(stub, cad_json=str(tmp_path / "none"), images=data["cad"], out=str(tmp_path / "x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:  # a dataset that is not a CAD render
        to_tinyllava(stub, cad_json=data["models"], images=data["logos"], out=str(tmp_path / "x"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "has no images/ folder" in err.value.details()
    assert health_status(address) == "SERVING"
    assert not (tmp_path / "x").exists()


def test_index_image_folder_counts_the_classes(stub, data, tmp_path):
    resp = stub.IndexImageFolder(convert_pb2.IndexRequest(path=data["logos"]))
    assert resp.index_location == f"{data['logos']}-index"
    index = json.loads(resp.index_json)
    classes = ["complex", "gradient", "simple", "text"]
    assert index["classes"] == classes
    assert {s: v["counts"] for s, v in index["splits"].items()} == {
        "train": dict.fromkeys(classes, 2), "val": dict.fromkeys(classes, 1)}
    # Every indexed file is one of the dataset's, labelled by its class folder.
    store, prefix = open_location(data["logos"])
    files = store.read_manifest(prefix).files
    for split in ("train", "val"):
        for rel, label in index["splits"][split]["files"]:
            assert rel in files and rel.split("/")[1] == classes[label]

    # Published where asked, and readable back verified.
    out = str(tmp_path / "logos-idx")
    resp = stub.IndexImageFolder(convert_pb2.IndexRequest(path=data["logos"], out=out))
    assert resp.index_location == out
    store, prefix = open_location(out)
    assert json.loads(store.get_verified(prefix, "index.json")) == json.loads(resp.index_json)


def test_index_trajectories_matches_the_shards(stub, data):
    resp = stub.IndexTrajectories(convert_pb2.IndexRequest(path=data["traj"]))
    index = json.loads(resp.index_json)
    assert index["type"] == "trajectory_shards" and index["num_samples"] == 8
    assert sum(index["class_distribution"].values()) == 8
    store, prefix = open_location(data["traj"])
    files = store.read_manifest(prefix).files
    assert [(s["start"], s["stop"]) for s in index["shards"]] == [(0, 4), (4, 8)]
    for shard in index["shards"]:
        assert files[shard["videos"]].sha256 == shard["videos_sha256"]
        assert files[shard["labels"]].size == shard["labels_size"]
    out_store, out_prefix = open_location(resp.index_location)
    assert json.loads(out_store.get_verified(out_prefix, "index.json")) == index


def test_index_errors(server, data, tmp_path):
    address, stub = server
    with pytest.raises(grpc.RpcError) as err:
        stub.IndexImageFolder(convert_pb2.IndexRequest(path=str(tmp_path / "absent")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not published" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        stub.IndexTrajectories(convert_pb2.IndexRequest(path=data["logos"]))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'logos' dataset, not 'trajectories'" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:  # the index of a dataset is published once
        stub.IndexImageFolder(convert_pb2.IndexRequest(path=data["logos"], out=data["traj"]))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert health_status(address) == "SERVING"


def _cad_inputs(data, tmp_path: Path, extra: tuple[str, ...]) -> tuple[Path, Path, list[Path]]:
    """(models folder, rendered dataset, sources): three of the rendered models as ``m_<id>``, and for
    each name in ``extra`` its three views, so a model written there under that name is converted."""
    models, images = tmp_path / "models", tmp_path / "rendered" / "images"
    models.mkdir()
    images.mkdir(parents=True)
    sources = sorted(Path(data["models"], "json").glob("*.json"))[:3]
    for src in sources:
        shutil.copy(src, models / f"m_{src.name}")
        for view in ("front", "top", "right"):
            shutil.copy(Path(data["cad"], "images", f"{src.stem}_{view}.png"), images / f"m_{src.stem}_{view}.png")
            for name in extra:
                shutil.copy(images / f"m_{src.stem}_{view}.png", images / f"{name}_{view}.png")
    return models, images.parent, sources


def _many_lines(source: Path, n: int) -> str:
    """``source``'s model with its first loop made a regular polygon of ``n`` lines (~0.3 s to describe
    at n=50,000, against half a millisecond for a usual model)."""
    model = json.loads(source.read_text())
    sketch = next(e for e in model["entities"].values() if e["type"] == "Sketch")
    pts = [{"x": math.cos(2 * math.pi * i / n), "y": math.sin(2 * math.pi * i / n), "z": 0.0} for i in range(n)]
    next(iter(sketch["profiles"].values()))["loops"][0]["profile_curves"] = [
        {"type": "Line3D", "start_point": pts[i], "end_point": pts[(i + 1) % n]} for i in range(n)]
    return json.dumps(model)


def test_a_model_over_its_time_budget_is_reported_while_the_others_convert(stub, data, tmp_path, monkeypatch):
    from shared.cad.budget import BUDGET_ENV

    models, rendered, sources = _cad_inputs(data, tmp_path, ("zz_big",))
    (models / "zz_big.json").write_text(_many_lines(sources[0], 50_000))
    monkeypatch.setenv(BUDGET_ENV, "0.05")  # the service reads its budget from the environment
    request = convert_pb2.TinyLlavaRequest(cad_json=str(models), images=str(rendered), out=str(tmp_path / "o"))
    last = list(stub.ToTinyLlava(request, timeout=60))[-1]
    assert (last.state, last.done, last.failed) == ("succeeded", 9, 1)
    assert [(f.item, f.reason) for f in last.failures] == [
        ("zz_big", "BudgetExceeded: model zz_big took longer than its time budget of 0.05 s")]


def test_a_conversion_stops_when_its_clients_deadline_passes(stub, data, tmp_path, caplog):
    # First in order, a gate: a FIFO the server's read waits on.
    models, rendered, sources = _cad_inputs(data, tmp_path, ("a_gate",))
    os.mkfifo(models / "a_gate.json")
    out = tmp_path / "llava"
    request = convert_pb2.TinyLlavaRequest(cad_json=str(models), images=str(rendered), out=str(out))
    # The client gives up while the server waits on the gate; let it read the model only then: it must stop.
    record = stop_at_gate(stub.ToTinyLlava(request, timeout=1.5), models / "a_gate.json", sources[0].read_bytes(),
                          caplog)
    assert record.stage == "convert"
    assert not out.exists()

    # The output is free again: the same request, with the gate a plain file, converts all four.
    (models / "a_gate.json").unlink()
    shutil.copy(sources[0], models / "a_gate.json")
    last = list(stub.ToTinyLlava(request, timeout=60))[-1]
    assert (last.state, last.done, last.failed) == ("succeeded", 12, 0)
