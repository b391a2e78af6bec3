"""Parse DeepCAD ``cad_json`` models into small typed objects.

The format (one JSON object per model): ``entities`` maps an id to a Sketch or an ExtrudeFeature,
``sequence`` lists ``{index, type, entity}`` in feature order, ``properties.bounding_box`` holds the
model's box. Sketch curve points are 2D coordinates in the sketch frame (their ``z`` is 0); the
sketch ``transform`` (origin, x_axis, y_axis, z_axis) places that frame in the world.

The DeepCAD format is a contract two services share: the render service rebuilds and rasterises these
models, the convert service describes them in words. Everything here is pure data.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import deadlines
from shared.errors import InvalidArgument, NotFound
from shared.storage import is_url, open_store

OPERATIONS = {
    "NewBodyFeatureOperation": "new",
    "JoinFeatureOperation": "join",
    "CutFeatureOperation": "cut",
    "IntersectFeatureOperation": "intersect",
}
EXTENTS = {
    "OneSideFeatureExtentType": "one_side",
    "SymmetricFeatureExtentType": "symmetric",
    "TwoSidesFeatureExtentType": "two_sides",
}


class CadFormatError(InvalidArgument):
    """A cad_json model that does not follow the DeepCAD format (or cannot be rebuilt)."""


@dataclass(frozen=True)
class Line:
    start: tuple[float, float]
    end: tuple[float, float]


@dataclass(frozen=True)
class Arc:
    """A circular arc through ``start``, ``mid`` and ``end`` (``mid`` fixes which way round)."""

    start: tuple[float, float]
    end: tuple[float, float]
    center: tuple[float, float]
    radius: float
    mid: tuple[float, float]
    sweep: float  # radians, from the angle fields; > 0


@dataclass(frozen=True)
class Circle:
    center: tuple[float, float]
    radius: float


Curve = Line | Arc | Circle


@dataclass(frozen=True)
class Loop:
    curves: tuple[Curve, ...]
    is_outer: bool


@dataclass(frozen=True)
class Profile:
    id: str
    loops: tuple[Loop, ...]


@dataclass(frozen=True)
class Frame:
    origin: np.ndarray
    x_axis: np.ndarray
    y_axis: np.ndarray
    z_axis: np.ndarray

    def matrix(self) -> np.ndarray:
        """3x4 affine matrix taking sketch coordinates to world coordinates."""
        return np.column_stack([self.x_axis, self.y_axis, self.z_axis, self.origin])


@dataclass(frozen=True)
class Sketch:
    id: str
    name: str
    frame: Frame
    profiles: dict[str, Profile]


@dataclass(frozen=True)
class Extrude:
    id: str
    name: str
    profiles: tuple[tuple[str, str], ...]  # (sketch id, profile id)
    operation: str  # new | join | cut | intersect
    extent: str  # one_side | symmetric | two_sides
    distance_one: float
    distance_two: float

    def z_range(self) -> tuple[float, float]:
        """Extent along the sketch normal, as DeepCAD's cadlib builds it (``create_by_extrude``).

        cadlib extrudes a prism of extent_one along the normal (a negative value points it the other
        way); symmetric unites it with its mirror image, two-sided with a prism of extent_two against the
        normal (signed the same way). Each side starts on the sketch plane, so their union is the one
        range from the lowest to the highest of 0 and the sides' far ends; a zero side adds nothing.
        """
        if self.extent == "symmetric":
            ends = (self.distance_one, -self.distance_one)
        elif self.extent == "two_sides":
            ends = (self.distance_one, -self.distance_two)
        else:
            ends = (self.distance_one,)
        return (min(0.0, *ends), max(0.0, *ends))


@dataclass(frozen=True)
class CadModel:
    sketches: dict[str, Sketch]
    extrudes: tuple[Extrude, ...]  # in sequence order
    bbox: tuple[np.ndarray, np.ndarray] | None


def _num(value, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise CadFormatError(f"{what}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise CadFormatError(f"{what}: not a finite number ({value!r})")
    return out


def _xyz(d, what: str) -> tuple[float, float, float]:
    """An {x, y, z} object as floats (z may be absent); plain Python since models have many points."""
    try:
        x, y, z = float(d["x"]), float(d["y"]), float(d.get("z", 0.0))
    except (TypeError, KeyError, ValueError, AttributeError):
        # Slow path only to name what is wrong.
        if not isinstance(d, dict):
            raise CadFormatError(f"{what}: expected an {{x, y, z}} object, got {type(d).__name__}") from None
        if "x" not in d or "y" not in d:
            raise CadFormatError(f"{what}: missing x or y") from None
        return _num(d["x"], f"{what}.x"), _num(d["y"], f"{what}.y"), _num(d.get("z", 0.0), f"{what}.z")
    if not math.isfinite(x + y + z):
        raise CadFormatError(f"{what}: coordinates must be finite numbers, got {d!r}")
    return x, y, z


def _vec(d, what: str) -> np.ndarray:
    return np.array(_xyz(d, what), dtype=np.float64)


def _pt(d, what: str) -> tuple[float, float]:
    return _xyz(d, what)[:2]


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n < 1e-12:
        raise CadFormatError(f"{what}: zero-length axis")
    return v / n


def _parse_arc(c: dict, what: str) -> Arc:
    start = _pt(c.get("start_point"), f"{what}.start_point")
    end = _pt(c.get("end_point"), f"{what}.end_point")
    center = _pt(c.get("center_point"), f"{what}.center_point")
    radius = _num(c.get("radius"), f"{what}.radius")
    if radius <= 0:
        raise CadFormatError(f"{what}: radius must be > 0, got {radius}")
    a0 = _num(c.get("start_angle", 0.0), f"{what}.start_angle")
    a1 = _num(c.get("end_angle", 0.0), f"{what}.end_angle")
    ref = c.get("reference_vector")
    rx, ry = _pt(ref, f"{what}.reference_vector") if ref is not None else (0.0, 0.0)
    if math.hypot(rx, ry) < 1e-12:
        # Without a reference direction, measure angles from the start point.
        rx, ry = start[0] - center[0], start[1] - center[1]
    norm = math.hypot(rx, ry)
    if norm < 1e-12:
        raise CadFormatError(f"{what}: start point is the centre")
    rx, ry = rx / norm, ry / norm
    # Angles run counter-clockwise about the arc normal; a normal along -z (in the sketch frame)
    # turns them clockwise as seen in the sketch.
    normal = c.get("normal")
    sign = -1.0 if normal is not None and _xyz(normal, f"{what}.normal")[2] < 0 else 1.0
    mid_angle = sign * (a0 + a1) / 2.0
    cs, sn = math.cos(mid_angle), math.sin(mid_angle)
    mid = (center[0] + radius * (cs * rx - sn * ry), center[1] + radius * (sn * rx + cs * ry))
    return Arc(start=start, end=end, center=center, radius=radius, mid=mid, sweep=abs(a1 - a0))


def _parse_curve(c: dict, what: str) -> Curve:
    deadlines.check()  # a loop can have 10k curves
    if not isinstance(c, dict):
        raise CadFormatError(f"{what}: expected an object")
    kind = c.get("type")
    if kind == "Line3D":
        return Line(_pt(c.get("start_point"), f"{what}.start_point"), _pt(c.get("end_point"), f"{what}.end_point"))
    if kind == "Arc3D":
        return _parse_arc(c, what)
    if kind == "Circle3D":
        radius = _num(c.get("radius"), f"{what}.radius")
        if radius <= 0:
            raise CadFormatError(f"{what}: radius must be > 0, got {radius}")
        return Circle(_pt(c.get("center_point"), f"{what}.center_point"), radius)
    raise CadFormatError(f"{what}: unsupported curve type {kind!r}")


def _parse_sketch(eid: str, ent: dict) -> Sketch:
    what = f"sketch {eid}"
    tr = ent.get("transform")
    if not isinstance(tr, dict):
        raise CadFormatError(f"{what}: missing transform")
    frame = Frame(
        origin=_vec(tr.get("origin"), f"{what}.transform.origin"),
        x_axis=_unit(_vec(tr.get("x_axis"), f"{what}.transform.x_axis"), f"{what}.x_axis"),
        y_axis=_unit(_vec(tr.get("y_axis"), f"{what}.transform.y_axis"), f"{what}.y_axis"),
        z_axis=_unit(_vec(tr.get("z_axis"), f"{what}.transform.z_axis"), f"{what}.z_axis"),
    )
    profiles: dict[str, Profile] = {}
    raw = ent.get("profiles")
    if not isinstance(raw, dict):
        raise CadFormatError(f"{what}: profiles must be an object")
    for pid, prof in raw.items():
        loops = []
        for li, loop in enumerate((prof or {}).get("loops") or []):
            curves = loop.get("profile_curves") or []
            if not curves:
                raise CadFormatError(f"{what} profile {pid} loop {li}: no curves")
            loops.append(Loop(
                curves=tuple(_parse_curve(c, f"{what} profile {pid} loop {li} curve {ci}")
                             for ci, c in enumerate(curves)),
                is_outer=bool(loop.get("is_outer", li == 0)),
            ))
        if not loops:
            raise CadFormatError(f"{what} profile {pid}: no loops")
        profiles[pid] = Profile(pid, tuple(loops))
    return Sketch(eid, str(ent.get("name", eid)), frame, profiles)


def _distance(ext, what: str) -> float:
    if not isinstance(ext, dict) or not isinstance(ext.get("distance"), dict):
        raise CadFormatError(f"{what}: missing distance")
    return _num(ext["distance"].get("value"), f"{what}.distance.value")


def _parse_extrude(eid: str, ent: dict, sketches: dict[str, Sketch]) -> Extrude:
    what = f"extrude {eid}"
    op = OPERATIONS.get(ent.get("operation"))
    if op is None:
        raise CadFormatError(f"{what}: unsupported operation {ent.get('operation')!r}")
    extent = EXTENTS.get(ent.get("extent_type"))
    if extent is None:
        raise CadFormatError(f"{what}: unsupported extent_type {ent.get('extent_type')!r}")
    d1 = _distance(ent.get("extent_one"), f"{what}.extent_one")
    d2 = _distance(ent.get("extent_two"), f"{what}.extent_two") if extent == "two_sides" else 0.0
    refs = []
    for ref in ent.get("profiles") or []:
        sid, pid = ref.get("sketch"), ref.get("profile")
        if sid not in sketches:
            raise CadFormatError(f"{what}: refers to unknown sketch {sid!r}")
        if pid not in sketches[sid].profiles:
            raise CadFormatError(f"{what}: sketch {sid} has no profile {pid!r}")
        refs.append((sid, pid))
    if not refs:
        raise CadFormatError(f"{what}: no profiles")
    out = Extrude(eid, str(ent.get("name", eid)), tuple(refs), op, extent, d1, d2)
    lo, hi = out.z_range()
    if hi - lo <= 0:
        raise CadFormatError(f"{what}: zero extrude depth")
    return out


def parse_cad(data: dict) -> CadModel:
    """Parse one cad_json object; raises CadFormatError (an InvalidArgument) naming the bad field."""
    if not isinstance(data, dict):
        raise CadFormatError("cad_json: top level must be an object")
    entities = data.get("entities")
    sequence = data.get("sequence")
    if not isinstance(entities, dict) or not isinstance(sequence, list):
        raise CadFormatError("cad_json: needs 'entities' (object) and 'sequence' (list)")
    sketches: dict[str, Sketch] = {}
    extrudes: list[Extrude] = []
    for step in sorted(sequence, key=lambda s: s.get("index", 0)):
        deadlines.check()
        eid = step.get("entity")
        ent = entities.get(eid)
        if not isinstance(ent, dict):
            raise CadFormatError(f"sequence step {step.get('index')}: unknown entity {eid!r}")
        kind = ent.get("type", step.get("type"))
        if kind == "Sketch":
            sketches[eid] = _parse_sketch(eid, ent)
        elif kind == "ExtrudeFeature":
            extrudes.append(_parse_extrude(eid, ent, sketches))
        else:
            raise CadFormatError(f"entity {eid}: unsupported feature type {kind!r}")
    if not extrudes:
        raise CadFormatError("cad_json: no ExtrudeFeature in the sequence")
    bbox = None
    bb = (data.get("properties") or {}).get("bounding_box")
    if isinstance(bb, dict) and "min_point" in bb and "max_point" in bb:
        bbox = (_vec(bb["min_point"], "bounding_box.min_point"), _vec(bb["max_point"], "bounding_box.max_point"))
    return CadModel(sketches, tuple(extrudes), bbox)


def load_cad_json(path: str | Path) -> dict:
    """Read a cad_json file; unreadable or non-JSON content raises CadFormatError."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise CadFormatError(f"{Path(path).name}: cannot read JSON ({exc})") from None


# Files a published dataset carries beside its models: never cad_json inputs.
_BOOKKEEPING = {"MANIFEST.json", "metadata.json"}


def list_cad_json(location: str | Path) -> tuple[list[str], str | None]:
    """(sorted cad_json paths or keys, the store URL they are keys in or None) under ``location``.

    The output of `render cad-synth` is a published dataset, so its manifest and metadata are skipped.
    """
    loc = str(location)
    if is_url(loc):
        keys = [k for k in open_store(loc).list() if k.endswith(".json")]
        inputs, source = keys, loc
    else:
        root = Path(loc)
        if not root.is_dir():
            raise NotFound(f"cad_json input directory {root} does not exist")
        inputs, source = [str(p) for p in root.rglob("*.json")], None
    inputs = sorted(k for k in inputs if k.rsplit("/", 1)[-1] not in _BOOKKEEPING and "/_shards/" not in k)
    if not inputs:
        raise InvalidArgument(f"no .json files under {loc}")
    return inputs, source
