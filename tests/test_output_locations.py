"""Render and convert write datasets only: into the artifact store's datasets/ area or a local folder outside
the store, never into models/ or runs/, whatever the spelling (URL, store:, '..', a symlink, a relative path).
Through the real RenderService and ConvertService over gRPC, and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from services.convert.server import register as register_convert
from shared.errors import InvalidArgument
from shared.pb import convert_pb2, convert_pb2_grpc, render_pb2, render_pb2_grpc
from shared.storage import open_output, open_store
from tests.harness.services import register_render, serving

ROOT = Path(__file__).resolve().parent.parent
LOGOS = dict(count=4, seed=1, logos=render_pb2.LogoRender(image_size=32, val_per_class=1))


@pytest.fixture(scope="module")
def render_stub():
    with serving("render", register_render) as ch:
        yield render_pb2_grpc.RenderServiceStub(ch)


@pytest.fixture(scope="module")
def convert_stub():
    with serving("convert", register_convert) as ch:
        yield convert_pb2_grpc.ConvertServiceStub(ch)


@pytest.fixture
def store_root(tmp_path, monkeypatch) -> Path:
    """The platform's store (TRAINYARD_HOME/artifacts), holding a published model, as the services see it."""
    monkeypatch.setenv("TRAINYARD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TRAINYARD_STORE", raising=False)
    root = tmp_path / "home" / "artifacts"
    open_store(root).publish("models/mnist_ultralight/1", {"model.safetensors": b"weights"})
    return root


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def escapes(store_root: Path, tmp_path: Path) -> list[str]:
    """Spellings of places inside the store but outside its datasets area."""
    (tmp_path / "link").symlink_to(store_root / "models")
    (tmp_path / "elsewhere").mkdir()
    return [
        str(store_root / "models" / "mnist_ultralight" / "2"),
        f"file://{store_root}/runs/r1/data",
        "store:models/mnist_ultralight/2",
        "store:datasets/../models/mnist_ultralight/2",
        f"{tmp_path}/elsewhere/../home/artifacts/models/mnist_ultralight/2",
        f"{tmp_path}/link/mnist_ultralight/2",  # a symlink into models/
        "models/mnist_ultralight/2",  # relative to the server's working directory, the store
        str(store_root),  # the store itself
        str(store_root / "datasets"),  # the area itself, not a dataset in it
        str(tmp_path / "home"),  # a folder holding the store
        "s3://bucket/models/mnist_ultralight/2",  # object storage outside the (local) store
    ]


def test_render_service_writes_only_datasets(render_stub, store_root, tmp_path, monkeypatch):
    monkeypatch.chdir(store_root)
    before = tree(store_root)
    for out in escapes(store_root, tmp_path):
        with pytest.raises(grpc.RpcError) as err:
            list(render_stub.Render(render_pb2.RenderRequest(out=out, **LOGOS), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, out
        assert "datasets" in err.value.details() or "'..'" in err.value.details(), out
    assert tree(store_root) == before  # nothing planted, not even a folder

    for out, where in ((str(store_root / "datasets" / "logos"), store_root / "datasets" / "logos"),
                       ("store:datasets/logos2", store_root / "datasets" / "logos2"),
                       (str(tmp_path / "elsewhere" / "logos"), tmp_path / "elsewhere" / "logos")):
        assert list(render_stub.Render(render_pb2.RenderRequest(out=out, **LOGOS), timeout=60))[-1].state == \
            "succeeded"
        assert (where / "MANIFEST.json").is_file()
    assert open_store(store_root).list_published("models") == ["models/mnist_ultralight/1"]


def test_convert_service_writes_only_datasets(convert_stub, render_stub, store_root, tmp_path, monkeypatch):
    monkeypatch.chdir(store_root)
    logos = str(store_root / "datasets" / "logos")
    list(render_stub.Render(render_pb2.RenderRequest(out=logos, **LOGOS), timeout=60))
    before = tree(store_root)
    for out in escapes(store_root, tmp_path):
        with pytest.raises(grpc.RpcError) as err:
            list(convert_stub.ToTinyLlava(convert_pb2.TinyLlavaRequest(cad_json=logos, images=logos, out=out),
                                          timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, out
        for rpc in (convert_stub.IndexImageFolder, convert_stub.IndexTrajectories):
            with pytest.raises(grpc.RpcError) as err:
                rpc(convert_pb2.IndexRequest(path=logos, out=out), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, out
    assert tree(store_root) == before
    # The default index location, beside a dataset in the datasets area, is in the datasets area.
    assert convert_stub.IndexImageFolder(convert_pb2.IndexRequest(path=logos), timeout=60).index_location == \
        f"{logos}-index"


def test_cli_render_and_convert_refuse_the_model_store(store_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINYARD_", "AWS_"))}
    env["TRAINYARD_HOME"] = str(tmp_path / "home")
    before = tree(store_root)
    for args in (["render", "logos", "--out", str(store_root / "models/mnist_ultralight/2"), "--count", "4"],
                 ["convert", "index-images", str(tmp_path), "--out", "store:runs/r1/index"]):
        run = subprocess.run([sys.executable, "-m", "cli", *args, *(["--no-progress"] if args[0] == "render" else [])],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        assert "not in its datasets area" in run.stderr and "store:datasets/<name>" in run.stderr
    assert tree(store_root) == before


def test_object_store_outputs_go_to_the_stores_datasets_area(monkeypatch):
    monkeypatch.setenv("TRAINYARD_STORE", "s3://trainyard")
    monkeypatch.setenv("TRAINYARD_S3_ENDPOINT", "127.0.0.1:1")  # opening a store connects to nothing
    store, prefix = open_output("s3://trainyard/datasets/digits")
    assert (store.url, prefix) == ("s3://trainyard/datasets", "digits")
    store, prefix = open_output("store:datasets/team/digits")
    assert (store.url, prefix) == ("s3://trainyard/datasets/team", "digits")
    for out in ("s3://trainyard/models/m/2", "s3://trainyard/runs/r", "s3://trainyard/datasets",
                "s3://other-bucket/datasets/x", "s3://trainyard/datasets/../models/m/2", "store:studies/s"):
        with pytest.raises(InvalidArgument):
            open_output(out)
