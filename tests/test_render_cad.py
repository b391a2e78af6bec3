"""CAD rendering: DeepCAD fixtures built here, checked on the rebuilt solid and on rendered pixels."""
from __future__ import annotations

import io
import json
import math
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from services.render.cad import (
    CadFormatError,
    CadRenderJob,
    CadSynthJob,
    generate_cad_json,
    parse_cad,
    rebuild,
    render_cad,
)
from services.render.cad.raster import EDGE_COLOR

# ---- DeepCAD fixture builders (independent of the synth generator) ----

FRAMES = {
    "+Z": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "-Z": ((1, 0, 0), (0, -1, 0), (0, 0, -1)),
    "-Y": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "+X": ((0, 1, 0), (0, 0, 1), (1, 0, 0)),
}
EXTENT = {"one": "OneSideFeatureExtentType", "sym": "SymmetricFeatureExtentType",
          "two": "TwoSidesFeatureExtentType"}
OP = {"new": "NewBodyFeatureOperation", "join": "JoinFeatureOperation", "cut": "CutFeatureOperation",
      "intersect": "IntersectFeatureOperation"}


def P(x, y, z=0.0):
    return {"x": x, "y": y, "z": z}


def line(a, b):
    return {"type": "Line3D", "start_point": P(*a), "end_point": P(*b), "curve": "c"}


def circle(c, r):
    return {"type": "Circle3D", "center_point": P(*c), "radius": r, "normal": P(0, 0, 1), "curve": "c"}


def rect(x0, y0, x1, y1):
    return [line((x0, y0), (x1, y0)), line((x1, y0), (x1, y1)), line((x1, y1), (x0, y1)), line((x0, y1), (x0, y0))]


def model(*features):
    """features: dicts with loops, plane, origin, op, extent, d1, d2."""
    entities, sequence = {}, []
    for i, f in enumerate(features):
        x, y, z = FRAMES[f.get("plane", "+Z")]
        sid, eid = f"S{i}", f"E{i}"
        entities[sid] = {"type": "Sketch", "name": sid, "transform": {
            "origin": P(*f.get("origin", (0, 0, 0))), "x_axis": P(*x), "y_axis": P(*y), "z_axis": P(*z)},
            "profiles": {"p": {"loops": [{"is_outer": j == 0, "profile_curves": lp}
                                         for j, lp in enumerate(f["loops"])]}}}
        entities[eid] = {"type": "ExtrudeFeature", "name": eid, "profiles": [{"profile": "p", "sketch": sid}],
                         "operation": OP[f.get("op", "new")], "extent_type": EXTENT[f.get("extent", "one")],
                         "extent_one": {"distance": {"value": f["d1"]}},
                         "extent_two": {"distance": {"value": f.get("d2", 0.0)}}}
        sequence += [{"index": 2 * i, "type": "Sketch", "entity": sid},
                     {"index": 2 * i + 1, "type": "ExtrudeFeature", "entity": eid}]
    return {"entities": entities, "sequence": sequence, "properties": {}}


def views(data):
    pngs = render_cad(data)
    out = {}
    for name, png in pngs.items():
        img = Image.open(io.BytesIO(png))
        assert img.size == (512, 512) and img.mode == "RGB"
        out[name] = np.asarray(img)
    return out


def fg(img):
    return img.min(-1) < 250


def extent_px(img):
    """(width, height) in pixels of the non-white area."""
    ys, xs = np.nonzero(fg(img))
    return xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


# ---- tests ----

def test_box_views_have_right_aspect_and_shared_scale():
    v = views(model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)], "d1": 0.1}))  # 0.4 x 0.2 x 0.1
    (fw, fh), (tw, th), (rw, rh) = extent_px(v["front"]), extent_px(v["top"]), extent_px(v["right"])
    assert fw / fh == pytest.approx(4.0, rel=0.04)  # front: X by Z
    assert tw / th == pytest.approx(2.0, rel=0.03)  # top: X by Y
    assert rw / rh == pytest.approx(2.0, rel=0.03)  # right: Y by Z
    # One scale for the 3 views: the same world length has the same pixel length everywhere.
    assert fw == tw and th == rw and fh == rh
    # The largest side fills the frame less the margin.
    assert 420 < fw < 512
    # Silhouettes carry dark edges.
    row = v["top"][256]
    xs = np.nonzero(fg(v["top"])[256])[0]
    assert (row[xs[0]] == EDGE_COLOR).all() and (row[xs[-1]] == EDGE_COLOR).all()


def test_through_hole_shows_only_along_its_axis():
    plate = model({"loops": [rect(-0.2, -0.2, 0.2, 0.2), [circle((0, 0), 0.08)]], "d1": 0.05})
    solid = rebuild(parse_cad(plate))
    assert solid.volume() == pytest.approx(0.4 * 0.4 * 0.05 - math.pi * 0.08**2 * 0.05, rel=0.01)
    v = views(plate)
    top = fg(v["top"])
    assert not top[256, 256]  # looking down the hole: background
    # The hole is round and of the right size: radius 0.08 of a 0.4 frame.
    hole_px = (~top[150:362, 150:362]).sum()
    scale = extent_px(v["top"])[0] / 0.4
    assert hole_px == pytest.approx(math.pi * (0.08 * scale) ** 2, rel=0.06)
    # Across the plate the hole is hidden.
    assert fg(v["front"])[256, 256] and fg(v["right"])[256, 256]
    assert not (~fg(v["front"])[250:262, 200:312]).any()


def test_cut_removes_material():
    block = {"loops": [rect(-0.2, -0.2, 0.2, 0.2)], "d1": 0.2}
    # Sketch on the top face with its normal pointing down, cutting 0.1 into the right half.
    cut = {"loops": [rect(0.0, -0.3, 0.3, 0.3)], "plane": "-Z", "origin": (0, 0, 0.2), "op": "cut", "d1": 0.1}
    solid = rebuild(parse_cad(model(block, cut)))
    assert solid.volume() == pytest.approx(0.4 * 0.4 * 0.2 - 0.2 * 0.4 * 0.1, rel=1e-6)
    front = fg(views(model(block, cut))["front"])
    cols = np.nonzero(front.any(0))[0]
    left = front[:, cols[0] + 20].sum()
    right = front[:, cols[-1] - 20].sum()
    assert right == pytest.approx(left / 2, rel=0.04)


# DeepCAD's cadlib (create_by_extrude) builds a prism of extent_one along the sketch normal (a negative
# value goes the other way); symmetric unites it with its mirror image, two-sided with a prism of
# extent_two against the normal (signed likewise). Every side starts on the sketch plane.
@pytest.mark.parametrize("extent,d1,d2,zrange", [
    ("one", 0.2, 0.0, (0.0, 0.2)),
    ("one", -0.2, 0.0, (-0.2, 0.0)),  # one side, negative: against the normal
    ("sym", 0.1, 0.0, (-0.1, 0.1)),  # extent_one is the depth on each side
    ("sym", -0.1, 0.0, (-0.1, 0.1)),
    ("two", 0.15, 0.05, (-0.05, 0.15)),  # both positive: one side each way
    ("two", -0.02, 0.02, (-0.02, 0.0)),  # the case: both sides against the normal, the same prism
    ("two", -0.1, 0.2, (-0.2, 0.0)),  # negative extent_one: both sides against the normal, overlapping
    ("two", 0.15, -0.05, (0.0, 0.15)),  # negative extent_two: both along the normal, the shorter inside
    ("two", -0.1, -0.05, (-0.1, 0.05)),  # both negative: one side each way, mirrored
    ("two", 0.0, 0.1, (-0.1, 0.0)),  # a zero side adds nothing
])
def test_extent_types_and_signs_follow_deepcad(extent, d1, d2, zrange):
    slab = {"loops": [rect(-0.3, -0.2, 0.2, 0.2)], "extent": extent, "d1": d1, "d2": d2}
    solid = rebuild(parse_cad(model(slab)))
    bb = solid.bounding_box()
    assert (bb[2], bb[5]) == pytest.approx(zrange, abs=1e-9)
    # United, not stacked: overlapping sides count once.
    assert solid.volume() == pytest.approx(0.5 * 0.4 * (zrange[1] - zrange[0]), rel=1e-6)

    # In pixels, against a post beside the slab that spans z in [-0.3, 0.3]: where the slab sits, not
    # only how thick it is.
    post = {"loops": [rect(0.25, -0.05, 0.35, 0.05)], "origin": (0, 0, -0.3), "op": "join", "d1": 0.6}
    front = fg(views(model(slab, post))["front"])
    cols = np.nonzero(front.any(0))[0]
    post_rows = np.nonzero(front[:, cols[-1] - 5])[0]
    slab_rows = np.nonzero(front[:, cols[0] + 5])[0]
    scale = (post_rows[-1] + 1 - post_rows[0]) / 0.6  # pixels per unit
    z_top = 0.3 - (slab_rows[0] - post_rows[0]) / scale
    z_bottom = 0.3 - (slab_rows[-1] + 1 - post_rows[0]) / scale
    assert (z_bottom, z_top) == pytest.approx(zrange, abs=0.004)


def _d_shape(arc):
    # Rectangle [-0.2, 0.2] x [-0.1, 0.1] whose right side is the given half circle about (0.2, 0).
    return [line((-0.2, -0.1), (0.2, -0.1)), arc, line((0.2, 0.1), (-0.2, 0.1)), line((-0.2, 0.1), (-0.2, -0.1))]


@pytest.mark.parametrize("arc", [
    # Counter-clockwise from -90 deg to +90 deg, measured from the reference vector (0, -1).
    {"start_point": P(0.2, -0.1), "end_point": P(0.2, 0.1), "normal": P(0, 0, 1), "reference_vector": P(0, -1),
     "start_angle": 0.0, "end_angle": math.pi},
    # The same arc listed end to start (DeepCAD does not orient curves along the loop).
    {"start_point": P(0.2, 0.1), "end_point": P(0.2, -0.1), "normal": P(0, 0, 1), "reference_vector": P(0, -1),
     "start_angle": 0.0, "end_angle": math.pi},
    # Angles about a normal along -z run clockwise: from (0, 1) round through (1, 0).
    {"start_point": P(0.2, 0.1), "end_point": P(0.2, -0.1), "normal": P(0, 0, -1), "reference_vector": P(0, 1),
     "start_angle": 0.0, "end_angle": math.pi},
])
def test_arcs_bulge_the_way_their_angles_say(arc):
    arc = {"type": "Arc3D", "center_point": P(0.2, 0.0), "radius": 0.1, "curve": "a", **arc}
    data = model({"loops": [_d_shape(arc)], "d1": 0.05})
    expected = 0.4 * 0.2 + math.pi * 0.1**2 / 2  # a bulge inwards would give 0.4*0.2 - that
    assert rebuild(parse_cad(data)).volume() == pytest.approx(expected * 0.05, rel=0.01)
    top = views(data)["top"]
    w, h = extent_px(top)
    assert w / h == pytest.approx(0.5 / 0.2, rel=0.03)


def test_join_and_intersect():
    base = {"loops": [rect(-0.2, -0.2, 0.2, 0.2)], "d1": 0.1}
    boss = {"loops": [[circle((0, 0), 0.1)]], "origin": (0, 0, 0.1), "op": "join", "d1": 0.1}
    joined = rebuild(parse_cad(model(base, boss)))
    assert joined.volume() == pytest.approx(0.016 + math.pi * 0.01 * 0.1, rel=0.01)
    # Intersect with a cylinder along Y through the block: only the part inside the cylinder stays.
    cyl = {"loops": [[circle((0, 0.05), 0.3)]], "plane": "-Y", "op": "intersect", "extent": "sym", "d1": 0.5}
    inter = rebuild(parse_cad(model(base, cyl)))
    assert 0 < inter.volume() <= 0.016 + 1e-9
    assert inter.volume() == pytest.approx(0.016, rel=0.2)


def test_rendering_is_deterministic():
    data = generate_cad_json(7)
    assert render_cad(data) == render_cad(json.loads(json.dumps(data)))


def test_malformed_models_are_reported_and_others_render(tmp_path):
    good = model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)], "d1": 0.1})
    (tmp_path / "a_good.json").write_text(json.dumps(good))
    (tmp_path / "b_notjson.json").write_text("{not json")
    no_transform = json.loads(json.dumps(good))
    del no_transform["entities"]["S0"]["transform"]
    (tmp_path / "c_notransform.json").write_text(json.dumps(no_transform))
    open_loop = model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)[:3]], "d1": 0.1})
    (tmp_path / "d_open.json").write_text(json.dumps(open_loop))
    emptied = model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)], "d1": 0.1},
                    {"loops": [rect(-1, -1, 1, 1)], "origin": (0, 0, -1), "op": "cut", "d1": 2})
    (tmp_path / "e_empty.json").write_text(json.dumps(emptied))
    (tmp_path / "f_good.json").write_text(json.dumps(generate_cad_json(3)))

    job = CadRenderJob.from_input(tmp_path, shard_size=4)
    files = job.render_shard(0, 0, 4) | job.render_shard(1, 4, 6)
    images = sorted(k for k in files if k.startswith("images/"))
    assert images == [f"images/{m}_{v}.png" for m in ("a_good", "f_good") for v in ("front", "right", "top")]
    failures = json.loads(files["failures/00000.json"]) + json.loads(files["failures/00001.json"])
    reasons = {f["model_id"]: f["reason"] for f in failures}
    assert set(reasons) == {"b_notjson", "c_notransform", "d_open", "e_empty"}
    assert "cannot read JSON" in reasons["b_notjson"]
    assert "transform" in reasons["c_notransform"]
    assert "not closed" in reasons["d_open"]
    assert "empty" in reasons["e_empty"]
    info = job.shard_info(0, 0, 4, job.render_shard(0, 0, 4))
    assert info["rendered"] == 1 and info["failed"] == 3


def test_cad_job_through_sharded_writer(tmp_path):
    from services.render import shards
    from shared.storage import open_store

    src = tmp_path / "json"
    src.mkdir()
    for i in range(5):
        (src / f"{i:08d}.json").write_text(json.dumps(generate_cad_json(100 + i)))
    (src / "99999999.json").write_text(json.dumps({"entities": {}, "sequence": []}))
    store = open_store(tmp_path / "store")
    manifest = shards.run_sharded(CadRenderJob.from_input(src, shard_size=2), store, "renders/cad", workers=2)
    assert manifest.meta["rendered"] == 5 and manifest.meta["failed"] == 1
    assert manifest.meta["failures"][0]["model_id"] == "99999999"
    png = store.get_verified("renders/cad", "images/00000003_top.png")
    assert Image.open(io.BytesIO(png)).size == (512, 512)


def test_bad_fields_raise_typed_errors():
    bad = model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)], "d1": 0.1})
    bad["entities"]["E0"]["operation"] = "LoftFeatureOperation"
    with pytest.raises(CadFormatError, match="unsupported operation"):
        parse_cad(bad)
    zero = model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)], "d1": 0.0})
    with pytest.raises(CadFormatError, match="zero extrude depth"):
        parse_cad(zero)
    zero_sides = model({"loops": [rect(-0.2, -0.1, 0.2, 0.1)], "extent": "two", "d1": 0.0, "d2": 0.0})
    with pytest.raises(CadFormatError, match="zero extrude depth"):
        parse_cad(zero_sides)


def test_synth_models_all_rebuild_and_are_deterministic():
    seen_ops, seen_extents, seen_curves = set(), set(), set()
    for seed in range(50):
        data = generate_cad_json(seed)
        solid = rebuild(parse_cad(data))
        assert solid.volume() > 0, seed
        bb = data["properties"]["bounding_box"]
        assert bb["max_point"]["x"] > bb["min_point"]["x"]
        for ent in data["entities"].values():
            if ent["type"] == "ExtrudeFeature":
                seen_ops.add(ent["operation"])
                seen_extents.add(ent["extent_type"])
            else:
                for prof in ent["profiles"].values():
                    seen_curves.update(c["type"] for lp in prof["loops"] for c in lp["profile_curves"])
    assert seen_ops == set(OP.values())
    assert seen_extents == set(EXTENT.values())
    assert seen_curves == {"Line3D", "Arc3D", "Circle3D"}
    assert json.dumps(generate_cad_json(11)) == json.dumps(generate_cad_json(11))
    assert generate_cad_json(11) != generate_cad_json(12)


def test_synth_job_shards_are_independent_of_boundaries():
    job = CadSynthJob(seed=5, total=6, shard_size=3)
    a = job.render_shard(0, 0, 3) | job.render_shard(1, 3, 6)
    b = job.render_shard(0, 0, 6)
    assert a == b and sorted(a) == [f"json/{i:08d}.json" for i in range(6)]
    parse_cad(json.loads(a["json/00000004.json"]))


def test_cad_job_reads_inputs_from_a_store_url(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m1.json").write_text(json.dumps(generate_cad_json(21)))
    job = CadRenderJob.from_input(f"file://{tmp_path / 'in'}")
    assert job.inputs == ["m1.json"] and job.source is not None
    files = job.render_shard(0, 0, 1)
    assert sorted(files) == ["failures/00000.json", "images/m1_front.png", "images/m1_right.png",
                             "images/m1_top.png"]
    assert files["images/m1_top.png"] == render_cad(generate_cad_json(21))["top"]
    # Workers get a pickled copy; the open store client stays behind and is reopened there.
    clone = pickle.loads(pickle.dumps(job))
    assert clone._store is None and clone.render_shard(0, 0, 1) == files


# ---- many-point loops, time budgets and client deadlines (issue 14, item 4) ----

def _polygon_loop(n: int, radius: float = 0.3, seed: int = 0) -> list[dict]:
    """A regular n-gon as n lines, listed in random order with half of them reversed, as DeepCAD may."""
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    pts = [(radius * math.cos(a), radius * math.sin(a)) for a in t]
    lines = [line(pts[i], pts[(i + 1) % n]) for i in range(n)]
    rng = np.random.default_rng(seed)
    for i in rng.choice(n, n // 2, replace=False):
        lines[i] = line(pts[(i + 1) % n], pts[i])
    first, rest = lines[0], lines[1:]
    return [first] + [rest[i] for i in rng.permutation(n - 1)]


@pytest.mark.timeout(60)
def test_a_loop_of_ten_thousand_curves_chains_in_seconds_not_minutes():
    from services.render.cad.geometry import loop_polygon

    n = 10_000
    loop = parse_cad(model({"loops": [_polygon_loop(n)], "d1": 0.1})).sketches["S0"].profiles["p"].loops[0]
    t0 = time.perf_counter()
    poly = loop_polygon(loop)
    # ~0.1-0.25 s alone, ~1 s under a full suite's load; the quadratic chaining took over 60 s. A bound with room
    # for a loaded CI machine still tells the two apart.
    assert time.perf_counter() - t0 < 5.0
    # Every vertex once, each step to a neighbour on the circle: the n-gon's edge length.
    assert poly.shape == (n, 2)
    steps = np.linalg.norm(np.diff(np.vstack([poly, poly[:1]]), axis=0), axis=1)
    assert steps == pytest.approx(2 * 0.3 * math.sin(math.pi / n), rel=1e-6)
    assert len({(round(x, 9), round(y, 9)) for x, y in poly}) == n


def _many_bosses(n: int) -> dict:
    """A plate with ``n`` round bosses joined one by one: each union grows the mesh the next one meets,
    so the model takes ~10 s of CPU at n=400 although its JSON is small."""
    feats = [{"loops": [rect(-1, -1, 1, 1)], "d1": 0.05}]
    for i in range(n):
        x, y = -0.95 + 1.9 * ((i * 0.6180339) % 1), -0.95 + 1.9 * ((i * 0.7548776) % 1)
        feats.append({"loops": [[circle((x, y), 0.03)]], "origin": (0, 0, 0.05), "op": "join",
                      "d1": 0.02 + 0.001 * (i % 17)})
    return model(*feats)


def test_a_model_over_its_time_budget_fails_with_the_reason_while_the_others_render(tmp_path):
    (tmp_path / "a_good.json").write_text(json.dumps(generate_cad_json(3)))
    (tmp_path / "b_slow.json").write_text(json.dumps(_many_bosses(400)))
    (tmp_path / "c_good.json").write_text(json.dumps(generate_cad_json(4)))
    job = CadRenderJob.from_input(tmp_path, size=64, budget_s=1.0)
    t0 = time.perf_counter()
    files = job.render_shard(0, 0, 3)
    assert time.perf_counter() - t0 < 6  # the slow model alone would take ~10 s
    assert sorted(k for k in files if k.startswith("images/")) == [
        f"images/{m}_{v}.png" for m in ("a_good", "c_good") for v in ("front", "right", "top")]
    failures = json.loads(files["failures/00000.json"])
    assert [(f["model_id"], f["reason"]) for f in failures] == [
        ("b_slow", "model b_slow took longer than its time budget of 1 s")]


def test_the_model_budget_comes_from_the_environment(tmp_path, monkeypatch):
    from shared.cad.budget import BUDGET_ENV, DEFAULT_BUDGET_S, model_budget_s
    from shared.errors import InvalidArgument

    (tmp_path / "m.json").write_text(json.dumps(generate_cad_json(3)))
    assert CadRenderJob.from_input(tmp_path).budget_s == DEFAULT_BUDGET_S
    monkeypatch.setenv(BUDGET_ENV, "2.5")
    assert CadRenderJob.from_input(tmp_path).budget_s == 2.5
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(InvalidArgument, match=BUDGET_ENV):
            model_budget_s({BUDGET_ENV: bad})
