"""The phantom's anatomy: the canvas structures are painted on, and every organ, bone and vessel.

Structures are painted in a fixed order so later ones override earlier ones; the region-marker
labels stay inside z bands that keep MAISI's region rule exact (``_MARKER_BANDS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage

from maisi.core.labels import BODY, label_id
from maisi.sources.phantom.geometry import (
    FAR,
    Box,
    Custom,
    Diff,
    Ellipsoid,
    Grow,
    Inter,
    Loft,
    Shape,
    SubBox,
    Tube,
    Union,
    chaikin,
    ell_depth,
    half_space,
    orthonormal_frame,
)
from maisi.sources.phantom.spec import CAGE_KEYS, FAT_KEYS, LEG_KEYS, REGION_FOV, SPINE_KEYS, TRUNK_KEYS, interp_keys


class Canvas:
    """Label and HU arrays in canonical (RAS+) voxel order with template coordinates per axis."""

    def __init__(self, tx: np.ndarray, ty: np.ndarray, tz: np.ndarray, vox: Sequence[float]):
        self.coords = (tx.astype(np.float32), ty.astype(np.float32), tz.astype(np.float32))
        self.shape = (len(tx), len(ty), len(tz))
        self.vox = tuple(float(v) for v in vox)  # voxel size in template mm
        self.label = np.zeros(self.shape, dtype=np.uint8)
        self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
        self.inner = np.zeros(self.shape, dtype=bool)
        self.tex: dict[str, np.ndarray] = {}

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Box | None:
        sl = []
        for c, a, b in zip(self.coords, lo, hi, strict=True):
            i0 = int(np.searchsorted(c, a, "left"))
            i1 = int(np.searchsorted(c, b, "right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return Box(self, tuple(sl))

    def paint(
        self,
        shape: Shape,
        label: int | None,
        hu: float | Callable[[Box, np.ndarray], np.ndarray],
        *,
        only: Iterable[int] | None = None,
        keep: Iterable[int] | None = None,
        inner: bool = False,
        mark_inner: bool = False,
    ) -> None:
        """Paint ``shape`` (depth > 0) with ``label`` (``None`` keeps labels) and ``hu``.

        ``only`` restricts painting to voxels currently holding one of those labels, ``keep``
        protects voxels holding those labels, ``inner`` restricts to the body inside the
        subcutaneous fat. Marker labels of the region rule are clipped to their z bands.
        """
        lo, hi = shape.bbox()
        b = self.box(lo, hi)
        if b is None:
            return
        d = np.broadcast_to(shape.depth(b), b.shape)
        mask = d > 0
        if label is not None and label in _MARKER_BANDS:
            zlo, zhi = _MARKER_BANDS[label]
            mask = mask & ((b.z > zlo) & (b.z < zhi))
        cur = self.label[b.sl]
        if only is not None:
            lut = np.zeros(256, dtype=bool)
            lut[list(only)] = True
            mask = mask & lut[cur]
        if keep is not None:
            lut = np.zeros(256, dtype=bool)
            lut[list(keep)] = True
            mask = mask & ~lut[cur]
        if inner:
            mask = mask & self.inner[b.sl]
        if not mask.any():
            return
        if label is not None:
            cur[mask] = label
        if callable(hu):
            values = np.broadcast_to(np.asarray(hu(b, d), dtype=np.float32), b.shape)
            self.hu[b.sl][mask] = values[mask]
        else:
            self.hu[b.sl][mask] = hu
        if mark_inner:
            self.inner[b.sl] |= mask


    def paint_segments(
        self,
        segs: Sequence[tuple[np.ndarray, np.ndarray, float, float]],
        hus: Sequence[float],
        *,
        only: Iterable[int],
        combine: str = "max",
    ) -> None:
        """Paint many capsules (``(p0, p1, r0, r1)``, one HU each) without changing labels.

        Overlaps take the larger (``"max"``) or smaller (``"min"``) HU; voxels are changed only
        where the current label is one of ``only`` and only toward brighter/darker values.
        """
        if not segs:
            return
        lo = np.min([np.minimum(a, b) - max(r0, r1) for a, b, r0, r1 in segs], 0)
        hi = np.max([np.maximum(a, b) + max(r0, r1) for a, b, r0, r1 in segs], 0)
        b = self.box(lo, hi)
        if b is None:
            return
        big = -FAR if combine == "max" else FAR
        acc = np.full(b.shape, big, dtype=np.float32)
        pick = np.maximum if combine == "max" else np.minimum
        for (p0, p1, r0, r1), hu in zip(segs, hus, strict=True):
            seg = Tube([p0, p1], [r0, r1])
            slo, shi = seg.bbox()
            sub = b.sub(slo, shi)
            if sub is None:
                continue
            view = acc[sub]
            d = seg.depth(SubBox(b, sub))
            pick(view, np.where(d > 0, np.float32(hu), big), out=view)
        lut = np.zeros(256, dtype=bool)
        lut[list(only)] = True
        mask = (acc != big) & lut[self.label[b.sl]]
        cur = self.hu[b.sl]
        cur[mask] = pick(cur[mask], acc[mask])


def _ids() -> dict[str, int]:
    names = {
        "liver": "liver", "spleen": "spleen", "pancreas": "pancreas", "kidney_r": "right kidney",
        "kidney_l": "left kidney", "aorta": "aorta", "ivc": "inferior vena cava",
        "adrenal_r": "right adrenal gland", "adrenal_l": "left adrenal gland", "gallbladder": "gallbladder",
        "esophagus": "esophagus", "stomach": "stomach", "duodenum": "duodenum", "bladder": "bladder",
        "portal": "portal vein and splenic vein", "small_bowel": "small bowel", "brain": "brain",
        "lul": "left lung upper lobe", "lll": "left lung lower lobe", "rul": "right lung upper lobe",
        "rml": "right lung middle lobe", "rll": "right lung lower lobe", "trachea": "trachea",
        "iliac_a_l": "left iliac artery", "iliac_a_r": "right iliac artery", "iliac_v_l": "left iliac vena",
        "iliac_v_r": "right iliac vena", "colon": "colon", "scapula_l": "left scapula",
        "scapula_r": "right scapula", "clavicle_l": "left clavicula", "clavicle_r": "right clavicula",
        "femur_l": "left femur", "femur_r": "right femur", "hip_l": "left hip", "hip_r": "right hip",
        "sacrum": "sacrum", "glut_max_l": "left gluteus maximus", "glut_max_r": "right gluteus maximus",
        "glut_med_l": "left gluteus medius", "glut_med_r": "right gluteus medius",
        "autochthon_l": "left autochthon", "autochthon_r": "right autochthon",
        "iliopsoas_l": "left iliopsoas", "iliopsoas_r": "right iliopsoas",
        "brachiocephalic": "brachiocephalic trunk", "carotid_l": "left common carotid artery",
        "carotid_r": "right common carotid artery", "cartilage": "costal cartilages", "heart": "heart",
        "prostate": "prostate", "skull": "skull", "cord": "spinal cord", "sternum": "sternum",
        "subclavian_l": "left subclavian artery", "subclavian_r": "right subclavian artery",
        "svc": "superior vena cava", "thyroid": "thyroid gland",
    }
    return {k: label_id(v) for k, v in names.items()}


_ID = _ids()


_LUNGS = (_ID["lul"], _ID["lll"], _ID["rul"], _ID["rml"], _ID["rll"])


_VERTEBRAE = tuple(label_id(f"vertebrae C{i}") for i in range(1, 8)) + tuple(
    label_id(f"vertebrae T{i}") for i in range(1, 13)
) + tuple(label_id(f"vertebrae L{i}") for i in range(1, 6))


#: z bands (template mm) that the region-marker labels never leave: each stays out of the field
#: of view of the regions it does not mark, so MAISI's region rule applied to a case's label map
#: returns exactly its planned top and bottom region.
_MARGIN = 3.0


_MARKER_BANDS: dict[int, tuple[float, float]] = {
    **{i: (REGION_FOV["chest"][0] + _MARGIN, 100.0) for i in (_ID["brain"], _ID["skull"])},
    **{i: (REGION_FOV["abdomen"][0] + _MARGIN, REGION_FOV["head_neck"][1] - _MARGIN) for i in _LUNGS},
    **{
        _ID[k]: (REGION_FOV["lower_body"][0] + _MARGIN, REGION_FOV["chest"][1] - _MARGIN)
        for k in ("liver", "spleen", "pancreas", "kidney_r", "kidney_l")
    },
    **{i: (-3000.0, REGION_FOV["abdomen"][1] - _MARGIN) for i in (_ID["femur_l"], _ID["femur_r"])},
}


def _side_id(name: str, side: int) -> int:
    """Label of the right (``side > 0``) or left structure ``name``."""
    return _ID[f"{name}_{'r' if side > 0 else 'l'}"]


class Phantom:
    """Draws the per-case anatomy parameters and paints every structure onto a canvas."""

    def __init__(self, cv: Canvas, rng: np.random.Generator, fat: float):
        self.cv = cv
        self.rng = rng
        self.fat = fat
        self.tissue = {
            "fat": -100 + self.j(8),
            "muscle": 44 + self.j(4),
            "blood": 42 + self.j(4),
            "liver": 62 + self.j(5),
            "spleen": 48 + self.j(4),
            "kidney": 33 + self.j(4),
            "pancreas": 38 + self.j(5),
            "bone": 900 + self.j(80),
            "cancellous": 240 + self.j(40),
        }
        self.vox = float(np.mean(cv.vox[:2]))
        # a few millimetres of shift per organ system
        self.shift = {k: np.array([self.j(4), self.j(4), self.j(6)]) for k in ("head", "thorax", "abdomen", "pelvis")}

    # -- random helpers -------------------------------------------------------------------------
    def j(self, amp: float) -> float:
        """Uniform jitter in ``[-amp, amp]``."""
        return float(self.rng.uniform(-amp, amp))

    def s(self, amp: float = 0.08) -> float:
        """Size factor in ``[1 - amp, 1 + amp]``."""
        return 1.0 + self.j(amp)

    def pts(self, points, amp: float = 2.0, shift=None) -> np.ndarray:
        """Control points jittered by up to ``amp`` mm each, plus an optional common shift."""
        p = np.asarray(points, dtype=float)
        p = p + self.rng.uniform(-amp, amp, size=p.shape)
        return p if shift is None else p + shift

    # -- anatomy helpers -------------------------------------------------------------------------
    def spine_y(self, z):
        """y of the vertebral body centre line at ``z`` (cervical lordosis, thoracic kyphosis...)."""
        return interp_keys(z, SPINE_KEYS) + self.spine_dy

    def dome(self, x, y, side: int):
        """z of the lung base / diaphragm on one side (right dome higher)."""
        top = self.dome_top[0] if side > 0 else self.dome_top[1]
        q = np.clip(((x - side * 55.0) / 80.0) ** 2 + ((y + 2.0) / 75.0) ** 2, 0.0, 1.0)
        return top - 44.0 * q

    def diaphragm(self, b: Box) -> np.ndarray:
        """Depth below the diaphragm (positive under it)."""
        zr = self.dome(b.x, b.y, 1)
        zl = self.dome(b.x, b.y, -1)
        zd = np.where(b.x > 0, zr, zl)
        return (zd - 4.0) - b.z

    def bone_hu(self, cortex: float = 1.5, cortical: float | None = None, inner: float | None = None):
        cortical = self.tissue["bone"] if cortical is None else cortical
        inner = self.tissue["cancellous"] if inner is None else inner
        t = max(cortex, 0.55 * self.vox)

        def fn(b: Box, d: np.ndarray) -> np.ndarray:
            return np.where(d < t, cortical, inner + 45.0 * b.tex("hi"))

        return fn

    def soft_hu(self, value: float, amp: float = 4.0, hi: float = 0.0):
        def fn(b: Box, d: np.ndarray) -> np.ndarray:
            out = value + amp * b.tex("lo")
            return out + hi * b.tex("hi") if hi else out

        return fn

    # -- build -----------------------------------------------------------------------------------
    def build(self) -> None:
        self.spine_dy = self.j(3)
        self.dome_top = (-478.0 + self.j(3), -484.0 + self.j(3))
        self.body()
        self.muscles()
        self.neck()
        self.thorax()
        self.head()
        self.abdomen()
        self.pelvis()
        self.spine()
        self.chest_wall_bones()
        self.skull()
        self.pelvic_bones()
        self.lung_vessels()

    def body(self) -> None:
        cv, t = self.cv, self.tissue
        head_c = np.array([0.0, 0.0, -100.0]) + self.shift["head"] * [0.5, 0.5, 0.2]
        self.head_c = head_c
        self.head_r = np.array([75.0 * self.s(0.04), 97.0 * self.s(0.04), 100.0])
        jaw_c, jaw_r = head_c + [0, 22, -72], np.array([56.0, 64.0, 46.0])
        nose_c, nose_r = head_c + [0, 96, -28], np.array([11.0, 14.0, 22.0])
        trunk = np.array(TRUNK_KEYS, dtype=float)
        trunk[:, 3] *= self.s(0.03)
        legs = np.array(LEG_KEYS, dtype=float)
        outer_trunk = trunk.copy()
        fz = self.fat * interp_keys(trunk[:, 0], FAT_KEYS)
        outer_trunk[:, 3] += fz
        outer_trunk[:, 4] += fz
        outer_leg = legs.copy()
        fz = self.fat * interp_keys(legs[:, 0], FAT_KEYS)
        outer_leg[:, 3] += fz
        outer_leg[:, 4] += fz
        scalp = 3.0
        outer = [
            Ellipsoid(head_c, self.head_r),
            Ellipsoid(jaw_c, jaw_r),
            Ellipsoid(nose_c, nose_r),
            Loft(outer_trunk, flat_back=True),
        ]
        inner = [
            Ellipsoid(head_c, self.head_r - scalp),
            Ellipsoid(jaw_c, jaw_r - scalp),
            Ellipsoid(nose_c, nose_r - 2),
            Loft(trunk, flat_back=True),
        ]
        for side in (1, -1):
            o, i = outer_leg.copy(), legs.copy()
            o[:, 1] *= side
            i[:, 1] *= side
            outer.append(Loft(o))
            inner.append(Loft(i))
        for shape in outer:
            cv.paint(shape, BODY, self.soft_hu(t["fat"], 6.0))
        for shape in inner:
            cv.paint(shape, BODY, self.soft_hu(t["muscle"], 4.0), mark_inner=True)
        # body cavities (fat background the organs are painted into)
        cage = np.array(CAGE_KEYS, dtype=float)
        cage[:, 3] *= self.s(0.03)
        cage[:, 4] *= self.s(0.03)
        self.cage = cage[np.argsort(cage[:, 0])]
        thorax = self.cage.copy()
        thorax[:, 3:5] -= 4.0
        thorax = thorax[thorax[:, 0] >= -500]
        cv.paint(Loft(thorax), BODY, self.soft_hu(-80.0, 8.0), inner=True)
        zs = np.arange(-490.0, -946.0, -15.0)
        a_in = interp_keys(zs, trunk, 3)
        front = interp_keys(zs, trunk, 2) + interp_keys(zs, trunk, 4) - 12.0
        back = self.spine_y(zs) - 14.0
        pelvic = interp_keys(zs, ((-945, 40), (-900, 62), (-840, 95), (-790, 112), (-740, 200), (-400, 200)))
        a_c = np.minimum(a_in - 14.0, pelvic)
        keys = np.stack([zs, 0 * zs, (front + back) / 2, a_c, (front - back) / 2], 1)
        cav = Inter(Loft(keys), Custom(self.diaphragm))
        cv.paint(cav, BODY, self.soft_hu(-95.0 + 20 * (1 - self.fat), 8.0), inner=True)
        # perirenal fat (before the muscles, so psoas and quadratus keep their shape)
        self.kidneys = {}
        for side in (1, -1):
            c = np.array([side * 68.0, -44.0, -620.0 if side > 0 else -604.0]) + self.shift["abdomen"]
            c = c + [self.j(4), self.j(3), self.j(6)]
            rot = orthonormal_frame([-side * 0.22, -0.15, 1.0], [side * 0.85, 0.5, 0.0])
            r = np.array([54.0, 28.0, 21.0]) * self.s(0.08)
            self.kidneys[side] = (c, r, rot)
            cv.paint(Ellipsoid(c, r + 11.0, rot), BODY, self.soft_hu(-95.0, 6.0), inner=True)

    def muscles(self) -> None:
        cv, t = self.cv, self.tissue
        mus = self.soft_hu(t["muscle"] + 3, 4.0)
        zs = np.array([-250.0, -300, -400, -500, -560, -640, -700, -760])
        cx = np.array([22.0, 26, 27, 28, 33, 36, 35, 26])
        off = np.array([36.0, 40, 42, 42, 42, 44, 48, 52])
        a = np.array([12.0, 15, 16, 17, 22, 25, 22, 14]) * self.s(0.1)
        b = np.array([12.0, 14, 16, 16, 20, 22, 20, 12]) * self.s(0.1)
        for side in (1, -1):
            keys = np.stack([zs, side * cx, self.spine_y(zs) - off, a, b], 1)
            cv.paint(Loft(keys), _side_id("autochthon", side), mus, inner=True)
        zs = np.array([-545.0, -600, -660, -720, -770, -820, -870, -920, -945])
        cx = np.array([28.0, 34, 42, 52, 64, 70, 70, 68, 76])
        cy = np.concatenate([self.spine_y(zs[:3]) + [0, 0, 4], [-8.0, -4, 12, 30, 25, 12]])
        a = np.array([9.0, 14, 20, 24, 30, 28, 20, 16, 10]) * self.s(0.1)
        b = np.array([10.0, 14, 18, 20, 18, 18, 15, 15, 10]) * self.s(0.1)
        for side in (1, -1):
            keys = np.stack([zs, side * cx, cy, a, b], 1)
            cv.paint(Loft(keys), _side_id("iliopsoas", side), mus, inner=True)
        self.protect = tuple(_side_id(n, sd) for n in ("autochthon", "iliopsoas", "glut_max", "glut_med") for sd in (1, -1))
        sh = self.shift["pelvis"]
        for side in (1, -1):
            rot = orthonormal_frame([side * 0.35, -0.1, 1.0], [side * 1.0, 0.35, 0.0])
            c = np.array([side * 70.0, -68.0, -875.0]) + sh
            cv.paint(Ellipsoid(c, np.array([78.0, 52.0, 30.0]) * self.s(0.08), rot), _side_id("glut_max", side), mus, inner=True)
            rot = orthonormal_frame([0.0, 0.0, 1.0], [side * 0.64, 0.77, 0.0])
            c = np.array([side * 102.0, -34.0, -790.0]) + sh
            cv.paint(Ellipsoid(c, np.array([45.0, 40.0, 16.0]) * self.s(0.08), rot), _side_id("glut_med", side), mus, inner=True)

    # -- thorax ---------------------------------------------------------------------------------
    def thorax(self) -> None:
        cv, t, sh = self.cv, self.tissue, self.shift["thorax"]
        blood = self.soft_hu(t["blood"], 3.0)
        # heart with epicardial fat
        axis = np.array([-0.62 + self.j(0.08), 0.55 + self.j(0.08), -0.5 + self.j(0.08)])
        rot = orthonormal_frame(axis, [0.0, 0.0, 1.0])
        hc = np.array([-20.0, 20.0, -452.0]) + sh
        hr = np.array([66.0, 45.0, 38.0]) * self.s(0.07)
        floor = Custom(lambda b: b.z - np.maximum(self.dome(b.x, b.y, 1), self.dome(b.x, b.y, -1)) - 1.0)
        heart = Inter(Ellipsoid(hc, hr, rot), floor)
        # great vessels
        ay = self.spine_y
        zs = np.array([-380.0, -440, -490, -530, -600, -690])
        desc = [(-28, ay(-380) + 8), (-26, ay(-440) + 8), (-18, ay(-490) + 14), (-10, ay(-530) + 21), (-6, ay(-600) + 26), (-4, ay(-690) + 26)]
        aorta_pts = [(8, 22, -405), (11, 20, -362), (7, 12, -328), (-6, 6, -314), (-22, -2, -318), (-30, -20, -334), (-31, ay(-352) + 6, -352)]
        aorta_pts += [(x, y, z) for (x, y), z in zip(desc, zs, strict=True)]
        aorta_r = np.array([15, 15, 14, 13.5, 13, 12.5, 12, 12, 11.5, 11, 10.5, 10, 9]) * self.s(0.08)
        self.aorta = Tube(self.pts(aorta_pts, 1.5, sh), aorta_r)
        svc = Tube(self.pts([(28, 8, -292), (27, 11, -350), (22, 14, -398)], 1.5, sh), 9.0 * self.s(0.1))
        pa = Tube(self.pts([(-6, 44, -410), (-12, 30, -372), (-8, 10, -354), (20, 2, -358), (44, -6, -364)], 1.5, sh), [13, 13, 12, 10, 8])
        pal = Tube(self.pts([(-8, 10, -354), (-32, -6, -352), (-46, -14, -357)], 1.5, sh), [11, 9, 8])
        trachea = Tube(self.pts([(0, 22, -214), (0, 18, -250), (0, 8, -290), (0, -4, -330), (0, -9, -345)], 1.0, sh), [10, 10.5, 10.5, 10, 9])
        bronchi = [
            Tube(self.pts([(0, -9, -345), (22, -12, -358), (40, -14, -368)], 1.0, sh), [7.5, 7, 6]),
            Tube(self.pts([(0, -9, -345), (-25, -12, -355), (-44, -14, -364)], 1.0, sh), [7, 6.5, 5.5]),
        ]
        self.hila = {1: np.array([44.0, -10.0, -368.0]) + sh, -1: np.array([-45.0, -12.0, -362.0]) + sh}
        eso_pts = [(0, 4, -212), (-2, 0, -250), (-4, -14, -300), (-6, -28, -350), (-10, -30, -420), (-14, -16, -470), (-28, -3, -505), (-46, 4, -522)]
        esophagus = Tube(self.pts(eso_pts, 1.0, sh), 7.0 * self.s(0.1))
        # lungs
        self.lungs()
        for shape in (heart, self.aorta, svc, pa, pal, trachea, esophagus, *bronchi):
            cv.paint(Grow(shape, 3.0), BODY, self.soft_hu(-85.0, 8.0), only=_LUNGS)
        cv.paint(Grow(heart, 4.0), BODY, self.soft_hu(-90.0, 6.0))
        myo = t["muscle"] + 2

        def heart_hu(b, d):
            return np.where(d < 9.0, myo, t["blood"] - 4) + 3.0 * b.tex("lo")

        cv.paint(heart, _ID["heart"], heart_hu)
        cv.paint(pa, BODY, blood)
        cv.paint(pal, BODY, blood)
        cv.paint(svc, _ID["svc"], blood)
        cv.paint(self.aorta, _ID["aorta"], blood)
        # aortic branches, brachiocephalic and jugular veins, each in a thin sheath of fat
        bt = self.pts([(3, 7, -318), (12, 9, -292), (14, 9, -276)], 1.0, sh)
        vessels = [
            (Tube(bt, 7.0), _ID["brachiocephalic"]),
            (Tube(self.pts([bt[-1], (40, 0, -276), (78, -6, -282)], 1.0), [5.5, 5, 4.5]), _ID["subclavian_r"]),
            (Tube(self.pts([bt[-1], (24, 14, -240), (28, 12, -200), (30, 10, -165)], 1.0), 4.5), _ID["carotid_r"]),
            (Tube(self.pts([(-9, 4, -317), (-20, 12, -262), (-28, 12, -200), (-30, 10, -165)], 1.0, sh), 4.5), _ID["carotid_l"]),
            (Tube(self.pts([(-20, -6, -320), (-32, -4, -284), (-78, -6, -282)], 1.0, sh), [5.5, 5, 4.5]), _ID["subclavian_l"]),
            (
                Tube(self.pts([(-52, 6, -282), (-20, 22, -292), (10, 18, -298), (27, 10, -300)], 1.5, sh), [6.0, 6.0, 6.5, 7.0]),
                label_id("left brachiocephalic vein"),
            ),
            (Tube(self.pts([(48, 4, -278), (36, 6, -288), (28, 8, -298)], 1.5, sh), [6.5, 7.0, 8.0]), label_id("right brachiocephalic vein")),
        ]
        for side in (1, -1):
            vessels.append((Tube(self.pts([(side * 40, 10, -170), (side * 38, 12, -240), (side * 24, 10, -290)], 1.5), 6.0), BODY))
        for tube, _ in vessels:
            cv.paint(Grow(tube, 2.5), BODY, self.soft_hu(-80.0, 6.0), only=[BODY])
        for tube, lid in vessels:
            cv.paint(tube, lid, blood)
        cv.paint(esophagus, _ID["esophagus"], self.soft_hu(t["muscle"] - 5, 3.0))
        cv.paint(trachea, _ID["trachea"], 30.0)
        cv.paint(Grow(trachea, -2.0), _ID["trachea"], -1000.0)
        for br in bronchi:
            cv.paint(br, _ID["trachea"], 30.0, keep=_LUNGS)
            cv.paint(Grow(br, -1.8), None, -1000.0)

    def lungs(self) -> None:
        cv = self.cv
        cage = self.cage
        apex = (-252.0 + self.j(3), -250.0 + self.j(3))
        fiss = {
            1: (-330.0 + self.j(8), -1.03 + self.j(0.1), -388.0 + self.j(8)),
            -1: (-322.0 + self.j(8), -1.1 + self.j(0.1)),
        }
        z_lo = -520.0

        def depth(b: Box, side: int) -> np.ndarray:
            z = b.z[0, 0, :]
            cx, cy, a, bb = (np.interp(z, cage[:, 0], cage[:, i]).astype(np.float32)[None, None, :] for i in range(1, 5))
            d = ell_depth((b.x - cx, b.y - cy), (a - 7.0, bb - 7.0))
            d = np.minimum(d, b.z - self.dome(b.x, b.y, side))
            d = np.minimum(d, (apex[0 if side > 0 else 1] - b.z) + 0.0 * b.x)
            med = np.interp(z, [-520.0, -360, -330, -300, -270, -240], [10.0, 14, 20, 22, 16, 8]).astype(np.float32)
            d = np.minimum(d, side * b.x - med[None, None, :] - np.clip(0.1 * (b.y - 20.0), 0.0, 6.0))
            # keep the paravertebral gutters and the spine out of the lungs
            sy = self.spine_y(z).astype(np.float32)[None, None, :]
            spine = np.minimum(28.0 - np.abs(b.x), (sy + 14.0) - b.y)
            d = np.minimum(d, -spine)
            # posteriorly the lungs stop in front of the rib necks (transverse process -> rib angle)
            ax = np.abs(b.x)
            neck = b.y - (sy - 12.0 - 0.7 * (ax - 30.0))
            d = np.minimum(d, np.where(ax < 80.0, neck, FAR))
            return d

        lo = np.array([-150.0, -110.0, z_lo])
        hi = np.array([150.0, 110.0, -240.0])

        def lung_hu(b: Box, d: np.ndarray) -> np.ndarray:
            dep = np.clip((-(b.y) - 20.0) / 70.0, 0.0, 1.0)
            return -865.0 + 45.0 * dep + 14.0 * b.tex("lo") + 10.0 * b.tex("hi")

        for side in (1, -1):
            shape = Custom(lambda b, s=side: depth(b, s), lo, hi)
            if side > 0:
                z0, slope, zh = fiss[1]
                lower = Custom(lambda b, z0=z0, slope=slope: (z0 + slope * (b.y + 80.0)) - b.z)
                middle = Custom(lambda b, zh=zh: (zh + 0.1 * b.y) - b.z)
                cv.paint(shape, _ID["rul"], lung_hu)
                cv.paint(Inter(shape, middle), _ID["rml"], lung_hu)
                cv.paint(Inter(shape, lower), _ID["rll"], lung_hu)
            else:
                z0, slope = fiss[-1]
                lower = Custom(lambda b, z0=z0, slope=slope: (z0 + slope * (b.y + 80.0)) - b.z)
                cv.paint(shape, _ID["lul"], lung_hu)
                cv.paint(Inter(shape, lower), _ID["lll"], lung_hu)

    def lung_vessels(self) -> None:
        """Branching pulmonary vessel and airway trees, painted inside the lungs only."""
        cv = self.cv
        lut = np.zeros(256, dtype=bool)
        lut[list(_LUNGS)] = True

        def in_lung(p: np.ndarray) -> bool:
            idx = [int(np.clip(np.searchsorted(c, v), 0, len(c) - 1)) for c, v in zip(cv.coords, p, strict=True)]
            return bool(lut[cv.label[idx[0], idx[1], idx[2]]])

        vessels, airways = [], []
        for side in (1, -1):
            h = self.hila[side]
            roots = [
                ([side * 0.3, 0.15, 1.0], 40.0, 6.5),
                ([side * 0.4, -0.5, 0.8], 40.0, 5.5),
                ([side * 0.6, 0.7, 0.3], 36.0, 5.5),
                ([side * 0.5, 0.8, -0.3], 36.0, 5.5),
                ([side * 0.35, -0.45, -1.0], 46.0, 7.0),
                ([side * 0.75, -0.55, -0.3], 36.0, 5.5),
                ([side * 0.6, 0.35, -0.9], 44.0, 6.0),
                ([side * 0.2, -0.8, -0.5], 40.0, 5.5),
                ([side * 0.8, 0.1, 0.6], 38.0, 5.0),
                ([side * 0.9, 0.0, -0.5], 40.0, 5.0),
            ]
            for direction, length, radius in roots:
                direction = np.array(direction, float) + self.rng.uniform(-0.15, 0.15, 3)
                vessels += self._tree(h, direction, length, radius, depth=7, inside=in_lung)
                airways += self._tree(h + [side * 3.0, -6.0, 2.0], direction, length * 0.9, radius * 0.75, depth=2)
        # vessels thinner than a voxel are drawn wider and fainter (same partial volume)
        floor = 0.55 * self.vox
        segs, hus = [], []
        for p0, p1, r0, r1 in vessels:
            r = 0.5 * (r0 + r1)
            r_eff = max(r, floor)
            segs.append((p0, p1, max(r0, floor), max(r1, floor)))
            hus.append(-860.0 + 900.0 * (r / r_eff) ** 2)
        cv.paint_segments(segs, hus, only=_LUNGS, combine="max")
        air = [sg for sg in airways if min(sg[2], sg[3]) > 1.6]
        cv.paint_segments(air, [-960.0] * len(air), only=_LUNGS, combine="min")

    def _tree(self, p0, direction, length, radius, depth, inside: Callable[[np.ndarray], bool] | None = None):
        """Segments ``(p0, p1, r0, r1)`` of a random bifurcating tree; branches leaving ``inside`` stop."""
        segs = []
        direction = np.asarray(direction, float)
        stack = [(np.asarray(p0, float), direction / np.linalg.norm(direction), length, radius, depth, 0)]
        while stack:
            p, d, L, r, k, gen = stack.pop()
            q = p + d * L
            segs.append((p, q, r, r * 0.85))
            if k == 0 or r < 0.8 or (inside is not None and gen >= 1 and not inside(q)):
                continue
            for sign in (1, -1):
                perp = np.cross(d, self.rng.normal(size=3))
                perp /= np.linalg.norm(perp) + 1e-9
                ang = math.radians(self.rng.uniform(25, 50))
                nd = math.cos(ang) * d + sign * math.sin(ang) * perp
                stack.append((q, nd / np.linalg.norm(nd), L * self.rng.uniform(0.7, 0.85), r * 0.77, k - 1, gen + 1))
        return segs

    # -- neck and head soft tissue --------------------------------------------------------------
    def neck(self) -> None:
        cv = self.cv
        sh = self.shift["head"] * 0.5
        thy = self.soft_hu(92.0 + self.j(10), 4.0)
        for side in (1, -1):
            c = np.array([side * 17.0, 18.0, -240.0]) + sh + [self.j(2), self.j(2), self.j(4)]
            cv.paint(Ellipsoid(c, np.array([7.5, 9.0, 18.0]) * self.s(0.12)), _ID["thyroid"], thy)
        cv.paint(Ellipsoid(np.array([0.0, 30.0, -247.0]) + sh, [12.0, 4.5, 6.0]), _ID["thyroid"], thy)
        airway = Tube(self.pts([(0, 44, -122), (0, 22, -142), (0, 12, -170), (0, 16, -198), (0, 22, -216)], 1.0, sh), [9, 8.5, 8, 7, 7])
        cv.paint(airway, BODY, -1000.0)

    def head(self) -> None:
        cv = self.cv
        c, r = self.head_c, self.head_r
        self.skull_t = 6.5 + self.j(1.0)
        inner_r = r - 3.0 - self.skull_t
        self.cranial = Ellipsoid(c, inner_r)
        # skull base: anterior fossa high, middle fossae deeper laterally, posterior fossa lowest
        yb = np.array([-120.0, -60, -10, 20, 40, 120])
        z_mid = np.array([-150.0, -147, -118, -104, -86, -82]) + (c[2] + 100.0)
        z_lat = np.array([-150.0, -147, -134, -126, -96, -84]) + (c[2] + 100.0)

        def base(b: Box) -> np.ndarray:
            w = np.clip((np.abs(b.x) - 15.0) / 30.0, 0.0, 1.0)
            zb = np.interp(b.y, yb, z_mid) * (1.0 - w) + np.interp(b.y, yb, z_lat) * w
            return (b.z - zb).astype(np.float32)

        self.skull_base = base
        brain = Inter(self.cranial, Custom(base))
        grey, white = 39.0 + self.j(3), 26.0 + self.j(2)

        def cortex_hu(b: Box, d: np.ndarray) -> np.ndarray:
            # a thin rim of CSF over the cortex
            return np.where(d < 2.0, 10.0, grey) + 2.0 * b.tex("lo")

        cv.paint(brain, _ID["brain"], cortex_hu)
        cv.paint(Ellipsoid(c + [0, 2, 30], inner_r * [0.68, 0.74, 0.42]), _ID["brain"], self.soft_hu(white, 2.0), only=[_ID["brain"]])
        for side in (1, -1):  # lateral ventricles
            rot = orthonormal_frame([0.0, 1.0, 0.15], [1.0, 0.0, 0.0])
            cv.paint(Ellipsoid(c + [side * 10.0, 4.0, 32.0], [28.0 * self.s(0.1), 7.5 * self.s(0.2), 10.0], rot), _ID["brain"], 6.0, only=[_ID["brain"]])
        cv.paint(Ellipsoid(c + [0, -58, -32], [46.0, 30.0, 20.0]), _ID["brain"], self.soft_hu(grey + 2, 2.0), only=[_ID["brain"]])
        # face: orbits, nasal cavity, sinuses, pharynx
        for side in (1, -1):
            e = c + [side * 32.0, 76.0, -6.0]
            cv.paint(Ellipsoid(e + [0, -8, -2], [17.0, 24.0, 16.0]), BODY, self.soft_hu(-85.0, 6.0))
            cv.paint(Ellipsoid(e, [12.0, 12.0, 12.0]), BODY, 12.0)
            cv.paint(Ellipsoid(c + [side * 28.0, 52.0, -32.0], [14.0, 16.0, 15.0]), BODY, -1000.0)
        cv.paint(Ellipsoid(c + [0, 62, -25], [11.0, 26.0, 24.0]), BODY, -1000.0)

    # -- abdomen ----------------------------------------------------------------------------------
    def abdomen(self) -> None:
        cv, t, sh = self.cv, self.tissue, self.shift["abdomen"]
        below = Custom(self.diaphragm)
        wall, content = t["muscle"] - 5, 22.0

        def bowel_hu(gas_level: float, stool: bool = False):
            def fn(b: Box, d: np.ndarray) -> np.ndarray:
                hi, lo = b.tex("hi"), b.tex("lo")
                if stool:
                    lumen = np.where(hi > 0.25 - 0.6 * lo, -980.0, -120.0 + 90.0 * hi)
                else:
                    lumen = np.where(lo + 0.5 * hi > gas_level, -980.0, content + 5.0 * hi)
                return np.where(d < 3.0, wall, lumen)

            return fn

        # small bowel: stacked serpentine loops in the mid and lower abdomen
        pts = []
        z = -648.0 + self.j(4)
        row = 0
        while z > -828.0:
            half = min(62.0, interp_keys(z, ((-830, 45), (-780, 60), (-700, 62))))
            xs = np.linspace(-half, half - 8, 6)
            if row % 2:
                xs = xs[::-1]
            for k, x in enumerate(xs):
                yy = (18.0 if (row // 2) % 2 == 0 else 52.0) + 8.0 * math.sin(k * 1.7 + row)
                pts.append((x, yy, z + 5.0 * math.sin(k * 2.1 + row * 0.7)))
            z -= 14.0
            row += 1
        sb = Tube(self.pts(pts, 4.0, sh * [1, 1, 0.5]), 11.5 * self.s(0.08))
        cv.paint(Inter(sb, below), _ID["small_bowel"], bowel_hu(1.7), inner=True, keep=self.protect)
        colon_pts = [
            (74, 18, -778), (84, 8, -730), (86, 6, -690), (80, 18, -660), (60, 46, -648), (28, 62, -655),
            (-5, 68, -662), (-42, 58, -650), (-78, 24, -612), (-90, -4, -626), (-92, -10, -690), (-88, -6, -750),
            (-74, 10, -795), (-48, 26, -822), (-20, 12, -842), (-4, -34, -852), (0, -52, -876), (0, -48, -910), (0, -40, -934),
        ]
        colon_r = [26, 23, 22, 21, 20, 19, 19, 19, 18, 17, 16, 16, 16, 15, 15, 16, 17, 14, 9]
        colon = Tube(self.pts(colon_pts, 3.0, sh * [1, 1, 0.5]), np.array(colon_r) * self.s(0.1))
        cv.paint(Inter(colon, below), _ID["colon"], bowel_hu(0.0, stool=True), inner=True, keep=self.protect)
        # stomach with a gas pocket on its anterior (non-dependent) side
        st_pts = self.pts([(-52, -6, -518), (-62, 22, -552), (-48, 46, -592), (-12, 54, -612), (16, 40, -610)], 3.0, sh)
        stomach = Inter(Tube(st_pts, np.array([31, 29, 24, 17, 11]) * self.s(0.1)), below)
        gas = self.rng.uniform(0.08, 0.3)

        def stomach_hu(b: Box, d: np.ndarray) -> np.ndarray:
            yy = np.broadcast_to(b.y, d.shape)[d > 3.0]
            level = np.quantile(yy, 1.0 - gas) if yy.size else np.inf
            lumen = np.where(b.y > level, -990.0, 18.0 + 6.0 * b.tex("hi"))
            return np.where(d < 4.0, wall, lumen)

        cv.paint(stomach, _ID["stomach"], stomach_hu, inner=True, keep=self.protect)
        duo = self.pts([(16, 40, -610), (38, 28, -606), (52, 12, -618), (55, 6, -650), (44, 14, -674), (16, 24, -680), (-12, 24, -676), (-26, 14, -656), (-28, 12, -638)], 2.0, sh)
        cv.paint(Inter(Tube(duo, 10.5 * self.s(0.1)), below), _ID["duodenum"], bowel_hu(2.2), inner=True, keep=self.protect)
        # solid organs
        liver_keys = np.array([
            (-498, 55, 8, 75, 66), (-512, 42, 8, 102, 82), (-540, 34, 8, 116, 88), (-575, 44, 4, 106, 86),
            (-610, 60, -4, 80, 70), (-640, 74, -16, 58, 52), (-668, 84, -24, 36, 34), (-686, 88, -28, 12, 12),
        ], dtype=float)
        liver_keys[:, 1:3] += sh[:2]
        liver_keys[:, 0] += sh[2] * 0.5
        liver_keys[:, 3:5] *= self.s(0.07)
        cage = self.cage
        cavity = Custom(lambda b: ell_depth(
            (b.x - 0.0, b.y - np.interp(b.z, cage[:, 0], cage[:, 2]).astype(np.float32)),
            (np.interp(b.z, cage[:, 0], cage[:, 3]).astype(np.float32) + 2.0,
             np.interp(b.z, cage[:, 0], cage[:, 4]).astype(np.float32) + 2.0)))
        lobe_p = np.array([-14.0 + self.j(6), 30.0]) + sh[:2]
        lobe_n = np.array([0.8, 0.6 + self.j(0.1)])
        lobe_n /= np.linalg.norm(lobe_n)
        left_lobe = Custom(
            lambda b: lobe_n[0] * (b.x - lobe_p[0]) + lobe_n[1] * (b.y - lobe_p[1]) + 0.004 * (b.y - lobe_p[1]) ** 2
        )
        liver = Inter(Loft(liver_keys), cavity, left_lobe, Grow(below, -3.0))
        cv.paint(liver, _ID["liver"], self.soft_hu(t["liver"], 3.0), inner=True, keep=self.protect)
        ivc_y = self.spine_y
        hv_root = np.array([22.0, ivc_y(-505) + 24, -505.0])
        for end in ([85, 10, -545], [45, 45, -548], [-25, 48, -535]):
            cv.paint(Tube([hv_root, np.array(end, float) + self.rng.uniform(-5, 5, 3)], [5.0, 2.0]), None, t["liver"] - 14, only=[_ID["liver"]])
        gb_rot = orthonormal_frame([0.25, 0.55, -0.8], [1.0, 0.0, 0.0])
        gb_c = np.array([52.0, 48.0, -612.0]) + sh + [self.j(4), self.j(4), self.j(6)]
        cv.paint(Ellipsoid(gb_c, np.array([34.0, 15.0, 14.0]) * self.s(0.15), gb_rot), _ID["gallbladder"], 10.0 + self.j(4), inner=True, keep=self.protect)
        sp_rot = orthonormal_frame([0.77, -0.64, -0.3], [0.0, 0.0, 1.0])
        sp_c = np.array([-88.0, -36.0, -558.0]) + sh + [self.j(4), self.j(4), self.j(6)]
        cv.paint(Inter(Ellipsoid(sp_c, np.array([52.0, 45.0, 21.0]) * self.s(0.1), sp_rot), below), _ID["spleen"], self.soft_hu(t["spleen"], 3.0), inner=True, keep=self.protect)
        panc = self.pts([(30, 12, -614), (8, 28, -600), (-26, 22, -586), (-62, 0, -576), (-76, -12, -570)], 2.5, sh)
        cv.paint(Tube(panc, np.array([16, 12, 11, 9, 8]) * self.s(0.1)), _ID["pancreas"], self.soft_hu(t["pancreas"], 3.0, hi=6.0), inner=True, keep=self.protect)
        for side in (1, -1):
            c, r, rot = self.kidneys[side]
            kid = Ellipsoid(c, r, rot)
            hilum = np.array([-side * 0.7, 0.7, 0.0]) / math.sqrt(0.98)
            med = c + 11.0 * hilum

            def kidney_hu(b, d, k=t["kidney"]):
                return np.where(d < 7.0, k + 3.0, k - 5.0) + 2.0 * b.tex("lo")

            cv.paint(Ellipsoid(c, r + 5.0, rot), BODY, self.soft_hu(-95.0, 6.0), only=[_ID["liver"], _ID["spleen"]])
            cv.paint(kid, _side_id("kidney", side), kidney_hu, inner=True, keep=self.protect)
            cv.paint(Ellipsoid(med, [r[0] * 0.5, 9.0, 9.0], rot), _side_id("kidney", side), -40.0, only=[_side_id("kidney", side)])
            ad = np.array([side * 40.0, -28.0, -552.0 - (0 if side > 0 else 6)]) + sh
            cv.paint(Ellipsoid(ad, [5.0, 13.0, 17.0], orthonormal_frame([0, 0, 1], [side * 0.5, 0.8, 0])), _side_id("adrenal", side), 30.0, inner=True)
        # vessels
        blood = self.soft_hu(t["blood"], 3.0)
        ivc = self.pts([(22, 8, -492), (24, ivc_y(-520) + 22, -520), (22, ivc_y(-600) + 21, -600), (18, ivc_y(-690) + 20, -690)], 1.5, sh)
        cv.paint(Tube(ivc, [12, 12, 11, 10]), _ID["ivc"], blood, keep=[_ID["heart"]])
        portal = self.pts([(4, 12, -600), (24, 8, -582), (45, 5, -562), (72, 4, -552)], 1.5, sh)
        cv.paint(Tube(portal, [7, 7, 6, 4]), _ID["portal"], blood)
        splenic = self.pts([(4, 12, -600), (-30, 8, -590), (-66, -8, -578), (-80, -18, -572)], 1.5, sh)
        cv.paint(Tube(splenic, 4.5), _ID["portal"], blood)
        sma = self.pts([(-3, ivc_y(-585) + 30, -585), (-1, 20, -610), (0, 34, -670), (4, 40, -720)], 1.5, sh)
        cv.paint(Tube(sma, [5, 4.5, 4, 3]), BODY, blood)
        cv.paint(self.aorta, _ID["aorta"], blood)

    # -- pelvis soft tissue --------------------------------------------------------------------------
    def pelvis(self) -> None:
        cv, t, sh = self.cv, self.tissue, self.shift["pelvis"]
        blood = self.soft_hu(t["blood"], 3.0)
        fill = self.rng.uniform(0.7, 1.25) ** (1 / 3)
        bl_r = np.array([40.0, 30.0, 30.0]) * fill
        cv.paint(Ellipsoid(np.array([0.0, 24.0, -870.0 - (fill - 1) * 10]) + sh, bl_r), _ID["bladder"], self.soft_hu(8.0, 2.0), inner=True)
        cv.paint(Ellipsoid(np.array([0.0, 30.0, -918.0]) + sh, [17.0, 13.0, 15.0]), _ID["prostate"], self.soft_hu(38.0, 3.0), inner=True)
        for side in (1, -1):
            art = self.pts([(-4, 2, -690), (side * 25, -2, -725), (side * 45, -8, -762), (side * 62, 2, -810), (side * 72, 18, -858), (side * 78, 30, -905)], 1.5, sh)
            cv.paint(Tube(art, [6.5, 6, 5.5, 5, 4.5, 4.5]), _side_id("iliac_a", side), blood)
            vein = self.pts([(18, self.spine_y(-692) + 20, -692), (side * 30, -16, -730), (side * 50, -18, -770), (side * 66, -6, -815), (side * 76, 10, -860), (side * 80, 22, -905)], 1.5, sh)
            cv.paint(Tube(vein, [8, 7.5, 7, 6.5, 6, 6]), _side_id("iliac_v", side), blood, keep=[_side_id("iliac_a", side)])
            fem = self.pts([(side * 78, 30, -905), (side * 88, 35, -980), (side * 94, 24, -1100), (side * 96, 0, -1250)], 1.5)
            cv.paint(Tube(fem, [4.5, 4.5, 4, 3.5]), BODY, blood)
            cv.paint(Tube(fem + [side * 8, -3, 0], [6, 6, 5, 4.5]), BODY, blood)

    # -- skeleton ---------------------------------------------------------------------------------
    def spine(self) -> None:
        cv = self.cv
        levels = []
        z0, stretch = -150.0 + self.j(3), self.s(0.02)
        for i in range(24):
            if i < 7:
                zc = z0 - 16.0 * i
                rx, ry, h, crx, cry, spl, spd, tpl = 9 + 0.5 * i, 8 + 0.15 * i, 6.0, 11.0, 7.0, 12 + 1.6 * i, 5.0, 11.0
            elif i < 19:
                k = i - 7
                zc = z0 - 118.0 - 23.0 * k
                rx, ry, h, crx, cry, spl, spd, tpl = 13 + 0.45 * k, 11 + 0.35 * k, 9.5, 8.0, 7.0, 30.0, 16.0, 19.0
            else:
                k = i - 19
                zc = z0 - 403.0 - 35.0 * k
                rx, ry, h, crx, cry, spl, spd, tpl = 20 + 1.0 * k, 16 + 0.5 * k, 13.5, 10.0, 8.0, 26.0, 3.0, 24.0 + 2 * min(k, 2)
            zc = z0 + (zc - z0) * stretch
            levels.append((0.0, zc, rx * self.s(0.04), ry * self.s(0.04), h, crx, cry, spl, spd, tpl))
        self.levels = levels
        ys = [self.spine_y(lv[1]) for lv in levels]
        canal_y = [y - lv[3] - lv[6] - 1.5 for y, lv in zip(ys, levels, strict=True)]
        zs = [lv[1] for lv in levels]
        # CSF in the canal, intervertebral discs, then the vertebrae and the cord
        canal_pts = [(0, cy, z) for cy, z in zip(canal_y, zs, strict=True)] + [(0, canal_y[-1] - 10, zs[-1] - 40)]
        cv.paint(Tube(canal_pts, [lv[6] for lv in levels] + [6.0]), BODY, 8.0)
        disc_keys = [(z, 0, y, lv[2] - 0.5, lv[3] - 0.5) for z, y, lv in zip(zs, ys, levels, strict=True)][1:]
        cv.paint(Loft(disc_keys), BODY, self.soft_hu(85.0, 4.0))
        bone = self.bone_hu(1.5)
        for lid, lv, y, cy in zip(_VERTEBRAE, levels, ys, canal_y, strict=True):
            step, z, rx, ry, h, crx, cry, spl, spd, tpl = lv
            body = Loft([(z - h, 0, y, rx, ry), (z - 0.6 * h, 0, y, rx + 1.0, ry + 0.5), (z + 0.6 * h, 0, y, rx + 1.0, ry + 0.5), (z + h, 0, y, rx, ry)], cap_scale=2.5)
            ring = Diff(Loft([(z - 0.75 * h, 0, cy, crx + 5.5, cry + 5.0), (z + 0.75 * h, 0, cy, crx + 5.5, cry + 5.0)]), Loft([(z - 50, 0, cy, crx, cry), (z + 50, 0, cy, crx, cry)], cap=False))
            spinous = Tube([(0, cy - cry - 3, z), (0, cy - cry - spl, z - spd)], [4.5, 3.5])
            tp = [Tube([(side * (crx + 2), cy + 1, z + 1), (side * (crx + tpl), cy - 4, z + 2)], [4.5, 4.0]) for side in (1, -1)]
            cv.paint(Union(body, ring, spinous, *tp), lid, bone)
        cord_pts = [(0, cy, z) for cy, z in zip(canal_y[:20], zs[:20], strict=True)]
        cord_pts = [(0, canal_y[0] + 2, zs[0] + 25)] + cord_pts
        cv.paint(Tube(cord_pts, [6.5] + [6.0] * 7 + [5.0] * 12 + [3.0]), _ID["cord"], 36.0)
        # sacrum
        sh = self.shift["pelvis"] * [1, 1, 0.3]
        s_top = zs[-1] - levels[-1][4] - 7.0
        sk = np.array([(0, 0, -30, 50, 18), (-28, 0, -42, 48, 17), (-63, 0, -55, 40, 15), (-98, 0, -66, 28, 13), (-128, 0, -74, 16, 10), (-152, 0, -78, 7, 6)], dtype=float)
        sk[:, 0] += s_top
        sk[:, 2] += self.spine_y(s_top) + 28.0
        sk[:, 1:3] += sh[:2]
        canal = Tube([(0, sk[0, 2] - 10, s_top + 5), (0, sk[2, 2] - 7, sk[2, 0]), (0, sk[4, 2] - 4, sk[4, 0])], [8, 6, 3])
        cv.paint(Diff(Loft(sk), canal), _ID["sacrum"], self.bone_hu(1.5))

    def chest_wall_bones(self) -> None:
        cv, sh = self.cv, self.shift["thorax"]
        cage = self.cage
        bone = self.bone_hu(1.3)
        drop = [30, 45, 55, 62, 66, 70, 72, 74, 72, 68, 55, 48]
        phi_end = [58, 64, 66, 66, 66, 64, 62, 55, 45, 35, 8, -12]
        stern_z = [-292, -318, -345, -370, -395, -420, -440]
        # sternum
        sz = np.array([-278.0, -300, -322, -360, -420, -452, -470]) + sh[2] * 0.5
        scx = interp_keys(sz, cage, 2) + interp_keys(sz, cage, 4) + 3.0 + sh[1] * 0.5
        sa = np.array([22.0, 26, 16, 15, 15, 11, 6])
        sb = np.array([7.0, 8, 7, 7, 7, 5, 4])
        stern = Loft(np.stack([sz, 0 * sz, scx, sa, sb], 1))
        cv.paint(stern, _ID["sternum"], self.bone_hu(1.5))
        for side in (1, -1):
            for k in range(12):
                lv = self.levels[7 + k]
                zk = lv[1] + 3.0
                y0 = self.spine_y(lv[1]) - lv[3] - 4
                phis = np.radians(np.linspace(-66.0, phi_end[k] + self.j(3), 12))
                f = np.linspace(0, 1, len(phis)) ** 0.85
                zz = zk - 10.0 - drop[k] * self.s(0.08) * f
                A = interp_keys(zz, cage, 3) + 1.0
                B = interp_keys(zz, cage, 4) + 1.0
                cy = interp_keys(zz, cage, 2)
                # head beside the vertebral body, tubercle at the transverse process, then the arc
                pts = [(side * (lv[2] + 2.0), y0 + 0.5 * lv[3], zk + 3.0), (side * (lv[2] + 14.0), y0 - 2.0, zk - 1.0)]
                pts += [(side * A[i] * math.cos(p), cy[i] + B[i] * math.sin(p), zz[i]) for i, p in enumerate(phis)]
                r = np.linspace(4.6, 3.8, len(pts)) * (1.15 if k == 0 else 1.0)
                path = chaikin(np.column_stack([np.asarray(pts, float), r]), 2)
                rib_id = (62 if side < 0 else 74) + k + 1
                cv.paint(Tube(path[:, :3], path[:, 3]), rib_id, bone)
                end = np.array(pts[-1])
                if k < 7:
                    zs_ = stern_z[k] + sh[2] * 0.5
                    tgt = (side * (interp_keys(zs_, np.stack([sz, sa], 1)) - 2.0), interp_keys(zs_, np.stack([sz, scx], 1)), zs_)
                    mid = (end + np.array(tgt)) / 2 + [0, 4.0, 0]
                    cv.paint(Tube([end, mid, tgt], [4.2, 4.0, 4.0]), _ID["cartilage"], 120.0 + self.j(20))
                elif k < 10:
                    tgt = end + [-side * 22.0, 10.0, 18.0]
                    cv.paint(Tube([end, tgt], [4.0, 3.5]), _ID["cartilage"], 120.0)
        # clavicles and scapulae
        for side in (1, -1):
            pts = self.pts([(side * 20, 62, -276), (side * 60, 68, -273), (side * 100, 50, -272), (side * 128, 8, -278)], 2.0, sh)
            cv.paint(Tube(pts, [7.5, 6.5, 6, 7]), _side_id("clavicle", side), self.bone_hu(2.0))
            c = np.array([side * 100.0, -72.0, -340.0]) + sh
            rot = orthonormal_frame([side * 0.9, 0.42, 0.0], [0.0, 0.0, 1.0])
            blade = Ellipsoid(c, [46.0, 62.0, 3.2], rot, bend=-side * 0.005)
            ridge = Tube(self.pts([(side * 58, -92, -300), (side * 98, -72, -294), (side * 122, -32, -284), (side * 128, 4, -278)], 1.5, sh), [4.5, 5, 5, 7])
            glen = Ellipsoid(np.array([side * 124.0, -22.0, -294.0]) + sh, [13.0, 15.0, 17.0])
            cv.paint(Union(blade, ridge, glen), _side_id("scapula", side), self.bone_hu(1.5), inner=True)

    def skull(self) -> None:
        cv = self.cv
        c, r = self.head_c, self.head_r
        outer = Ellipsoid(c, r - 3.0)
        base = Custom(self.skull_base)
        vault = Diff(Inter(outer, Grow(base, 5.0)), Inter(self.cranial, base))
        magnum = Tube([c + [0, -30, -20], c + [0, -32, -70]], 15.0)
        bone = self.bone_hu(2.0, cortical=self.tissue["bone"] + 150, inner=520.0)
        skull = Diff(vault, magnum)
        cv.paint(skull, _ID["skull"], bone)
        parts = []
        for side in (1, -1):
            o = c + [side * 32.0, 68.0, -8.0]
            shell = Diff(Ellipsoid(o, [20.0, 27.0, 19.0]), Ellipsoid(o, [17.0, 24.0, 16.0]))
            parts.append(Inter(shell, half_space(o + [0, 6, 0], [0, -1, 0])))
            sinus = c + [side * 28.0, 52.0, -32.0]
            parts.append(Diff(Ellipsoid(sinus, [16.5, 18.5, 17.5]), Ellipsoid(sinus, [14.0, 16.0, 15.0])))
            parts.append(Tube([c + [side * 52, -10, -18], c + [side * 54, -4, -30], c + [side * 66, 30, -28], c + [side * 58, 62, -22]], [7, 6, 4, 5]))
        maxilla = [(38, 10), (33, 45), (18, 64), (0, 70), (-18, 64), (-33, 45), (-38, 10)]
        parts.append(Tube([c + [x, y, -55] for x, y in maxilla], 7.0))
        lower = [(36, 12), (31, 44), (16, 62), (0, 66), (-16, 62), (-31, 44), (-36, 12)]
        parts.append(Tube([c + [x, y, -66] for x, y in lower], 6.0))
        mand = [(52, -12, -20), (51, -6, -72), (44, 34, -86), (20, 60, -92), (0, 66, -93)]
        for side in (1, -1):
            parts.append(Tube([c + [side * x, y, z] for x, y, z in mand], [7, 7.5, 7, 7, 7]))
        for part in parts:
            cv.paint(part, _ID["skull"], self.bone_hu(1.5, inner=500.0))

    def pelvic_bones(self) -> None:
        cv, sh = self.cv, self.shift["pelvis"]
        bone = self.bone_hu(1.5)
        self.femur_head = {}
        for side in (1, -1):
            hc = np.array([side * 82.0, 5.0, -872.0]) + sh + [side * self.j(2), self.j(2), self.j(3)]
            hr = 23.0 * self.s(0.06)
            self.femur_head[side] = (hc, hr)
            u = np.array([side * 0.64, 0.77, 0.0])
            wing = Ellipsoid(np.array([side * 82.0, -20.0, -780.0]) + sh, [62.0, 54.0, 6.5], orthonormal_frame(u, [side * 0.4, 0.1, 1.0]), bend=-side * 0.004)
            crest = Tube([np.array([side * 48.0, -60.0, -742.0]) + sh, np.array([side * 102.0, -12.0, -728.0]) + sh, np.array([side * 126.0, 28.0, -752.0]) + sh], [8, 7, 8])
            body = Ellipsoid(hc + [-side * 8.0, 2.0, 4.0], [25.0, 31.0, 34.0])
            ischium = Tube([hc + [-side * 10, -14, -8], hc + [-side * 16, -34, -42], hc + [-side * 22, -36, -66]], [14, 12, 13])
            pubis_sup = Tube([hc + [-side * 16, 22, 0], hc + [-side * 46, 40, -12], np.array([side * 6.0, 56.0, -896.0]) + sh], [11, 10, 9])
            pubis_inf = Tube([np.array([side * 6.0, 52.0, -908.0]) + sh, hc + [-side * 52, 26, -50], hc + [-side * 26, -30, -64]], [8, 7, 8])
            hip = Diff(Union(wing, crest, body, ischium, pubis_sup, pubis_inf), Ellipsoid(hc, [hr + 2.0] * 3))
            cv.paint(hip, _side_id("hip", side), bone)
        for side in (1, -1):
            hc, hr = self.femur_head[side]
            neck_end = hc + [side * 32.0, -10.0, -24.0]
            head = Ellipsoid(hc, [hr] * 3)
            neck = Tube([hc, neck_end], [hr * 0.62, hr * 0.7])
            troch = Ellipsoid(hc + [side * 38.0, -16.0, -20.0], [14.0, 18.0, 24.0])
            lesser = Ellipsoid(hc + [side * 13.0, -14.0, -62.0], [9.0, 9.0, 10.0])
            shaft_pts = [neck_end + [0, 0, 4], hc + [side * 26, -3, -90], np.array([side * 100.0, 8.0, -1080.0]), np.array([side * 92.0, 12.0, -1260.0])]
            shaft = Tube(shaft_pts, [16.0, 14.0, 13.0, 13.0])
            femur = Union(head, neck, troch, lesser, shaft)
            cort, canc, zprox = self.tissue["bone"], self.tissue["cancellous"], float(hc[2] - 70.0)

            def femur_hu(b, d, cort=cort, canc=canc, zprox=zprox):
                thick = np.where(b.z < zprox, 5.5, max(1.5, 0.55 * self.vox))
                inner = np.where(b.z < zprox, 20.0 + 20 * b.tex("lo"), canc + 45.0 * b.tex("hi"))
                return np.where(d < thick, cort + 150.0 * (b.z < zprox), inner)

            cv.paint(femur, _side_id("femur", side), femur_hu)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], scale_mm: float) -> np.ndarray:
    """Zero-mean, unit-std random field with correlation length about ``scale_mm``."""
    coarse = [max(2, int(math.ceil(n * s / scale_mm)) + 2) for n, s in zip(shape, spacing, strict=True)]
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 0.8, mode="wrap")
    factors = [n / c for n, c in zip(shape, coarse, strict=True)]
    out = ndimage.zoom(field, factors, order=1, mode="nearest", grid_mode=True)
    out = out[: shape[0], : shape[1], : shape[2]]
    out -= out.mean()
    out /= out.std() + 1e-6
    return out.astype(np.float32, copy=False)
