"""TinyLLaVA conversion and validation on models and renders made by the test itself."""
from __future__ import annotations

import json
import math
import shutil
import threading
import time

import pytest
from PIL import Image

from services.convert.describe import describe_cad
from services.convert.tinyllava import TEMPLATES, VIEWS, convert_tinyllava
from services.convert.validate import validate_tinyllava
from services.render.cad import generate_cad_json, render_directory
from shared import deadlines

N_MODELS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tl")
    cad = root / "cad_json" / "0000"
    cad.mkdir(parents=True)
    for i in range(N_MODELS):
        (cad / f"{i:08d}.json").write_text(json.dumps(generate_cad_json(i)))
    rendered = root / "rendered"
    summary = render_directory(root / "cad_json", rendered)
    assert summary["rendered"] == N_MODELS and summary["failed"] == 0
    stats = convert_tinyllava(root / "cad_json", rendered, root / "out", seed=3, val_fraction=0.34)
    return root, stats


def _copy(dataset, tmp_path):
    root, _ = dataset
    dst = tmp_path / "copy"
    shutil.copytree(root / "out", dst)
    return dst


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_conversion_writes_a_valid_dataset(dataset):
    root, stats = dataset
    out = root / "out"
    assert stats.models == N_MODELS and stats.records == 3 * N_MODELS
    assert stats.val_records == 3 * 2 and stats.train_records == 3 * 4
    train = json.loads((out / "train.json").read_text())
    val = json.loads((out / "val.json").read_text())
    rec = train[0]
    assert set(rec) == {"id", "image", "conversations"}
    assert rec["image"] == f"{rec['id']}.png" and (root / "rendered" / "images" / rec["image"]).exists()
    human, gpt = rec["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert gpt["from"] == "gpt" and "extru" in gpt["value"].lower()
    # Every model contributes its three views to exactly one split.
    models = {}
    for split, recs in (("train", train), ("val", val)):
        for r in recs:
            models.setdefault(r["id"].rsplit("_", 1)[0], []).append((split, r["id"].rsplit("_", 1)[1]))
    assert len(models) == N_MODELS
    assert all(len({s for s, _ in v}) == 1 and sorted(w for _, w in v) == sorted(VIEWS) for v in models.values())
    # Prompts vary: more than one template is used across the 18 records.
    assert len({r["conversations"][0]["value"] for r in train + val}) > 3
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["num_records"] == 18 and info["conversation_length"]["min_chars"] > 50
    meta = json.loads((out / "tinyllava_metadata.json").read_text())
    assert meta["image_size"] == [512, 512] and meta["templates"] == len(TEMPLATES)

    report = validate_tinyllava(out)
    assert report.ok, str(report)
    assert report.counts["records"] == 18 and report.counts["images"] == 18
    assert "OK" in str(report)


def test_seeded_split_is_deterministic(dataset, tmp_path):
    root, _ = dataset
    a = convert_tinyllava(root / "cad_json", root / "rendered", tmp_path / "a", seed=3, val_fraction=0.34)
    assert a.records == 18
    assert (tmp_path / "a" / "train.json").read_bytes() == (root / "out" / "train.json").read_bytes()
    assert (tmp_path / "a" / "train_val_split.json").read_bytes() == \
        (root / "out" / "train_val_split.json").read_bytes()


def test_split_file_is_honoured(dataset, tmp_path):
    root, _ = dataset
    split = {"train": ["0000/00000000", "0000/00000001", "0000/00000002"], "validation": ["0000/00000003"],
             "test": ["0000/00000004"]}  # 00000005 is in no split
    (tmp_path / "split.json").write_text(json.dumps(split))
    stats = convert_tinyllava(root / "cad_json", root / "rendered", tmp_path / "o", split_file=tmp_path / "split.json")
    assert (stats.train_records, stats.val_records, stats.test_records) == (9, 3, 3)
    assert stats.skipped == {"not_in_split": 1}
    val = json.loads((tmp_path / "o" / "val.json").read_text())
    assert {r["id"] for r in val} == {f"00000003_{v}" for v in VIEWS}
    assert validate_tinyllava(tmp_path / "o").ok


def test_models_without_all_views_are_skipped(dataset, tmp_path):
    root, _ = dataset
    rendered = tmp_path / "rendered"
    shutil.copytree(root / "rendered", rendered)
    (rendered / "images" / "00000002_top.png").unlink()
    stats = convert_tinyllava(root / "cad_json", rendered, tmp_path / "o", val_fraction=0.2)
    assert stats.models == N_MODELS - 1 and stats.skipped == {"missing_images": 1}


def test_validate_catches_a_missing_image(dataset, tmp_path):
    root, _ = dataset
    images = tmp_path / "images"
    shutil.copytree(root / "rendered" / "images", images)
    (images / "00000001_front.png").unlink()
    report = validate_tinyllava(root / "out", image_folder=str(images))
    assert not report.ok
    assert any("00000001_front.png is missing" in p for p in report.problems), report.problems


def test_validate_catches_a_wrong_image_size(dataset, tmp_path):
    root, _ = dataset
    images = tmp_path / "images"
    shutil.copytree(root / "rendered" / "images", images)
    Image.new("RGB", (256, 256), "white").save(images / "00000004_right.png")
    report = validate_tinyllava(root / "out", image_folder=str(images))
    assert any("00000004_right.png is 256x256, expected 512x512" in p for p in report.problems), report.problems
    # A truncated file is caught by the decode.
    data = (images / "00000003_top.png").read_bytes()
    (images / "00000003_top.png").write_bytes(data[: len(data) // 2])
    report = validate_tinyllava(root / "out", image_folder=str(images))
    assert any("00000003_top.png does not decode" in p for p in report.problems), report.problems


@pytest.mark.parametrize("field,value", [("human", "<image>\n<image>\nDescribe."), ("human", "Describe."),
                                         ("gpt", "It has an <image> token.")])
def test_validate_catches_bad_image_token_counts(dataset, tmp_path, field, value):
    out = _copy(dataset, tmp_path)

    def corrupt(doc):
        turn = 0 if field == "human" else 1
        doc[0]["conversations"][turn]["value"] = value

    _edit(out / "train.json", corrupt)
    report = validate_tinyllava(out)
    assert any("train.json[0]" in p and "<image> tokens, expected exactly 1" in p for p in report.problems), \
        report.problems
    # The edit also breaks the published checksums.
    assert any("train.json does not match" in p for p in report.problems)


def test_validate_catches_non_alternating_turns(dataset, tmp_path):
    out = _copy(dataset, tmp_path)

    def corrupt(doc):
        doc[1]["conversations"][1]["from"] = "human"

    _edit(out / "val.json", corrupt)
    report = validate_tinyllava(out)
    assert any("val.json[1]: turn 1 is from 'human', expected 'gpt'" in p for p in report.problems), report.problems


def test_validate_catches_overlapping_splits(dataset, tmp_path):
    out = _copy(dataset, tmp_path)
    split = json.loads((out / "train_val_split.json").read_text())
    moved = split["train"][0]

    def overlap(doc):
        doc["validation"].append(moved)

    _edit(out / "train_val_split.json", overlap)
    report = validate_tinyllava(out)
    assert any("in both train and val" in p for p in report.problems), report.problems

    # Records of one model in both train.json and val.json.
    out2 = tmp_path / "copy2"
    shutil.copytree(dataset[0] / "out", out2)
    train = json.loads((out2 / "train.json").read_text())
    same_model = train[0]["id"].rsplit("_", 1)[0] + "_extra"
    _edit(out2 / "val.json", lambda doc: doc.append({**train[0], "id": same_model}))
    report = validate_tinyllava(out2)
    assert any("1 model(s) have records in both train.json and val.json" in p for p in report.problems), \
        report.problems
    assert any("val.json: 1 model(s) not in the val split" in p for p in report.problems)
    assert any("dataset_info.json counts 18 records, the files hold 19" in p for p in report.problems)


def test_validate_catches_counts_and_manifest_mismatch(dataset, tmp_path):
    out = _copy(dataset, tmp_path)
    (out / "MANIFEST.json").unlink()
    report = validate_tinyllava(out)
    assert report.problems == ["MANIFEST.json is missing (the dataset was not published)"]


def test_description_reads_the_json():
    def P(x, y, z=0.0):
        return {"x": x, "y": y, "z": z}

    def ln(a, b):
        return {"type": "Line3D", "start_point": P(*a), "end_point": P(*b)}

    square = [ln((-0.2, -0.2), (0.2, -0.2)), ln((0.2, -0.2), (0.2, 0.2)), ln((0.2, 0.2), (-0.2, 0.3)),
              ln((-0.2, 0.3), (-0.2, -0.2))]
    rect = [ln((-0.2, -0.1), (0.2, -0.1)), ln((0.2, -0.1), (0.2, 0.1)), ln((0.2, 0.1), (-0.2, 0.1)),
            ln((-0.2, 0.1), (-0.2, -0.1))]
    hole = {"type": "Circle3D", "center_point": P(0, 0), "radius": 0.025, "normal": P(0, 0, 1)}
    slot_arc = {"type": "Arc3D", "start_point": P(0.2, -0.1), "end_point": P(0.2, 0.1), "center_point": P(0.2, 0),
                "radius": 0.1, "normal": P(0, 0, 1), "start_angle": 0.0, "end_angle": math.pi,
                "reference_vector": P(0, -1)}
    hole2 = dict(hole, center_point=P(0.1, 0))
    frame = {"origin": P(0, 0, 0.05), "x_axis": P(1, 0, 0), "y_axis": P(0, 1, 0), "z_axis": P(0, 0, 1)}
    data = {
        "entities": {
            "s1": {"type": "Sketch", "transform": {**frame, "origin": P(0, 0, 0)},
                   "profiles": {"p": {"loops": [{"is_outer": True, "profile_curves": rect},
                                                {"is_outer": False, "profile_curves": [hole]},
                                                {"is_outer": False, "profile_curves": [hole2]}]}}},
            "e1": {"type": "ExtrudeFeature", "profiles": [{"profile": "p", "sketch": "s1"}],
                   "operation": "NewBodyFeatureOperation", "extent_type": "OneSideFeatureExtentType",
                   "extent_one": {"distance": {"value": 0.05}}},
            "s2": {"type": "Sketch", "transform": frame,
                   "profiles": {"q": {"loops": [{"is_outer": True, "profile_curves": [
                       ln((-0.2, -0.1), (0.2, -0.1)), slot_arc, ln((0.2, 0.1), (-0.2, 0.1)),
                       ln((-0.2, 0.1), (-0.2, -0.1))]}]}}},
            "e2": {"type": "ExtrudeFeature", "profiles": [{"profile": "q", "sketch": "s2"}],
                   "operation": "CutFeatureOperation", "extent_type": "SymmetricFeatureExtentType",
                   "extent_one": {"distance": {"value": 0.02}}},
        },
        "sequence": [{"index": i, "entity": e} for i, e in enumerate(["s1", "e1", "s2", "e2"])],
    }
    text = describe_cad(data)
    assert "2 extrusions" in text
    assert "on the XY plane (normal +Z), sketch a rectangle 0.4 × 0.2 with 2 circular holes of diameter 0.05" in text
    assert "Extrude it 0.05 along the normal (one side) as a new body" in text
    assert "a plane parallel to XY at Z = 0.05" in text
    # The arc bulges out to x = 0.3: the outline is 0.5 wide.
    assert "a closed outline of 3 lines and 1 arc (radius 0.1) spanning 0.5 × 0.2" in text
    assert "symmetrically by 0.04 in total (0.02 on each side of the sketch) and cut it from the body" in text
    assert "a 4-sided polygon" in describe_cad(
        {**data, "entities": {**data["entities"], "s1": {**data["entities"]["s1"], "profiles": {
            "p": {"loops": [{"is_outer": True, "profile_curves": square}]}}}}})



def test_store_urls_and_process_pools(dataset, tmp_path, monkeypatch):
    """The same conversion through file:// store URLs and worker pools gives the same records."""
    import services.convert.tinyllava as tl
    import services.convert.validate as vd

    root, _ = dataset
    monkeypatch.setattr(tl, "MIN_POOL_ITEMS", 1)
    monkeypatch.setattr(vd, "MIN_POOL_IMAGES", 1)
    stats = convert_tinyllava(f"file://{root / 'cad_json'}", f"file://{root / 'rendered'}",
                              f"file://{tmp_path / 'viaurl'}", seed=3, val_fraction=0.34, workers=2)
    assert stats.records == 18 and stats.out.endswith("/viaurl")
    for name in ("train.json", "val.json", "train_val_split.json"):
        assert (tmp_path / "viaurl" / name).read_bytes() == (root / "out" / name).read_bytes()
    report = validate_tinyllava(f"file://{tmp_path / 'viaurl'}", workers=2)
    assert report.ok, str(report)
    assert report.counts["images"] == 18


def test_pool_workers_stop_at_the_clients_deadline(dataset, tmp_path, monkeypatch):
    import services.convert.tinyllava as tl
    from shared.parallel import pool_context

    root, _ = dataset
    monkeypatch.setattr(tl, "MIN_POOL_ITEMS", 1)
    # As in a service, another thread runs, so the pool starts its workers by forkserver: they do not
    # inherit this thread's context, and only the deadline the initializer carries can stop them.
    running = threading.Event()
    other = threading.Thread(target=running.wait)
    other.start()
    try:
        assert pool_context().get_start_method() == "forkserver"
        with deadlines.client_deadline_at(time.monotonic()), pytest.raises(deadlines.DeadlineExceeded):
            convert_tinyllava(root / "cad_json", root / "rendered", tmp_path / "o", workers=2)
    finally:
        running.set()
        other.join()
    assert not (tmp_path / "o").exists()
