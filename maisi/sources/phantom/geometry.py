"""Signed-depth shapes of the phantom: boxes, ellipsoids, lofts, tubes and their combinations.

Every structure is evaluated only inside its own bounding box as a signed depth field (positive
inside, roughly in mm) in the template frame (millimetres, origin at the vertex, ``x`` toward the
patient's right, ``y`` anterior, ``z`` superior).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Grid(Protocol):
    """What a shape's box reads of the canvas it lies on (:class:`maisi.sources.phantom.body.Canvas`)."""

    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    tex: dict[str, np.ndarray]

FAR = np.float32(1e4)


class Box:
    """A box of the canvas: slices plus broadcastable template coordinates (x, y, z)."""

    __slots__ = ("cv", "sl", "x", "y", "z", "shape")

    def __init__(self, cv: Grid, sl: tuple[slice, slice, slice]):
        self.cv = cv
        self.sl = sl
        tx, ty, tz = cv.coords
        self.x = tx[sl[0]][:, None, None]
        self.y = ty[sl[1]][None, :, None]
        self.z = tz[sl[2]][None, None, :]
        self.shape = (self.x.shape[0], self.y.shape[1], self.z.shape[2])

    def sub(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Slices (relative to this box) of the part of the box inside ``[lo, hi]``."""
        out = []
        for ax in range(3):
            c = self.cv.coords[ax]
            s = self.sl[ax]
            i0 = max(int(np.searchsorted(c, lo[ax], "left")), s.start)
            i1 = min(int(np.searchsorted(c, hi[ax], "right")), s.stop)
            if i1 <= i0:
                return None
            out.append(slice(i0 - s.start, i1 - s.start))
        return tuple(out)  # type: ignore[return-value]

    def tex(self, name: str) -> np.ndarray:
        return self.cv.tex[name][self.sl]


class SubBox(Box):
    """A part of a box (slices relative to it) usable wherever a box is."""

    def __init__(self, parent: Box, sub: tuple[slice, slice, slice]):
        sl = tuple(slice(p.start + s.start, p.start + s.stop) for p, s in zip(parent.sl, sub, strict=True))
        super().__init__(parent.cv, sl)  # type: ignore[arg-type]


def ell_depth(comps: Sequence[np.ndarray], radii: Sequence) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to an axis-aligned ellipse/ellipsoid."""
    q = 0.0
    g = 0.0
    for u, r in zip(comps, radii, strict=True):
        q = q + (u / r) ** 2
        g = g + (u / (r * r)) ** 2
    rho = np.sqrt(q)
    g = np.sqrt(g)
    rmin = radii[0]
    for r in radii[1:]:
        rmin = np.minimum(rmin, r)
    d = (1.0 - rho) * rho / np.maximum(g, 1e-6)
    return np.minimum(d, rmin).astype(np.float32, copy=False)


class Shape:
    """A solid given by a signed depth field (mm, > 0 inside) and a template-frame bounding box."""

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def depth(self, b: Box) -> np.ndarray:
        raise NotImplementedError


class Ellipsoid(Shape):
    """Ellipsoid with centre ``c``, radii ``r`` along the columns of rotation ``rot`` (default axes).

    ``bend`` curves the ellipsoid along its third axis as a function of the first
    (``w -> w - bend * u**2``), which turns a flat plate into a shell (iliac wing, scapula).
    """

    def __init__(self, c, r, rot: np.ndarray | None = None, bend: float = 0.0):
        self.c = np.asarray(c, dtype=float)
        self.r = np.asarray(r, dtype=float)
        self.rot = None if rot is None and not bend else np.eye(3) if rot is None else np.asarray(rot, dtype=float)
        self.bend = float(bend)

    def bbox(self):
        r = self.r + [0.0, 0.0, abs(self.bend) * self.r[0] ** 2]
        half = r if self.rot is None else np.abs(self.rot) @ r
        return self.c - half, self.c + half

    def depth(self, b):
        dx, dy, dz = b.x - float(self.c[0]), b.y - float(self.c[1]), b.z - float(self.c[2])
        radii = [float(v) for v in self.r]
        if self.rot is None:
            return ell_depth((dx, dy, dz), radii)
        comps = [float(self.rot[0, i]) * dx + float(self.rot[1, i]) * dy + float(self.rot[2, i]) * dz for i in range(3)]
        if self.bend:
            comps[2] = comps[2] - self.bend * comps[0] * comps[0]
        return ell_depth(comps, radii)


class Loft(Shape):
    """Stack of axial ellipses keyed on z: rows ``(z, cx, cy, a, b)``, linearly interpolated, capped."""

    def __init__(self, keys: Sequence[Sequence[float]], cap: bool = True, cap_scale: float = 1.0, flat_back: bool = False):
        k = np.asarray(keys, dtype=float)
        self.k = k[np.argsort(k[:, 0])]
        self.cap = cap
        self.cap_scale = cap_scale
        self.flat_back = flat_back

    def bbox(self):
        k = self.k
        lo = np.array([np.min(k[:, 1] - k[:, 3]), np.min(k[:, 2] - k[:, 4]), k[0, 0]])
        hi = np.array([np.max(k[:, 1] + k[:, 3]), np.max(k[:, 2] + k[:, 4]), k[-1, 0]])
        return lo, hi

    def params(self, z: np.ndarray) -> list[np.ndarray]:
        return [np.interp(z, self.k[:, 0], self.k[:, i]).astype(np.float32) for i in range(1, 5)]

    def depth(self, b):
        z = b.z[0, 0, :]
        cx, cy, a, bb = (p[None, None, :] for p in self.params(z))
        if self.flat_back:
            # superellipse (exponent 3) behind the centre: the flattened back of a supine patient
            u, v = np.abs(b.x - cx) / a, (b.y - cy) / bb
            rho = np.where(v < 0, np.cbrt(u * u * u - v * v * v), np.sqrt(u * u + v * v))
            d = (1.0 - rho) * np.minimum(a, bb)
        else:
            d = ell_depth((b.x - cx, b.y - cy), (a, bb))
        if self.cap:
            cap = np.minimum(z - float(self.k[0, 0]), float(self.k[-1, 0]) - z)[None, None, :]
            d = np.minimum(d, cap * np.float32(self.cap_scale))
        return d


class Tube(Shape):
    """Union of capsules along a polyline with per-point radii (exact distance to each segment)."""

    def __init__(self, points, radii, pad: float = 0.0):
        self.p = np.asarray(points, dtype=float)
        r = np.asarray(radii, dtype=float)
        self.r = np.broadcast_to(r, (len(self.p),)).copy()
        self.pad = pad

    def bbox(self):
        m = float(self.r.max()) + self.pad
        return self.p.min(0) - m, self.p.max(0) + m

    def depth(self, b):
        out = np.full(b.shape, -FAR, dtype=np.float32)
        for i in range(len(self.p) - 1):
            p0, p1 = self.p[i], self.p[i + 1]
            r0, r1 = float(self.r[i]), float(self.r[i + 1])
            m = max(r0, r1) + self.pad
            sub = b.sub(np.minimum(p0, p1) - m, np.maximum(p0, p1) + m)
            if sub is None:
                continue
            x = b.x[sub[0]] - float(p0[0])
            y = b.y[:, sub[1]] - float(p0[1])
            z = b.z[:, :, sub[2]] - float(p0[2])
            v = p1 - p0
            vx, vy, vz = (float(t) for t in v)
            L2 = max(float(v @ v), 1e-9)
            t = np.clip((x * vx + y * vy + z * vz) * (1.0 / L2), 0.0, 1.0)
            dist = np.sqrt((x - t * vx) ** 2 + (y - t * vy) ** 2 + (z - t * vz) ** 2)
            d = (r0 + t * (r1 - r0)) - dist
            view = out[sub]
            np.maximum(view, d, out=view)
        return out


class Custom(Shape):
    """Depth given by a function of the box; an infinite bounding box unless given."""

    def __init__(self, fn: Callable[[Box], np.ndarray], lo=None, hi=None):
        self.fn = fn
        self.lo = np.full(3, -np.inf) if lo is None else np.asarray(lo, dtype=float)
        self.hi = np.full(3, np.inf) if hi is None else np.asarray(hi, dtype=float)

    def bbox(self):
        return self.lo, self.hi

    def depth(self, b):
        return self.fn(b)


class Union(Shape):
    def __init__(self, *parts: Shape):
        self.parts = parts

    def bbox(self):
        boxes = [p.bbox() for p in self.parts]
        return np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)

    def depth(self, b):
        d = self.parts[0].depth(b)
        for p in self.parts[1:]:
            d = np.maximum(d, p.depth(b))
        return d


class Inter(Shape):
    def __init__(self, *parts: Shape):
        self.parts = parts

    def bbox(self):
        boxes = [p.bbox() for p in self.parts]
        return np.max([b[0] for b in boxes], 0), np.min([b[1] for b in boxes], 0)

    def depth(self, b):
        d = self.parts[0].depth(b)
        for p in self.parts[1:]:
            d = np.minimum(d, p.depth(b))
        return d


class Diff(Shape):
    def __init__(self, a: Shape, *cut: Shape):
        self.a = a
        self.cut = cut

    def bbox(self):
        return self.a.bbox()

    def depth(self, b):
        d = self.a.depth(b)
        for c in self.cut:
            d = np.minimum(d, -c.depth(b))
        return d


class Grow(Shape):
    """``shape`` grown (or shrunk, negative) by ``mm``."""

    def __init__(self, shape: Shape, mm: float):
        self.shape = shape
        self.mm = float(mm)
        if isinstance(shape, Tube):
            self.shape = Tube(shape.p, shape.r, pad=max(shape.pad, self.mm))

    def bbox(self):
        lo, hi = self.shape.bbox()
        m = max(self.mm, 0.0)
        return lo - m, hi + m

    def depth(self, b):
        return self.shape.depth(b) + self.mm


def half_space(point, normal) -> Custom:
    """Half-space ``normal . (p - point) > 0`` (normal need not be unit)."""
    n = np.asarray(normal, dtype=float)
    n = n / np.linalg.norm(n)
    p = np.asarray(point, dtype=float)

    def fn(b: Box) -> np.ndarray:
        return (
            float(n[0]) * (b.x - float(p[0])) + float(n[1]) * (b.y - float(p[1])) + float(n[2]) * (b.z - float(p[2]))
        )

    return Custom(fn)


def chaikin(points: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Corner-cutting smoothing of a polyline (rows are points; end points are kept)."""
    p = np.asarray(points, dtype=float)
    for _ in range(iterations):
        if len(p) < 3:
            break
        q = 0.75 * p[:-1] + 0.25 * p[1:]
        r = 0.25 * p[:-1] + 0.75 * p[1:]
        mid = np.empty((2 * len(q), p.shape[1]))
        mid[0::2], mid[1::2] = q, r
        p = np.vstack([p[:1], mid[1:-1], p[-1:]])
    return p


def orthonormal_frame(axis, hint) -> np.ndarray:
    """Rotation whose first column is ``axis`` and second the part of ``hint`` orthogonal to it."""
    u = np.asarray(axis, dtype=float)
    u = u / np.linalg.norm(u)
    v = np.asarray(hint, dtype=float)
    v = v - (v @ u) * u
    v = v / np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)], axis=1)
