"""Rebuild a parsed DeepCAD model as a solid with manifold3d.

Each extrude turns its profiles (loops discretised into polygons in the sketch frame, filled
even-odd so inner loops become holes) into a prism between the extent's two depths along the sketch
normal, moves it into the world with the sketch transform, and combines it with the body so far:
new body / join = union, cut = difference, intersect = intersection.
"""
from __future__ import annotations

import math

import numpy as np
from manifold3d import CrossSection, FillRule, Manifold, OpType

from shared import deadlines
from shared.cad.deepcad import Arc, CadFormatError, CadModel, Circle, Curve, Extrude, Line, Loop

# Segments for a full circle; arcs get a share proportional to their sweep. 64 keeps round holes
# round at 512 px while meshes stay small enough to render fast.
CIRCLE_SEGMENTS = 64


def _arc_points(arc: Arc, segments: int) -> np.ndarray:
    """Points from start to end (inclusive) going round the side that contains ``mid``."""
    cx, cy = arc.center
    a_s = math.atan2(arc.start[1] - cy, arc.start[0] - cx)
    a_e = math.atan2(arc.end[1] - cy, arc.end[0] - cx)
    a_m = math.atan2(arc.mid[1] - cy, arc.mid[0] - cx)
    ccw = (a_e - a_s) % (2 * math.pi)
    if ccw < 1e-9:  # start == end: a full turn, direction from the angle fields
        ccw = 2 * math.pi
    sweep = ccw if (a_m - a_s) % (2 * math.pi) <= ccw else ccw - 2 * math.pi
    n = max(2, int(math.ceil(abs(sweep) / (2 * math.pi) * segments)))
    t = a_s + sweep * np.linspace(0.0, 1.0, n + 1)
    # Radius from the start point, so the polyline meets the neighbouring curves exactly.
    r = math.hypot(arc.start[0] - cx, arc.start[1] - cy)
    pts = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)])
    pts[0], pts[-1] = arc.start, arc.end
    return pts


def curve_points(curve: Curve, segments: int = CIRCLE_SEGMENTS) -> np.ndarray:
    """Polyline of one curve from its start to its end (a circle: closed, last point omitted)."""
    if isinstance(curve, Line):
        return np.array([curve.start, curve.end], dtype=np.float64)
    if isinstance(curve, Arc):
        return _arc_points(curve, segments)
    if isinstance(curve, Circle):
        t = np.linspace(0.0, 2 * math.pi, segments, endpoint=False)
        return np.column_stack([curve.center[0] + curve.radius * np.cos(t),
                                curve.center[1] + curve.radius * np.sin(t)])
    raise CadFormatError(f"unsupported curve {type(curve).__name__}")


def _ring(kx: int, ky: int, r: int) -> list[tuple[int, int]]:
    """The grid cells at Chebyshev distance ``r`` from cell (kx, ky)."""
    if r == 0:
        return [(kx, ky)]
    side = range(-r, r + 1)
    return ([(kx + d, ky - r) for d in side] + [(kx + d, ky + r) for d in side]
            + [(kx - r, ky + d) for d in side[1:-1]] + [(kx + r, ky + d) for d in side[1:-1]])


def loop_polygon(loop: Loop, segments: int = CIRCLE_SEGMENTS) -> np.ndarray:
    """A closed polygon (k, 2) for one loop, chaining curves head to tail.

    DeepCAD does not promise that a loop's curves are listed head to tail or point the same way, so
    each next curve is the unused one with an end nearest the current end, reversed if needed (ties:
    a start before an end, then the earlier curve). Ends are bucketed in a grid about one curve long
    per cell, searched ring by ring outwards from the current end, so a step looks at a few cells
    instead of every curve (loops can have 10k curves).
    """
    if len(loop.curves) == 1 and isinstance(loop.curves[0], Circle):
        return curve_points(loop.curves[0], segments)
    if any(isinstance(c, Circle) for c in loop.curves):
        raise CadFormatError("a circle must be the only curve of its loop")
    pieces = []
    for c in loop.curves:
        deadlines.check()
        pieces.append(curve_points(c, segments))
    allpts = np.concatenate(pieces)
    diag = float(np.linalg.norm(allpts.max(0) - allpts.min(0)))
    tol = max(1e-9, 1e-2 * diag)
    # End 2i is curve i's start, 2i + 1 its end.
    ends = np.array([p[k] for p in pieces for k in (0, -1)], dtype=np.float64)
    chords = np.linalg.norm(ends[1::2] - ends[0::2], axis=1)
    # At least tol / 256 wide, so proving that nothing lies within tol takes at most 257 rings.
    cell = min(tol, max(float(np.median(chords)), tol / 256))
    grid: dict[tuple[int, int], list[int]] = {}
    for e, key in enumerate(map(tuple, np.floor(ends / cell).astype(np.int64).tolist())):
        grid.setdefault(key, []).append(e)
    xy = ends.tolist()
    used = [False] * len(pieces)
    used[0] = True
    chain = [pieces[0]]
    ex, ey = xy[1]  # the chain's current end
    for _ in range(len(pieces) - 1):
        deadlines.check()
        kx, ky = math.floor(ex / cell), math.floor(ey / cell)
        best = (math.inf, 0, 0)  # (distance, 0 start / 1 end, curve): the tie order is the tuple order
        r = 0
        while True:
            for key in _ring(kx, ky, r):
                for e in grid.get(key, ()):
                    if not used[e >> 1]:
                        x, y = xy[e]
                        best = min(best, (math.sqrt((x - ex) ** 2 + (y - ey) ** 2), e & 1, e >> 1))
            # Ends outside the rings searched so far lie at least this far away (less a rounding hair).
            reach = r * cell * 0.999
            if best[0] < reach or reach > tol:
                break
            r += 1
        gap, is_end, curve = best
        if gap > tol:
            # Nothing within tol: the gap to the nearest unused end, wherever it is, names the problem.
            gap = min(math.sqrt((x - ex) ** 2 + (y - ey) ** 2) for e, (x, y) in enumerate(xy) if not used[e >> 1])
            raise CadFormatError(f"loop is not closed: gap of {gap:.4g} between curves")
        used[curve] = True
        chain.append(pieces[curve][::-1] if is_end else pieces[curve])
        ex, ey = xy[2 * curve + 1 - is_end]
    closing = float(np.linalg.norm(chain[-1][-1] - chain[0][0]))
    if closing > tol:
        raise CadFormatError(f"loop is not closed: gap of {closing:.4g} between its last and first curve")
    # Each curve's last point is the next one's first; drop the duplicates.
    return np.concatenate([p[:-1] for p in chain])


def profile_polygons(model: CadModel, sketch_id: str, profile_id: str) -> list[np.ndarray]:
    profile = model.sketches[sketch_id].profiles[profile_id]
    return [loop_polygon(loop) for loop in profile.loops]


def extrude_tool(model: CadModel, feature: Extrude) -> Manifold:
    """The prism one extrude feature adds, cuts or intersects, in world coordinates."""
    by_sketch: dict[str, list[np.ndarray]] = {}
    for sid, pid in feature.profiles:
        # Even-odd per profile: its outer loop minus its hole loops, whichever order they come in.
        section = CrossSection(profile_polygons(model, sid, pid), FillRule.EvenOdd)
        if section.area() <= 0:
            raise CadFormatError(f"{feature.id}: profile {pid} has no area")
        by_sketch.setdefault(sid, []).append(section)
    z0, z1 = feature.z_range()
    parts = []
    for sid, sections in by_sketch.items():
        section = CrossSection.batch_boolean(sections, OpType.Add) if len(sections) > 1 else sections[0]
        frame = model.sketches[sid].frame
        if np.linalg.det(np.column_stack([frame.x_axis, frame.y_axis, frame.z_axis])) < 0:
            # A left-handed frame would turn the solid inside out: mirror the section in y and
            # flip the y axis, which maps every point to the same place.
            section = section.mirror((0.0, 1.0))
            matrix = np.column_stack([frame.x_axis, -frame.y_axis, frame.z_axis, frame.origin])
        else:
            matrix = frame.matrix()
        prism = section.extrude(z1 - z0).translate((0.0, 0.0, z0))
        parts.append(prism.transform(matrix))
    return Manifold.batch_boolean(parts, OpType.Add) if len(parts) > 1 else parts[0]


def combine(body: Manifold | None, tool: Manifold, operation: str) -> Manifold:
    if body is None or body.is_empty():
        if operation in ("new", "join"):
            return tool
        # Cutting or intersecting nothing leaves nothing.
        return Manifold()
    if operation in ("new", "join"):
        return body + tool
    if operation == "cut":
        return body - tool
    if operation == "intersect":
        return body ^ tool
    raise CadFormatError(f"unsupported operation {operation!r}")


def rebuild(model: CadModel) -> Manifold:
    """The model's final solid; raises CadFormatError when it cannot be built or ends up empty."""
    body: Manifold | None = None
    for feature in model.extrudes:
        deadlines.check()
        body = combine(body, extrude_tool(model, feature), feature.operation)
    if body is None or body.is_empty() or body.volume() <= 0:
        raise CadFormatError("the rebuilt solid is empty")
    return body


def mesh_arrays(solid: Manifold) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (n, 3) float64, triangles (m, 3) int64, counter-clockwise seen from outside)."""
    mesh = solid.to_mesh()
    verts = np.asarray(mesh.vert_properties, dtype=np.float64)[:, :3]
    tris = np.asarray(mesh.tri_verts, dtype=np.int64)
    return verts, tris
