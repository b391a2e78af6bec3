"""RenderService over real gRPC: every dataset kind streams monotonic progress and publishes a dataset
whose manifest DescribeDataset reports; bad requests get the right status and a clear message; a CAD
model that does not rebuild is reported while the others render; one render goes to a real S3 store."""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from services.render.cad import generate_cad_json
from services.render.server import RenderServiceServicer
from shared.grpc_client import channel, health_status
from shared.grpc_server import start
from shared.pb import common_pb2, render_pb2, render_pb2_grpc
from shared.storage import open_location
from tests.harness.gates import feed_gate, stop_at_gate

# Small sets: the service layer is under test, the generators have their own unit tests.
SYNTH_COUNT = 8
CAD_SIZE = 64
LOGO_SIZE = 32


@pytest.fixture(scope="module")
def server():
    def register(srv):
        render_pb2_grpc.add_RenderServiceServicer_to_server(RenderServiceServicer(default_workers=1), srv)
        return [render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name]

    host = start("render", register, port=0)
    address = f"127.0.0.1:{host.port}"
    with channel(address) as ch:
        yield address, render_pb2_grpc.RenderServiceStub(ch)
    host.stop(grace=5)


@pytest.fixture(scope="module")
def stub(server):
    return server[1]


def render(stub, **fields) -> list:
    return list(stub.Render(render_pb2.RenderRequest(**fields), timeout=120))


# kind -> (request fields given the output folder, items the dataset must hold)
def _requests(root: Path) -> dict[str, tuple[dict, int]]:
    return {
        "cad-synth": (dict(count=SYNTH_COUNT, seed=3, cad_synth=render_pb2.CadSynth()), SYNTH_COUNT),
        # cad renders cad-synth's published output, as `trainyard render cad --input <dataset>` does.
        "cad": (dict(cad=render_pb2.CadRender(input=str(root / "cad-synth"), image_size=CAD_SIZE)), SYNTH_COUNT),
        "trajectories": (dict(count=8, seed=1, trajectories=render_pb2.TrajectoryRender(shard_size=4)), 8),
        # count = training images (2 per class); val_per_class 1 -> 4 classes x 3
        "logos": (dict(count=8, seed=2, logos=render_pb2.LogoRender(image_size=LOGO_SIZE, val_per_class=1)), 12),
        "digits": (dict(count=40, seed=4, digits=render_pb2.DigitRender(test_count=8)), 48),
    }


@pytest.fixture(scope="module")
def rendered(stub, tmp_path_factory) -> dict[str, tuple[str, int, list]]:
    """kind -> (location, expected items, the Progress stream), each rendered once over gRPC, in order."""
    root = tmp_path_factory.mktemp("rendered")
    out = {}
    for kind, (fields, items) in _requests(root).items():
        location = str(root / kind)
        out[kind] = (location, items, render(stub, out=location, **fields))
    return out


KINDS = ["cad-synth", "cad", "trajectories", "logos", "digits"]


@pytest.mark.parametrize("kind", KINDS)
def test_progress_is_monotonic_and_ends_with_the_published_dataset(rendered, kind):
    location, items, stream = rendered[kind]
    assert len(stream) >= 2
    assert len({p.job_id for p in stream}) == 1 and stream[0].job_id
    assert [p.state for p in stream[:-1]] == ["running"] * (len(stream) - 1)
    for before, after in itertools.pairwise(stream):
        assert after.done >= before.done, [(p.done, p.total) for p in stream]
        assert after.total >= before.total
        assert after.elapsed_seconds >= before.elapsed_seconds
    assert all(p.done <= p.total for p in stream if p.total)
    last = stream[-1]
    assert last.state == "succeeded" and last.stage == "publish"
    assert (last.done, last.total, last.failed) == (items, items, 0), list(last.failures)
    assert dict(last.outputs) == {"dataset": location}


@pytest.mark.parametrize("kind", KINDS)
def test_describe_dataset_reports_the_manifest(stub, rendered, kind):
    location, items, _ = rendered[kind]
    store, prefix = open_location(location)
    manifest = store.read_manifest(prefix)
    for rel in manifest.files:  # every published file is there with its recorded digest
        store.get_verified(prefix, rel)
    assert not store.exists(f"{prefix}/_shards/run.json")

    info = stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=location))
    assert info.location == location
    assert info.kind == kind
    assert info.items == items == manifest.meta["total"]
    assert info.files == len(manifest.files)
    assert info.bytes == manifest.total_size > 0
    assert info.generator_version == str(manifest.meta["generator_version"])
    assert info.seed == manifest.meta["seed"]
    assert json.loads(info.meta_json) == json.loads(json.dumps(manifest.meta, default=str))


def _png_size(store, prefix, rel) -> tuple[int, int]:
    return Image.open(io.BytesIO(store.get_verified(prefix, rel))).size


def test_request_options_reach_the_generators(rendered):
    """The kind-specific fields of RenderRequest (image sizes, shard size, test split) take effect."""
    store, prefix = open_location(rendered["cad"][0])
    files = store.read_manifest(prefix).files
    images = sorted(f for f in files if f.startswith("images/"))
    assert len(images) == 3 * SYNTH_COUNT  # front, top, right per model; no MANIFEST/metadata "models"
    assert {f.rsplit("_", 1)[1] for f in images} == {"front.png", "top.png", "right.png"}
    assert _png_size(store, prefix, images[0]) == (CAD_SIZE, CAD_SIZE)

    store, prefix = open_location(rendered["logos"][0])
    meta = store.read_manifest(prefix).meta
    assert meta["splits"] == {"train": dict.fromkeys(meta["config"]["classes"], 2),
                              "val": dict.fromkeys(meta["config"]["classes"], 1)}
    png = next(f for f in store.read_manifest(prefix).files if f.endswith(".png"))
    assert _png_size(store, prefix, png) == (LOGO_SIZE, LOGO_SIZE)

    store, prefix = open_location(rendered["trajectories"][0])
    meta = store.read_manifest(prefix).meta
    assert (meta["shard_size"], meta["num_shards"], meta["num_samples"]) == (4, 2, 8)

    store, prefix = open_location(rendered["digits"][0])
    meta = store.read_manifest(prefix).meta
    assert [sum(meta["class_counts"]["train"]), sum(meta["class_counts"]["test"])] == [40, 8]


def _break_a_loop(model: dict) -> dict | None:
    """A well-formed copy of ``model`` whose first polyline loop does not close: it parses, but cannot
    rebuild. None when the model has no loop made of lines (a lone circle always closes)."""
    broken = json.loads(json.dumps(model))
    for entity in broken["entities"].values():
        for profile in entity.get("profiles", {}).values():
            for loop in profile["loops"]:
                first = loop["profile_curves"][0]
                if first["type"] == "Line3D":
                    first["start_point"]["x"] += 0.25
                    return broken
    return None


def test_model_that_fails_to_rebuild_is_reported_while_the_others_render(stub, rendered, tmp_path):
    synth = Path(rendered["cad-synth"][0]) / "json"
    models = tmp_path / "models"
    models.mkdir()
    sources = sorted(synth.glob("*.json"))
    for src in sources[:3]:
        shutil.copy(src, models / src.name)
    broken = next(b for b in (_break_a_loop(json.loads(p.read_text())) for p in sources) if b)
    (models / "broken.json").write_text(json.dumps(broken))

    out = str(tmp_path / "cad")
    request = dict(out=out, cad=render_pb2.CadRender(input=str(models), image_size=CAD_SIZE))
    # 1 of 4 is more than the default 10%: refused, nothing published, the rendered shards kept.
    with pytest.raises(grpc.RpcError) as err:
        render(stub, **request)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "1 of 4 items" in err.value.details() and "broken: " in err.value.details()
    store, prefix = open_location(out)
    assert not store.is_published(prefix) and store.list(f"{prefix}/_shards")
    # Accepting one failure and resuming publishes what was rendered, without rendering it again.
    stream = render(stub, **request, resume=True, max_failures="1")
    last = stream[-1]
    assert last.state == "succeeded"
    assert (last.done, last.total, last.failed) == (4, 4, 1)
    assert [f.item for f in last.failures] == ["broken"]
    assert "loop is not closed" in last.failures[0].reason

    store, prefix = open_location(out)
    manifest = store.read_manifest(prefix)
    images = {f for f in manifest.files if f.startswith("images/")}
    assert len(images) == 9 and not any("broken" in f for f in images)
    assert manifest.meta["failed"] == 1 and manifest.meta["rendered"] == 3
    info = stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=out))
    assert json.loads(info.meta_json)["failures"][0]["model_id"] == "broken"


def _bad_requests(rendered, tmp: Path):
    return {
        "no kind": (dict(out=str(tmp / "x"), count=4), grpc.StatusCode.INVALID_ARGUMENT, "needs a kind"),
        "no out": (dict(logos=render_pb2.LogoRender()), grpc.StatusCode.INVALID_ARGUMENT, "out is empty"),
        "cad input missing": (dict(out=str(tmp / "cad"), cad=render_pb2.CadRender(input=str(tmp / "nope"))),
                              grpc.StatusCode.NOT_FOUND, "does not exist"),
        "cad without input": (dict(out=str(tmp / "cad"), cad=render_pb2.CadRender()),
                              grpc.StatusCode.INVALID_ARGUMENT, "needs --input"),
        "logos twice": (dict(out=rendered["logos"][0], count=8, seed=2,
                             logos=render_pb2.LogoRender(image_size=LOGO_SIZE, val_per_class=1)),
                        grpc.StatusCode.ALREADY_EXISTS, "already published"),
        "digits twice": (dict(out=rendered["digits"][0], count=40, digits=render_pb2.DigitRender(test_count=8)),
                         grpc.StatusCode.ALREADY_EXISTS, "already published"),
        "bucket root": (dict(out="s3://bucket", count=8, logos=render_pb2.LogoRender()),
                        grpc.StatusCode.INVALID_ARGUMENT, "name a folder inside the bucket"),
        "negative count": (dict(out=str(tmp / "d"), count=-1, digits=render_pb2.DigitRender()),
                           grpc.StatusCode.INVALID_ARGUMENT, "must be between 0 and 1,000,000, got -1"),
        # Once killed the service at 23 GB: a count is bounded before any work list exists.
        "huge count": (dict(out=str(tmp / "d"), count=10**12, digits=render_pb2.DigitRender()),
                       grpc.StatusCode.INVALID_ARGUMENT, "must be between 0 and 1,000,000, got 1,000,000,000,000"),
        "huge trajectory count": (dict(out=str(tmp / "t"), count=10**9, trajectories=render_pb2.TrajectoryRender()),
                                  grpc.StatusCode.INVALID_ARGUMENT, "between 0 and 200,000"),
        # Once "succeeded" with 0 of 39 models rendered.
        "negative image size": (dict(out=str(tmp / "cad"), cad=render_pb2.CadRender(input=str(tmp), image_size=-1)),
                                grpc.StatusCode.INVALID_ARGUMENT, "image_size must be between 16 and 2,048"),
        "too many workers": (dict(out=str(tmp / "l"), count=8, workers=100_000, logos=render_pb2.LogoRender()),
                             grpc.StatusCode.INVALID_ARGUMENT, "workers must be between 1 and 256"),
        "bad max_failures": (dict(out=str(tmp / "l"), count=8, max_failures="many", logos=render_pb2.LogoRender()),
                             grpc.StatusCode.INVALID_ARGUMENT, "max_failures must be a count"),
    }


BAD = ["no kind", "no out", "cad input missing", "cad without input", "logos twice", "digits twice",
       "bucket root", "negative count", "huge count", "huge trajectory count", "negative image size",
       "too many workers", "bad max_failures"]


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_its_status_and_the_server_keeps_serving(server, rendered, tmp_path, case):
    address, stub = server
    fields, code, text = _bad_requests(rendered, tmp_path)[case]
    def manifests() -> dict[str, bytes]:
        out = {}
        for kind in ("logos", "digits"):
            store, prefix = open_location(rendered[kind][0])
            out[kind] = store.read_manifest(prefix).to_json()
        return out

    before = manifests()
    with pytest.raises(grpc.RpcError) as err:
        render(stub, **fields)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details()
    assert manifests() == before  # a refused render leaves the published datasets as they were
    assert not (tmp_path / "nope").exists()
    assert health_status(address) == "SERVING"
    location = rendered["logos"][0]
    assert stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=location)).items == 12


def test_describe_of_an_unpublished_location_is_not_found(stub, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=str(tmp_path / "missing")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not published" in err.value.details()


def test_render_to_s3_publishes_a_verified_dataset(stub, s3_store_url, monkeypatch):
    # Object-store outputs go to the artifact store's datasets area (shared.storage.open_output).
    monkeypatch.setenv("TRAINYARD_STORE", s3_store_url)
    location = f"{s3_store_url}/datasets/logos"
    stream = render(stub, out=location, count=8, seed=5,
                    logos=render_pb2.LogoRender(image_size=LOGO_SIZE, val_per_class=1))
    assert stream[-1].state == "succeeded" and stream[-1].outputs["dataset"] == location

    store, prefix = open_location(location)
    assert store.url.startswith("s3://")
    manifest = store.read_manifest(prefix)
    pngs = sorted(f for f in manifest.files if f.endswith(".png"))
    assert len(pngs) == 12
    for rel in pngs:
        assert Image.open(io.BytesIO(store.get_verified(prefix, rel))).size == (LOGO_SIZE, LOGO_SIZE)
    # Shard records are gone once the manifest is written; the keys are exactly the manifest + its files.
    assert sorted(store.list(prefix)) == sorted([f"{prefix}/{rel}" for rel in manifest.files] +
                                                [f"{prefix}/MANIFEST.json"])
    info = stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=location))
    assert (info.kind, info.items, info.files) == ("logos", 12, len(manifest.files))


def test_one_writer_per_output_and_the_work_outlives_its_stream(stub, tmp_path):
    out = str(tmp_path / "trajectories")
    request = dict(out=out, count=1500, seed=5, trajectories=render_pb2.TrajectoryRender(shard_size=50))
    first = stub.Render(render_pb2.RenderRequest(**request), timeout=120)
    job_id = next(first).job_id
    # The same folder, spelled as a URL with a trailing slash, is the same output.
    with pytest.raises(grpc.RpcError) as second:
        list(stub.Render(render_pb2.RenderRequest(**{**request, "out": f"file://{out}/"}), timeout=30))
    assert second.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert job_id in second.value.details()

    # The client goes away; the render does not, and publishes the whole dataset.
    first.cancel()
    deadline = time.monotonic() + 120
    while True:
        try:
            info = stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=out), timeout=10)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline, exc
            time.sleep(0.5)
    assert info.items == 1500
    store, prefix = open_location(out)
    for relpath in store.read_manifest(prefix).files:
        store.get_verified(prefix, relpath)  # every shard whole: sizes and sha256 match the manifest

    # Once the writer is done the output is free again, and what speaks is the published-dataset rule.
    while True:
        with pytest.raises(grpc.RpcError) as again:
            list(stub.Render(render_pb2.RenderRequest(**request), timeout=30))
        if again.value.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS, again.value.details()


def test_describe_of_a_hand_edited_manifest_is_data_loss(stub, rendered, tmp_path):
    copy = tmp_path / "logos"
    shutil.copytree(rendered["logos"][0], copy)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    manifest["meta"]["total"] = "many"
    (copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(grpc.RpcError) as err:
        stub.DescribeDataset(render_pb2.DescribeDatasetRequest(location=str(copy)))
    assert err.value.code() == grpc.StatusCode.DATA_LOSS, err.value.details()
    assert "metadata is malformed" in err.value.details()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_render_stops_when_its_clients_deadline_passes(stub, tmp_path, caplog, workers):
    models = tmp_path / "models"
    models.mkdir()
    os.mkfifo(models / "a_gate.json")  # the first model: the server waits on it
    for i in range(3):
        (models / f"m{i}.json").write_text(json.dumps(generate_cad_json(i)))
    out = tmp_path / "out"
    request = render_pb2.RenderRequest(out=str(out), workers=workers,
                                       cad=render_pb2.CadRender(input=str(models), image_size=64))
    # The client gives up while the server waits on the gate; let it read the model only then: it must stop.
    record = stop_at_gate(stub.Render(request, timeout=1.5), models / "a_gate.json",
                          json.dumps(generate_cad_json(9)).encode(), caplog)
    assert record.stage == "render"
    assert not list(out.rglob("*.png")) and not (out / "MANIFEST.json").exists()

    # What it did is kept for a resume, which (with the gate now a plain file) renders everything.
    (models / "a_gate.json").unlink()
    (models / "a_gate.json").write_text(json.dumps(generate_cad_json(9)))
    resume = render_pb2.RenderRequest(out=str(out), workers=workers, resume=True,
                                      cad=render_pb2.CadRender(input=str(models), image_size=64))
    last = list(stub.Render(resume, timeout=60))[-1]
    assert (last.state, last.done, last.failed) == ("succeeded", 4, 0)
    assert len(list((out / "images").glob("*.png"))) == 12


def test_a_render_that_fails_after_its_client_left_is_logged_and_reported(server, tmp_path, caplog):
    address, stub = server
    models = tmp_path / "models"
    models.mkdir()
    os.mkfifo(models / "a_gate.json")  # the first model: the server waits on it
    (models / "m0.json").write_text(json.dumps(generate_cad_json(0)))
    out = tmp_path / "out"
    call = stub.Render(render_pb2.RenderRequest(out=str(out), workers=1,
                                                cad=render_pb2.CadRender(input=str(models), image_size=64)))
    job_id = next(call).job_id
    call.cancel()  # the client goes away while the server waits on the gate...
    caplog.set_level(logging.ERROR, logger="shared.streaming")
    feed_gate(models / "a_gate.json", b"{}")  # ...then the model is broken: 1 of 2 failed, more than 10 %

    deadline = time.monotonic() + 30
    while (job := stub.GetJob(common_pb2.GetJobRequest(job_id=job_id))).state == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job.state == "failed" and "1 of 2 items" in job.message, job
    assert stub.GetJob(common_pb2.GetJobRequest(output=str(out))).job_id == job_id
    record = next(r for r in caplog.records if getattr(r, "job_id", None) == job_id)
    assert record.getMessage() == "job failed" and record.client_connected is False
    assert "1 of 2 items" in record.error

    shown = subprocess.run([sys.executable, "-m", "cli", "job", "render", job_id, "--server", address],
                           capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert shown.returncode == 1 and f"job {job_id} (render render): failed" in shown.stdout
    assert "1 of 2 items" in shown.stdout
    with pytest.raises(grpc.RpcError) as err:
        stub.GetJob(common_pb2.GetJobRequest(job_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
