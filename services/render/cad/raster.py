"""Orthographic z-buffer rasteriser for triangle meshes, in numpy.

View convention (third-angle projection, right-handed, never mirrored):
  front: looking along +Y  -> image right = +X, image up = +Z
  top:   looking along -Z  -> image right = +X, image up = +Y
  right: looking along -X  -> image right = +Y, image up = +Z

Framing: one scale for all views of a model, so that the largest bounding-box side spans the image
less a margin on each side; each view is centred on the box centre. Faces are flat (Lambert)
shaded in grey-blue on white; dark edges are drawn in image space where the surface normal turns
sharply, where depth jumps (occlusion) and at silhouettes.

Rasterisation is scan-line based and fully vectorised: back faces are culled (the mesh is closed
and counter-clockwise), each front face is cut into pixel rows, each row into pixels, and the
nearest fragment per pixel wins through ``np.minimum.at``.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from shared import deadlines

# name -> (image right, image up, view direction) in world coordinates.
VIEWS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]] = {
    "front": ((1, 0, 0), (0, 0, 1), (0, 1, 0)),
    "top": ((1, 0, 0), (0, 1, 0), (0, 0, -1)),
    "right": ((0, 1, 0), (0, 0, 1), (-1, 0, 0)),
}
VIEW_NAMES = tuple(VIEWS)

BASE_COLOR = np.array([128.0, 150.0, 190.0]) / 255.0  # grey-blue
EDGE_COLOR = np.array([35, 40, 55], dtype=np.uint8)
AMBIENT, DIFFUSE = 0.55, 0.6
# Light from upper left, in front of the viewer (camera coordinates: right, up, towards viewer).
LIGHT = np.array([-0.35, 0.5, 1.0]) / np.linalg.norm([-0.35, 0.5, 1.0])
CREASE_COS = float(np.cos(np.radians(30.0)))  # normals turning more than this draw an edge


def frame_scale(verts: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, float]:
    """Bounding-box centre and the pixels-per-unit scale shared by the views."""
    lo, hi = verts.min(0), verts.max(0)
    extent = float((hi - lo).max())
    scale = size * (1.0 - 2.0 * margin) / extent if extent > 0 else 1.0
    return (lo + hi) / 2.0, scale


def _rasterise(px: np.ndarray, py: np.ndarray, pz: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest triangle id per pixel (-1 = background) and its depth, for (m, 3) screen coordinates.

    Pixel (r, c) has its centre at (c + 0.5, r + 0.5); a triangle covers the centres inside it or on
    its edges, so neighbours sharing an edge leave no cracks.
    """
    m = px.shape[0]
    owner = np.full(h * w, -1, dtype=np.int32)
    zbuf = np.full(h * w, np.inf)
    # Rows whose centre lies within each triangle's vertical span.
    r0 = np.clip(np.ceil(py.min(1) - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.floor(py.max(1) - 0.5), -1, h - 1).astype(np.int64)
    nrows = np.maximum(r1 - r0 + 1, 0)
    tri = np.repeat(np.arange(m), nrows)
    if tri.size == 0:
        return owner.reshape(h, w), zbuf.reshape(h, w)
    starts = np.cumsum(nrows) - nrows
    row = r0[tri] + (np.arange(tri.size) - starts[tri])
    yc = row + 0.5
    # Span of each row: the leftmost and rightmost crossing of the triangle's three edges.
    xl = np.full(tri.size, np.inf)
    xr = np.full(tri.size, -np.inf)
    for a, b in ((0, 1), (1, 2), (2, 0)):
        ya, yb = py[tri, a], py[tri, b]
        xa, xb = px[tri, a], px[tri, b]
        dy = yb - ya
        ok = (yc >= np.minimum(ya, yb)) & (yc <= np.maximum(ya, yb)) & (dy != 0)
        t = np.where(ok, (yc - ya) / np.where(dy != 0, dy, 1.0), 0.0)
        x = xa + t * (xb - xa)
        xl = np.where(ok, np.minimum(xl, x), xl)
        xr = np.where(ok, np.maximum(xr, x), xr)
    valid = np.isfinite(xl)
    c0 = np.where(valid, np.clip(np.ceil(xl - 0.5), 0, w), 0).astype(np.int64)
    c1 = np.where(valid, np.clip(np.floor(xr - 0.5), -1, w - 1), -1).astype(np.int64)
    ncols = np.maximum(c1 - c0 + 1, 0)
    span = np.repeat(np.arange(tri.size), ncols)
    if span.size == 0:
        return owner.reshape(h, w), zbuf.reshape(h, w)
    # Depth plane z = z0 - (nx (x - x0) + ny (y - y0)) / nz from the triangle's normal in screen space.
    e1x, e1y, e1z = px[:, 1] - px[:, 0], py[:, 1] - py[:, 0], pz[:, 1] - pz[:, 0]
    e2x, e2y, e2z = px[:, 2] - px[:, 0], py[:, 2] - py[:, 0], pz[:, 2] - pz[:, 0]
    nz = e1x * e2y - e1y * e2x
    gx = -(e1y * e2z - e1z * e2y) / nz
    gy = -(e1z * e2x - e1x * e2z) / nz
    k = pz[:, 0] - gx * (px[:, 0] - 0.5) - gy * (py[:, 0] - 0.5)
    # Everything per pixel is "a running counter plus a per-row constant", so each pixel costs a
    # few sequential gathers instead of per-triangle lookups.
    first = np.cumsum(ncols) - ncols  # index of each row's first pixel
    col_off = c0 - first  # col = counter + col_off[row]
    idx_off = row * w + col_off  # flat pixel index = counter + idx_off[row]
    row_gx = gx[tri]
    row_base = k[tri] + gy[tri] * row  # depth at column 0 of the row
    counter = np.arange(span.size)
    col = counter + col_off[span]
    idx = counter + idx_off[span]
    depth = row_base[span] + row_gx[span] * col
    np.minimum.at(zbuf, idx, depth)
    win = depth <= zbuf[idx]
    owner[idx[win]] = tri[span[win]]
    return owner.reshape(h, w), zbuf.reshape(h, w)


def render_view(verts: np.ndarray, tris: np.ndarray, view: str, *, size: int = 512,
                center: np.ndarray, scale: float) -> np.ndarray:
    """One view as an (size, size, 3) uint8 RGB image."""
    right, up, fwd = (np.asarray(v, dtype=np.float64) for v in VIEWS[view])
    rel = verts - center
    u, v, d = rel @ right, rel @ up, rel @ fwd
    # Screen: x to the right, y down, depth in pixels (larger = farther).
    sx = size / 2.0 + u * scale
    sy = size / 2.0 - v * scale
    sz = d * scale
    tu, tv = u[tris], v[tris]
    area = (tu[:, 1] - tu[:, 0]) * (tv[:, 2] - tv[:, 0]) - (tu[:, 2] - tu[:, 0]) * (tv[:, 1] - tv[:, 0])
    # Counter-clockwise in (right, up) means the outward normal faces the viewer.
    front = area * scale * scale > 1e-9
    ftris = tris[front]
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    if ftris.size == 0:
        return img
    # Work only in the window the model covers (plus a pixel for the silhouette line), which for
    # flat parts is a fraction of the image.
    x0 = max(int(np.floor(sx.min())) - 2, 0)
    y0 = max(int(np.floor(sy.min())) - 2, 0)
    x1 = min(int(np.ceil(sx.max())) + 2, size)
    y1 = min(int(np.ceil(sy.max())) + 2, size)
    h, w = y1 - y0, x1 - x0
    owner, zbuf = _rasterise(sx[ftris] - x0, sy[ftris] - y0, sz[ftris], h, w)

    # Face normals in camera coordinates (right, up, towards viewer).
    p = verts[ftris]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
    ncam = np.column_stack([n @ right, n @ up, -(n @ fwd)])
    shade = AMBIENT + DIFFUSE * np.clip(ncam @ LIGHT, 0.0, 1.0)
    colors = np.clip(BASE_COLOR[None, :] * shade[:, None] * 255.0, 0, 255).astype(np.uint8)
    # Depth slope per pixel of each face, so a steep face is not mistaken for an occlusion step.
    slope = np.minimum(np.hypot(ncam[:, 0], ncam[:, 1]) / np.maximum(np.abs(ncam[:, 2]), 1e-6), 50.0)

    # Background is palette entry -1 (the appended white), so one gather paints the window.
    palette = np.vstack([colors, np.full((1, 3), 255, dtype=np.uint8)])
    win = palette[owner]

    # Edges can only lie between neighbours owned by different triangles; test just those pairs.
    flat = win.reshape(-1, 3)
    for da, db, dr, dc in ((owner[:, :-1], owner[:, 1:], 0, 1), (owner[:-1, :], owner[1:, :], 1, 0)):
        rows, cols = np.nonzero(da != db)
        ta, tb = da[rows, cols], db[rows, cols]
        fa, fb = ta >= 0, tb >= 0
        both = fa & fb
        ia, ib = np.where(fa, ta, 0), np.where(fb, tb, 0)
        crease = (ncam[ia] * ncam[ib]).sum(1) < CREASE_COS
        jump = np.where(both, zbuf[rows, cols] - zbuf[rows + dr, cols + dc], 0.0)
        step = np.abs(jump) > 1.0 + slope[ia] + slope[ib]
        hit = (fa != fb) | (both & (crease | step))
        r, c = rows[hit], cols[hit]
        # Mark both pixels of each pair: 2 px lines read well at 512 px.
        flat[r * w + c] = EDGE_COLOR
        flat[(r + dr) * w + c + dc] = EDGE_COLOR
    img[y0:y1, x0:x1] = win
    return img


def render_views(verts: np.ndarray, tris: np.ndarray, *, size: int = 512, margin: float = 0.06,
                 views: tuple[str, ...] = VIEW_NAMES) -> dict[str, np.ndarray]:
    center, scale = frame_scale(verts, size, margin)
    out = {}
    for v in views:
        deadlines.check()
        out[v] = render_view(verts, tris, v, size=size, center=center, scale=scale)
    return out


def encode_png(img: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes; level 1 is several times faster than the default and the images are mostly flat."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
