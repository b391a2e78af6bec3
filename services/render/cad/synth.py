"""Random valid CAD models in the DeepCAD cad_json format.

A model is a base body (rectangle, regular polygon, rounded rectangle, slot, L-shape, D-shape or
circle, sometimes with holes) extruded as a new body, followed by up to three more features on the
principal planes: joined bosses, cut holes/pockets and occasional intersections, using all three
extent types. Each feature is kept only if the rebuilt solid stays non-empty and keeps most of
its volume, so every model rebuilds. ``random.Random`` makes the output identical for a seed on
every platform.
"""
from __future__ import annotations

import math
import random
import string

import numpy as np

from shared.cad.deepcad import parse_cad

from .geometry import combine, extrude_tool

# Right-handed sketch frames on the principal planes: (x_axis, y_axis, z_axis); z is the normal.
PLANES = {
    "+Z": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "-Z": ((1, 0, 0), (0, -1, 0), (0, 0, -1)),
    "+Y": ((-1, 0, 0), (0, 0, 1), (0, 1, 0)),
    "-Y": ((1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "+X": ((0, 1, 0), (0, 0, 1), (1, 0, 0)),
    "-X": ((0, -1, 0), (0, 0, 1), (-1, 0, 0)),
}
OPERATION_NAMES = {"new": "NewBodyFeatureOperation", "join": "JoinFeatureOperation",
                   "cut": "CutFeatureOperation", "intersect": "IntersectFeatureOperation"}
EXTENT_NAMES = {"one_side": "OneSideFeatureExtentType", "symmetric": "SymmetricFeatureExtentType",
                "two_sides": "TwoSidesFeatureExtentType"}


def item_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of a dataset rendered with ``seed``; independent of sharding."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def _p(x: float, y: float, z: float = 0.0) -> dict:
    return {"x": round(float(x), 6), "y": round(float(y), 6), "z": round(float(z), 6)}


class _Builder:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.entities: dict[str, dict] = {}
        self.sequence: list[dict] = []

    def new_id(self) -> str:
        # Onshape-style ids: 'F' + 13 letters/digits.
        while True:
            eid = "F" + "".join(self.rng.choice(string.ascii_letters + string.digits) for _ in range(13))
            if eid not in self.entities:
                return eid

    # ---- curves (points in the sketch frame) ----
    def line(self, a, b) -> dict:
        # DeepCAD does not keep loop order in each curve's direction; flip some to match.
        if self.rng.random() < 0.2:
            a, b = b, a
        return {"type": "Line3D", "start_point": _p(*a), "end_point": _p(*b), "curve": self.new_id()}

    def arc(self, center, radius, a0, a1) -> dict:
        """Counter-clockwise arc from angle a0 to a1 (radians, a1 > a0)."""
        cx, cy = center
        start = (cx + radius * math.cos(a0), cy + radius * math.sin(a0))
        end = (cx + radius * math.cos(a1), cy + radius * math.sin(a1))
        if self.rng.random() < 0.2:
            start, end = end, start
        return {"type": "Arc3D", "start_point": _p(*start), "end_point": _p(*end), "center_point": _p(cx, cy),
                "radius": round(radius, 6), "normal": _p(0, 0, 1), "start_angle": 0.0,
                "end_angle": round(a1 - a0, 6), "reference_vector": _p(math.cos(a0), math.sin(a0)),
                "curve": self.new_id()}

    def circle(self, center, radius) -> dict:
        return {"type": "Circle3D", "center_point": _p(*center), "radius": round(radius, 6),
                "normal": _p(0, 0, 1), "curve": self.new_id()}

    def polyline(self, pts) -> list[dict]:
        return [self.line(pts[i], pts[(i + 1) % len(pts)]) for i in range(len(pts))]

    # ---- shapes: (curves, description-free); each fits in [-w/2, w/2] x [-h/2, h/2] around (cx, cy) ----
    def shape(self, kind: str, cx: float, cy: float, w: float, h: float) -> list[dict]:
        rng = self.rng
        if kind == "rect":
            return self.polyline([(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2),
                                  (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)])
        if kind == "circle":
            return [self.circle((cx, cy), min(w, h) / 2)]
        if kind == "polygon":
            n = rng.randint(3, 8)
            r = min(w, h) / 2
            phase = rng.uniform(0, 2 * math.pi / n)
            return self.polyline([(cx + r * math.cos(phase + 2 * math.pi * k / n),
                                   cy + r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)])
        if kind == "rounded_rect":
            r = rng.uniform(0.1, 0.4) * min(w, h)
            x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
            return [self.line((x0 + r, y0), (x1 - r, y0)), self.arc((x1 - r, y0 + r), r, -math.pi / 2, 0),
                    self.line((x1, y0 + r), (x1, y1 - r)), self.arc((x1 - r, y1 - r), r, 0, math.pi / 2),
                    self.line((x1 - r, y1), (x0 + r, y1)), self.arc((x0 + r, y1 - r), r, math.pi / 2, math.pi),
                    self.line((x0, y1 - r), (x0, y0 + r)),
                    self.arc((x0 + r, y0 + r), r, math.pi, 3 * math.pi / 2)]
        if kind == "slot":
            if w < h:  # keep the slot along x
                w, h = h, w
            r = h / 2
            x0, x1 = cx - w / 2 + r, cx + w / 2 - r
            return [self.line((x0, cy - r), (x1, cy - r)), self.arc((x1, cy), r, -math.pi / 2, math.pi / 2),
                    self.line((x1, cy + r), (x0, cy + r)), self.arc((x0, cy), r, math.pi / 2, 3 * math.pi / 2)]
        if kind == "lshape":
            fx, fy = rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)
            x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
            return self.polyline([(x0, y0), (x1, y0), (x1, y0 + fy * h), (x0 + fx * w, y0 + fy * h),
                                  (x0 + fx * w, y1), (x0, y1)])
        if kind == "dshape":
            # A rectangle whose right side bulges out as a half circle.
            r = h / 2
            x0, x1 = cx - w / 2, cx + w / 2 - r
            return [self.line((x0, cy - r), (x1, cy - r)), self.arc((x1, cy), r, -math.pi / 2, math.pi / 2),
                    self.line((x1, cy + r), (x0, cy + r)), self.line((x0, cy + r), (x0, cy - r))]
        raise ValueError(kind)

    def holes(self, kind: str, cx: float, cy: float, w: float, h: float) -> list[list[dict]]:
        """Hole loops that lie well inside a base shape of this kind and size."""
        rng = self.rng
        if kind in ("circle", "polygon"):
            # Inside the inscribed circle of the shape (radius >= cos(pi/3) * r for n >= 3).
            r = min(w, h) / 2 * 0.45
            return [[self.circle((cx, cy), r * rng.uniform(0.3, 0.9))]]
        if kind in ("lshape", "dshape"):
            hw = min(w, h) * 0.12
            return [[self.circle((cx - w / 2 + 2 * hw, cy - h / 2 + 2 * hw), hw)]]
        n = rng.choice([1, 2, 4])
        hr = min(w, h) * rng.uniform(0.06, 0.12)
        if kind == "slot":
            hr = min(hr, min(w, h) * 0.3)
        centers = {1: [(cx, cy)],
                   2: [(cx - w / 4, cy), (cx + w / 4, cy)] if w >= h else [(cx, cy - h / 4), (cx, cy + h / 4)],
                   4: [(cx + sx * (w / 2 - 2.5 * hr), cy + sy * (h / 2 - 2.5 * hr))
                       for sx in (-1, 1) for sy in (-1, 1)]}[n]
        if n == 4 and (w < 6 * hr or h < 6 * hr):
            centers = [(cx, cy)]
        if rng.random() < 0.3 and n == 1:
            return [self.shape("rect", cx, cy, w * 0.3, h * 0.3)]
        return [[self.circle(c, hr)] for c in centers]

    # ---- entities ----
    def sketch(self, plane: str, origin, loops: list[list[dict]]) -> tuple[str, str]:
        x, y, z = PLANES[plane]
        sid, pid = self.new_id(), self.new_id()
        self.entities[sid] = {
            "name": f"Sketch {sum(1 for e in self.entities.values() if e['type'] == 'Sketch') + 1}",
            "type": "Sketch",
            "profiles": {pid: {"loops": [{"is_outer": i == 0, "profile_curves": curves}
                                         for i, curves in enumerate(loops)], "properties": {}}},
            "transform": {"origin": _p(*origin), "x_axis": _p(*x), "y_axis": _p(*y), "z_axis": _p(*z)},
            "reference_plane": {},
        }
        return sid, pid

    def extrude(self, sid: str, pid: str, operation: str, extent: str, d1: float, d2: float = 0.0) -> str:
        eid = self.new_id()

        def dist(v: float) -> dict:
            return {"distance": {"type": "ModelParameter", "role": "AlongDistance", "name": "none",
                                 "value": round(v, 6)},
                    "taper_angle": {"type": "ModelParameter", "role": "TaperAngle", "name": "none", "value": 0.0},
                    "type": "DistanceExtentDefinition"}

        n = sum(1 for e in self.entities.values() if e["type"] == "ExtrudeFeature") + 1
        self.entities[eid] = {
            "name": f"Extrude {n}", "type": "ExtrudeFeature",
            "profiles": [{"profile": pid, "sketch": sid}],
            "operation": OPERATION_NAMES[operation],
            "start_extent": {"type": "ProfilePlaneStartDefinition"},
            "extent_type": EXTENT_NAMES[extent],
            "extent_one": dist(d1),
            "extent_two": dist(d2),
        }
        return eid

    def data(self, bbox=None) -> dict:
        out = {"entities": self.entities, "sequence": self.sequence, "properties": {}}
        if bbox is not None:
            out["properties"]["bounding_box"] = {"type": "BoundingBox3D", "min_point": _p(*bbox[0]),
                                                 "max_point": _p(*bbox[1])}
        return out


def _plane_coords(plane: str, lo: np.ndarray, hi: np.ndarray):
    """Box extents expressed in a plane's sketch frame: (u range, v range, w range along normal)."""
    x, y, z = (np.array(a, dtype=float) for a in PLANES[plane])
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    return [(float((corners @ ax).min()), float((corners @ ax).max())) for ax in (x, y, z)]


def _extent(rng: random.Random, depth_lo: float, depth_hi: float) -> tuple[str, float, float, float, float]:
    """A random extent covering [depth_lo, depth_hi] along the normal: (type, d1, d2, z0, z1)."""
    kind = rng.choice(["one_side", "symmetric", "two_sides"])
    if kind == "one_side":
        return kind, depth_hi, 0.0, 0.0, depth_hi
    if kind == "symmetric":
        half = max(abs(depth_lo), abs(depth_hi))
        return kind, half, 0.0, -half, half
    return kind, depth_hi, -depth_lo, depth_lo, depth_hi


def generate_cad_json(seed: int) -> dict:
    """One random model in DeepCAD cad_json format, identical for a given seed."""
    rng = random.Random(seed)
    b = _Builder(rng)

    def step(eid: str) -> None:
        b.sequence.append({"index": len(b.sequence), "type": b.entities[eid]["type"], "entity": eid})

    # Base feature.
    base_kind = rng.choice(["rect", "rect", "polygon", "rounded_rect", "slot", "lshape", "dshape", "circle"])
    w, h = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
    if base_kind in ("slot", "dshape"):
        w, h = max(w, h) * 1.2, min(w, h)
    plane = rng.choice(["+Z", "+Z", "-Z", "+Y", "-Y", "+X", "-X"])
    origin = tuple(rng.choice([0.0, 0.0, rng.uniform(-0.2, 0.2)]) for _ in range(3))
    loops = [b.shape(base_kind, 0.0, 0.0, w, h)]
    if rng.random() < 0.5:
        loops += b.holes(base_kind, 0.0, 0.0, w, h)
    sid, pid = b.sketch(plane, origin, loops)
    depth = rng.uniform(0.05, 0.6)
    kind, d1, d2, _, _ = _extent(rng, -depth * rng.uniform(0, 0.5), depth)
    eid = b.extrude(sid, pid, "new", kind, d1, d2)
    step(sid)
    step(eid)
    model = parse_cad(b.data())
    body = extrude_tool(model, model.extrudes[0])

    for _ in range(rng.randint(0, 3)):
        for _attempt in range(4):
            snapshot = (dict(b.entities), list(b.sequence))
            op = rng.choices(["join", "cut", "intersect"], weights=[0.45, 0.42, 0.13])[0]
            bb = body.bounding_box()
            lo, hi = np.array(bb[:3]), np.array(bb[3:])
            plane = rng.choice(list(PLANES))
            (u0, u1), (v0, v1), (w0, w1) = _plane_coords(plane, lo, hi)
            fw, fh = rng.uniform(0.2, 0.6) * (u1 - u0), rng.uniform(0.2, 0.6) * (v1 - v0)
            cu = rng.uniform(u0 + fw / 2, u1 - fw / 2)
            cv = rng.uniform(v0 + fh / 2, v1 - fh / 2)
            kind = rng.choice(["rect", "circle", "polygon", "slot", "rounded_rect"])
            x, y, z = (np.array(a, dtype=float) for a in PLANES[plane])
            thick = w1 - w0
            if op == "join":
                # A boss standing on the face at the far end of the normal.
                sketch_w = w1 - rng.uniform(0.0, 0.3) * thick
                height = (w1 - sketch_w) + rng.uniform(0.1, 0.5) * max(u1 - u0, v1 - v0)
                # Two-sided and symmetric bosses also sink into the body, which the union hides.
                ext = _extent(rng, -rng.uniform(0.1, 0.5) * (w1 - sketch_w + 0.2 * thick), height)
            elif op == "cut":
                # A hole through or a pocket from the face the normal points out of.
                through = rng.random() < 0.6
                sketch_w = w1 if not through else (w0 + w1) / 2
                if through:
                    ext = _extent(rng, -(sketch_w - w0) - 0.05 * thick, (w1 - sketch_w) + 0.05 * thick)
                else:
                    ext = ("two_sides", 0.05 * thick, rng.uniform(0.2, 0.7) * thick, 0, 0)
                fw, fh = fw * 0.8, fh * 0.8
            else:
                # Intersect with a large rounded shape: trims the corners, keeps the middle.
                sketch_w = (w0 + w1) / 2
                kind = rng.choice(["circle", "rounded_rect", "polygon"])
                fw, fh = (u1 - u0) * rng.uniform(0.85, 1.0), (v1 - v0) * rng.uniform(0.85, 1.0)
                cu, cv = (u0 + u1) / 2, (v0 + v1) / 2
                if kind == "circle":
                    fw = fh = max(fw, fh) * 1.05
                ext = ("symmetric", thick * 0.6, 0.0, 0, 0)
            if kind == "slot" and min(fw, fh) <= 0:
                continue
            sid, pid = b.sketch(plane, tuple(z * sketch_w), [b.shape(kind, cu, cv, fw, fh)])
            eid = b.extrude(sid, pid, op, ext[0], ext[1], ext[2])
            step(sid)
            step(eid)
            try:
                model = parse_cad(b.data())
                tool = extrude_tool(model, model.extrudes[-1])
                new_body = combine(body, tool, op)
                ok = (not new_body.is_empty()) and new_body.volume() > 0.3 * body.volume() \
                    and len(new_body.decompose()) == 1
            except ValueError:
                ok = False
            if ok:
                body = new_body
                break
            b.entities, b.sequence = snapshot

    bb = body.bounding_box()
    return b.data(bbox=(bb[:3], bb[3:]))
