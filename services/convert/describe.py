"""Readable construction text for a DeepCAD model, derived from its JSON (never from the mesh).

For each extrusion: the sketch plane, the profile shapes with their dimensions, the holes, the
extrude distance and extent type, and the operation. Shapes are recognised from the curves:
circles, rectangles/squares, triangles, regular polygons, slots, rounded rectangles, and any other
outline by its curve counts and overall size.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from shared import deadlines
from shared.cad.deepcad import Arc, CadModel, Circle, Extrude, Line, Loop, Sketch, parse_cad

POLYGON_NAMES = {5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon", 9: "nonagon", 10: "decagon"}
AXES = ("X", "Y", "Z")
PLANE_OF_NORMAL = {0: "YZ", 1: "XZ", 2: "XY"}


def fmt(v: float) -> str:
    """Four significant digits, no '-0'."""
    s = f"{v:.4g}"
    return "0" if s in ("-0", "0") else s


def _close(a: float, b: float, rel: float = 0.02) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _arc_bounds(arc: Arc) -> list[tuple[float, float]]:
    """Points that bound the arc: its ends, its mid point and any axis extreme on its side."""
    cx, cy = arc.center
    a_s = math.atan2(arc.start[1] - cy, arc.start[0] - cx)
    a_e = math.atan2(arc.end[1] - cy, arc.end[0] - cx)
    a_m = math.atan2(arc.mid[1] - cy, arc.mid[0] - cx)
    ccw = (a_e - a_s) % (2 * math.pi) or 2 * math.pi
    forward = (a_m - a_s) % (2 * math.pi) <= ccw
    pts = [arc.start, arc.end, arc.mid]
    for k in range(4):
        a = k * math.pi / 2
        rel = (a - a_s) % (2 * math.pi) if forward else (a_s - a) % (2 * math.pi)
        if rel <= (ccw if forward else 2 * math.pi - ccw):
            pts.append((cx + arc.radius * math.cos(a), cy + arc.radius * math.sin(a)))
    return pts


def _loop_size(loop: Loop) -> tuple[float, float]:
    pts: list[tuple[float, float]] = []
    for c in loop.curves:
        if isinstance(c, Line):
            pts += [c.start, c.end]
        elif isinstance(c, Arc):
            pts += _arc_bounds(c)
        else:
            pts += [(c.center[0] - c.radius, c.center[1] - c.radius), (c.center[0] + c.radius, c.center[1] + c.radius)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return max(xs) - min(xs), max(ys) - min(ys)


def _length(line: Line) -> float:
    return math.hypot(line.end[0] - line.start[0], line.end[1] - line.start[1])


def _right_angles(lines: list[Line]) -> bool:
    dirs = [np.subtract(ln.end, ln.start) / max(_length(ln), 1e-12) for ln in lines]
    return all(abs(float(np.dot(dirs[i], dirs[(i + 1) % len(dirs)]))) < 0.02 for i in range(len(dirs)))


def shape_phrase(loop: Loop) -> tuple[str, str]:
    """(kind, phrase) for one loop, e.g. ('circle', 'a circle of diameter 0.1')."""
    curves = loop.curves
    lines = [c for c in curves if isinstance(c, Line)]
    arcs = [c for c in curves if isinstance(c, Arc)]
    if len(curves) == 1 and isinstance(curves[0], Circle):
        return "circle", f"a circle of diameter {fmt(2 * curves[0].radius)}"
    w, h = _loop_size(loop)
    size = f"{fmt(w)} × {fmt(h)}"
    if not arcs:
        n = len(lines)
        sides = [_length(ln) for ln in lines]
        if n == 3:
            return "triangle", f"a triangle spanning {size}"
        if n == 4 and _right_angles(lines):
            a, b = sides[0], sides[1]
            if _close(a, b):
                return "square", f"a square of side {fmt(a)}"
            return "rectangle", f"a rectangle {fmt(a)} × {fmt(b)}"
        if n >= 5 and all(_close(s, sides[0]) for s in sides):
            name = POLYGON_NAMES.get(n, f"{n}-sided polygon")
            return "polygon", f"a regular {name} with side {fmt(sides[0])} spanning {size}"
        return "polygon", f"a {n}-sided polygon spanning {size}"
    radii = sorted({fmt(a.radius) for a in arcs})
    if len(lines) == 2 and len(arcs) == 2 and all(_close(a.sweep, math.pi, 0.05) for a in arcs):
        return "slot", f"a slot {size} with rounded ends of radius {fmt(arcs[0].radius)}"
    if len(lines) == 4 and len(arcs) == 4 and all(_close(a.sweep, math.pi / 2, 0.05) for a in arcs) \
            and len(radii) == 1:
        return "rounded rectangle", f"a rounded rectangle {size} with corner radius {radii[0]}"
    parts = []
    if lines:
        parts.append(f"{len(lines)} line{'s' if len(lines) > 1 else ''}")
    parts.append(f"{len(arcs)} arc{'s' if len(arcs) > 1 else ''} (radius {', '.join(radii)})")
    return "outline", f"a closed outline of {' and '.join(parts)} spanning {size}"


def _holes_phrase(loops: list[Loop]) -> str:
    circles = Counter()
    others = []
    for loop in loops:
        kind, phrase = shape_phrase(loop)
        if kind == "circle":
            circles[fmt(2 * loop.curves[0].radius)] += 1
        else:
            others.append(phrase)
    parts = [f"{n} circular hole{'s' if n > 1 else ''} of diameter {d}" if n > 1 else f"a circular hole of diameter {d}"
             for d, n in circles.items()]
    parts += [f"a hole shaped as {p}" for p in others]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def profile_phrase(sketch: Sketch, profile_id: str) -> str:
    loops = list(sketch.profiles[profile_id].loops)
    outer_i = next((i for i, lp in enumerate(loops) if lp.is_outer), 0)
    outer = loops.pop(outer_i)
    text = shape_phrase(outer)[1]
    if loops:
        text += " with " + _holes_phrase(loops)
    return text


def plane_phrase(sketch: Sketch) -> str:
    z = sketch.frame.z_axis
    axis = int(np.argmax(np.abs(z)))
    if abs(abs(z[axis]) - 1.0) < 1e-6:
        sign = "+" if z[axis] > 0 else "-"
        offset = float(sketch.frame.origin[axis])
        plane = PLANE_OF_NORMAL[axis]
        if abs(offset) < 1e-9:
            return f"the {plane} plane (normal {sign}{AXES[axis]})"
        return f"a plane parallel to {plane} at {AXES[axis]} = {fmt(offset)} (normal {sign}{AXES[axis]})"
    o = sketch.frame.origin
    return (f"an inclined plane through ({fmt(o[0])}, {fmt(o[1])}, {fmt(o[2])}) "
            f"with normal ({fmt(z[0])}, {fmt(z[1])}, {fmt(z[2])})")


def extent_phrase(f: Extrude) -> str:
    if f.extent == "symmetric":
        d = abs(f.distance_one)
        return f"Extrude it symmetrically by {fmt(2 * d)} in total ({fmt(d)} on each side of the sketch)"
    if f.extent == "two_sides":
        return (f"Extrude it in two directions: {fmt(f.distance_one)} along the normal "
                f"and {fmt(f.distance_two)} the opposite way")
    direction = "along" if f.distance_one >= 0 else "against"
    return f"Extrude it {fmt(abs(f.distance_one))} {direction} the normal (one side)"


OPERATION_PHRASES = {
    "new": "as a new body",
    "join": "and join it to the body",
    "cut": "and cut it from the body",
    "intersect": "and keep only its intersection with the body",
}


def describe_model(model: CadModel) -> str:
    n = len(model.extrudes)
    sentences = [f"The part is built from {n} extrusion{'s' if n > 1 else ''}."]
    if model.bbox is not None:
        size = model.bbox[1] - model.bbox[0]
        sentences.append(f"Its overall size is {fmt(size[0])} × {fmt(size[1])} × {fmt(size[2])} (X × Y × Z).")
    for i, f in enumerate(model.extrudes, 1):
        deadlines.check()
        by_sketch: dict[str, list[str]] = {}
        for sid, pid in f.profiles:
            by_sketch.setdefault(sid, []).append(profile_phrase(model.sketches[sid], pid))
        sketched = []
        for sid, phrases in by_sketch.items():
            shapes = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            sketched.append(f"on {plane_phrase(model.sketches[sid])}, sketch {shapes}")
        sentences.append(f"Step {i}: " + "; ".join(sketched) + ".")
        sentences.append(f"{extent_phrase(f)} {OPERATION_PHRASES[f.operation]}.")
    return " ".join(sentences)


def describe_cad(data: dict) -> str:
    """The description of one cad_json object; raises CadFormatError for a malformed model."""
    return describe_model(parse_cad(data))
