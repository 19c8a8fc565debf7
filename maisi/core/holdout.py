"""The dataset-level held-out split: real cases that no generative stage ever sees.

The split is decided once, when the dataset is prepared (``dataset.held_out``), and recorded in the
case table (column ``split``) and the datalist (held-out cases under ``testing``, the others under
``training``). The privacy audit measures how near honest new cases come to the training set with
them, and the downstream-utility stage evaluates its segmentation networks on them; both are
meaningless if a held-out case leaked into training. So every stage that learns from real cases (the
autoencoder, the latent cache and with it the diffusion UNet and ControlNet, the mask database, the
QC reference ranges) reads the training split only, and checks with :func:`check_not_held_out` that
nothing it was handed is held out.

A label map reaches generation by other routes too (a mask database of any source, a folder of the user's own
maps), under any name and on any grid. :func:`check_held_out_label_maps` refuses every map that is a held-out
case's: by case id, by file, by file hash and by its voxels (:class:`HeldOutLabelMaps`), against both the case's
prepared map and the source map its per-case record names.

Cases are chosen per source, by a seeded hash of ``source/case_id``, so the choice of a case does not
depend on the order of the files or on the other sources; stratified by body-region pair, so the training
split keeps every field of view the data has as long as it can.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from maisi.core.checks import InputError, spacing_from_affine
from maisi.core.io import read_canonical, read_json, sha256_file, world_grid
from maisi.core.labels import BODY
from maisi.core.seeds import derive_seed

__all__ = [
    "TRAIN", "HELD_OUT", "HeldOutLeak", "case_key", "held_out_count", "choose_held_out", "split_column",
    "training_rows", "held_out_rows", "held_out_keys", "check_not_held_out", "require_held_out",
    "case_files", "NEAR_COPY_AGREEMENT", "SIGNATURE_SLAB_MM", "SIGNATURE_TOLERANCE", "LabelMapRef", "HeldOutLabelMaps", "check_held_out_label_maps",
    "voxel_digest",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Values of the case table's ``split`` column.
TRAIN = "train"
HELD_OUT = "held_out"


class HeldOutLeak(InputError):
    """A held-out real case reached a stage that learns from real cases."""


def case_key(source: str, case_id: str) -> str:
    """The identity of a prepared case across sources: ``source/case_id``."""
    return f"{source}/{case_id}"


def held_out_count(n_cases: int, fraction: float) -> int:
    """How many of a source's ``n_cases`` are held out: ``fraction`` of them rounded, at least one when the
    fraction is above zero, and never all (one case is left to train on)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.held_out must lie in [0, 1), got {fraction}")
    if fraction == 0.0 or n_cases < 2:
        return 0
    return min(max(1, math.floor(fraction * n_cases + 0.5)), n_cases - 1)


def choose_held_out(
    keys: Iterable[tuple[str, str]], fraction: float, seed: int, strata: Mapping[str, str] | None = None
) -> set[str]:
    """The held-out cases (their :func:`case_key`) among ``(source, case_id)`` pairs: per source, the
    :func:`held_out_count` cases of lowest seeded hash. With ``strata`` (case key -> stratum, e.g. the body-region
    pair), each case is taken from the stratum with the most cases still in training (ties by the seeded hash), so a
    field of view that only one case shows is held out only when every stratum is down to one case."""
    by_source: dict[str, list[str]] = {}
    for source, case in keys:
        by_source.setdefault(source, []).append(case)
    chosen: set[str] = set()
    for source, cases in by_source.items():
        ranked = sorted(set(cases), key=lambda c: (derive_seed(seed, "held-out", case_key(source, c)), c))
        left = {c: (strata or {}).get(case_key(source, c), "") for c in ranked}
        for _ in range(held_out_count(len(ranked), fraction)):
            sizes = Counter(left.values())  # one pass per pick, not one per stratum
            largest = max(sizes.values())
            pick = next(c for c in left if sizes[left[c]] == largest)  # lowest hash of a largest stratum
            chosen.add(case_key(source, pick))
            del left[pick]
    return chosen


def split_column(cases: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """The ``split`` value (:data:`TRAIN` or :data:`HELD_OUT`) of each row of a case table, stratified by the
    (top, bottom) body-region pair where the table has them."""
    keys = list(zip(cases["source"], cases["case_id"], strict=True))
    strata = None
    if {"top_region", "bottom_region"} <= set(cases.columns):
        strata = {case_key(s, c): f"{t}->{b}" for s, c, t, b in zip(cases["source"], cases["case_id"], cases["top_region"],
                                                                   cases["bottom_region"], strict=True)}  # fmt: skip
    held = choose_held_out(keys, fraction, seed, strata)
    return [HELD_OUT if case_key(s, c) in held else TRAIN for s, c in keys]


def _split(cases: pd.DataFrame) -> pd.Series:
    """A case table's ``split`` column; tables written before the split existed hold out nothing."""
    if "split" not in cases.columns:
        return pd.Series([TRAIN] * len(cases), index=cases.index)
    bad = sorted(set(cases["split"].astype(str)) - {TRAIN, HELD_OUT})
    if bad:
        raise ValueError(f"case table: unknown split value(s) {bad}; expected {TRAIN!r} or {HELD_OUT!r}")
    return cases["split"].astype(str)


def training_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """The rows of the training split (what the generative stages may learn from)."""
    return cases[_split(cases) == TRAIN]


def held_out_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """The rows of the held-out split."""
    return cases[_split(cases) == HELD_OUT]


def held_out_keys(cases: pd.DataFrame) -> set[str]:
    """The :func:`case_key` of every held-out case of a case table."""
    rows = held_out_rows(cases)
    return {case_key(s, c) for s, c in zip(rows["source"], rows["case_id"], strict=True)}


def case_files(rows: pd.DataFrame, labels: bool = False) -> dict[str, str] | dict[str, tuple[str, str]]:
    """Each case's :func:`case_key` mapped to its image in HU (``image_hu``, else ``image``), or with ``labels``
    to ``(image, label map)`` for the cases that have a label map."""
    if not labels:
        return {case_key(r.source, r.case_id): r.image_hu or r.image for r in rows.itertuples()}
    return {case_key(r.source, r.case_id): (r.image_hu or r.image, r.label) for r in rows.itertuples() if r.label}


def check_not_held_out(used: Iterable[str] | Mapping[str, str], held_out: Sequence[str] | set[str], stage: str) -> None:
    """Refuse (:class:`HeldOutLeak`) when any case ``stage`` was handed is held out.

    ``used`` holds :func:`case_key` values, or maps each to what it came from (a file), for the message.
    """
    where = dict(used) if isinstance(used, Mapping) else {k: "" for k in used}
    leaked = sorted(set(where) & set(held_out))
    if leaked:
        named = ", ".join(f"{k} ({where[k]})" if where[k] else k for k in leaked[:5])
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise HeldOutLeak(
            None,
            f"{stage}: held-out real case(s) {named}{more} would be used; the held-out split (dataset.held_out) is kept "
            "out of every stage that learns from real cases, so that the privacy audit and the utility stage stay honest",
        )


def require_held_out(cases: pd.DataFrame, stage: str, need_labels: bool = False) -> pd.DataFrame:
    """The held-out rows (with a label map, ``need_labels``) of a case table, or an :class:`InputError` that says
    which keys give ``stage`` some."""
    rows = held_out_rows(cases)
    if need_labels and "label" in rows.columns:
        rows = rows[rows["label"].astype(str).str.strip() != ""]
    if rows.empty:
        what = "held-out case with a label map" if need_labels else "held-out case"
        raise InputError(None, f"{stage} needs held-out real cases, and the prepared dataset has no {what}: set "
                               f"dataset.held_out above 0 (a source needs at least 2 cases to hold one out), or {stage}.enabled: false")  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------- label maps on their way to generation

#: Share of the labelled voxels (classes other than background and body) on which a map and a held-out map, put on one
#: grid, must agree for the map to count as a copy: a map resampled by another tool differs from ours at boundaries only,
#: another patient's map on the same field of view agrees on far fewer.
NEAR_COPY_AGREEMENT = 0.95


@dataclass(frozen=True)
class LabelMapRef:
    """A label map on its way into a stage: what the stage calls it (``name``, for the message), its file, its sha256
    where already known, and the :func:`case_key` it stands for where it has one (a prepared-data database entry)."""

    name: str
    path: str
    sha256: str = ""
    case_key: str = ""


def voxel_digest(array: np.ndarray) -> str:
    """sha256 of a label map's voxels (as int32, C order) and shape: the same map saved again, renamed or in another
    dtype matches. Hashed a slice at a time (no int32 copy of the whole map)."""
    data = np.asarray(array)
    digest = hashlib.sha256(repr(data.shape).encode())
    for part in data.reshape(-1, *data.shape[-2:]) if data.ndim > 2 else [data]:
        digest.update(np.ascontiguousarray(part, dtype=np.int32))
    return digest.hexdigest()


def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def _read_classes(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A label map's voxels as whole numbers with its axes in RAS order, and its affine (:func:`maisi.core.io.read_canonical`:
    NIfTI, or another format a source's label comes in, NRRD or a DICOM folder)."""
    data, affine = read_canonical(path, "label map")
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.integer):  # rounded a slice at a time: no float64 copy of the whole map
        whole = np.empty(data.shape, np.int32)
        for i in range(data.shape[0]):
            whole[i] = np.rint(np.nan_to_num(data[i]))
        data = whole
    return data, affine


def _near_fov(shape_a, spacing_a, shape_b, spacing_b) -> bool:
    """Whether two grids cover nearly the same field of view (a resampled copy keeps it to a voxel or two)."""
    for na, sa, nb, sb in zip(shape_a, spacing_a, shape_b, spacing_b, strict=True):
        fa, fb = na * sa, nb * sb
        if abs(fa - fb) > max(0.05 * max(fa, fb), 2.0 * max(sa, sb)):
            return False
    return True


def _axis_aligned(affine: np.ndarray) -> bool:
    """Whether a RAS affine has no rotation (the voxel comparison places voxel centres along the world's axes only)."""
    lin = np.asarray(affine, np.float64)[:3, :3]
    return bool(np.abs(lin - np.diag(np.diag(lin))).max() <= 1e-3 * float(spacing_from_affine(affine).min()))


#: How near (in voxels of the held-out map) a sampling point must lie to the midpoint of two voxels to count as a tie,
#: which resampling tools break each their own way (round half up, down, or to even).
_TIE = 1e-3


@dataclass(frozen=True)
class _Sampling:
    """Where each voxel of a grid takes its value from in a held-out map (nearest neighbour, voxel centres matched in
    world space): per axis, the index rounding half up and, where that differs (a tie), half down; and whether the
    voxel lies within the map."""

    up: tuple[np.ndarray, np.ndarray, np.ndarray]
    down: tuple[np.ndarray, np.ndarray, np.ndarray]
    tie: tuple[np.ndarray, np.ndarray, np.ndarray]
    inside: tuple[np.ndarray, np.ndarray, np.ndarray]


def _sampling(ref_shape: Sequence[int], ref_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> _Sampling | None:
    """How a map of ``ref_shape``/``ref_affine`` is sampled on the grid of ``shape``/``affine`` (both RAS); None where an
    affine is oblique."""
    if not (_axis_aligned(ref_affine) and _axis_aligned(affine)):
        return None
    up, down, tie, inside = [], [], [], []
    for k in range(3):
        world = affine[k, k] * np.arange(int(shape[k]), dtype=np.float64) + affine[k, 3]
        x = (world - ref_affine[k, 3]) / ref_affine[k, k]
        nearest, below = np.floor(x + 0.5).astype(np.int64), np.floor(x).astype(np.int64)
        t = np.abs(x - below - 0.5) < _TIE
        up.append(np.clip(np.where(t, below + 1, nearest), 0, ref_shape[k] - 1))
        down.append(np.clip(np.where(t, below, nearest), 0, ref_shape[k] - 1))
        tie.append(t)
        inside.append((nearest >= 0) & (nearest < ref_shape[k]))
    return _Sampling(tuple(up), tuple(down), tuple(tie), tuple(inside))  # type: ignore[arg-type]


def _resampled(ref: np.ndarray, ref_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> Iterator[np.ndarray]:
    """``ref`` on the grid of ``shape``/``affine`` (both RAS), nearest neighbour, voxel centres matched in world space
    (as a resampling tool places them): one array per way of breaking the ties between two equally near voxels, made
    one at a time as they are asked for (the first rounds half up; the others only along axes that have ties). Nothing
    where an affine is oblique."""
    import itertools

    sampling = _sampling(ref.shape, ref_affine, shape, affine)
    if sampling is None:
        return
    choices = [(sampling.up[k], sampling.down[k]) if sampling.tie[k].any() else (sampling.up[k],) for k in range(3)]
    inside = sampling.inside[0][:, None, None] & sampling.inside[1][None, :, None] & sampling.inside[2][None, None, :]
    for index in itertools.product(*choices):
        yield np.where(inside, ref[np.ix_(*index)], 0).astype(ref.dtype, copy=False)


def _labelled(array: np.ndarray) -> np.ndarray:
    return (array != 0) & (array != BODY)


def _agreement(a: np.ndarray, samples: Iterator[np.ndarray], ties: Sequence[np.ndarray]) -> tuple[float, bool]:
    """Share of the voxels labelled (other than background and body) in ``a`` or the first of ``samples`` (one map,
    resampled with each way of breaking ties, :func:`_resampled`) on which ``a`` carries the class of one of them, and
    whether ``a`` equals one of them. The other ways of breaking ties (``ties``: per axis, where they differ from the
    first) are tried only while they could still lift the share to :data:`NEAR_COPY_AGREEMENT`."""
    b = next(samples, None)
    if b is None:
        return 0.0, False
    if np.array_equal(a, b):
        return 1.0, True
    either = _labelled(a) | _labelled(b)
    if not either.any():
        either = (a != 0) | (b != 0)
    n = int(np.count_nonzero(either))
    if not n:
        return 0.0, False
    same = either & (a == b)
    share = np.count_nonzero(same) / n
    if share >= NEAR_COPY_AGREEMENT or not any(t.any() for t in ties):
        return share, False
    on_tie = ties[0][:, None, None] | ties[1][None, :, None] | ties[2][None, None, :]
    if (np.count_nonzero(same) + np.count_nonzero(either & ~same & on_tie)) / n < NEAR_COPY_AGREEMENT:
        return share, False  # even the voxels a tie decides could not make it a copy
    del on_tie
    for sample in samples:
        if np.array_equal(a, sample):
            return 1.0, True
        same |= either & (a == sample)
        share = np.count_nonzero(same) / n
        if share >= NEAR_COPY_AGREEMENT:
            break
    return share, False


# ---------------------------------------------------------------- signatures: what a map holds where, compared first

#: Width (mm) of the slabs across each world axis in which a signature sums each class's volume; at least twice the
#: coarser spacing of the two maps compared along that axis.
SIGNATURE_SLAB_MM = 8.0

#: How far two maps' signatures may lie apart (the sum of the differences of every class's volume in every slab, as a
#: share of the smaller labelled volume, along the world axis where they differ most) for the maps to be compared voxel
#: by voxel. A map agreeing with a held-out map on :data:`NEAR_COPY_AGREEMENT` (p) of their labelled voxels labels at
#: most 1 - p of them otherwise, each of which moves its volume from one class to another (or to none): their volumes
#: differ by at most 2 (1 - p) / p of the smaller labelled volume, 0.105 at p = 0.95. Nearest-neighbour resampling
#: moves the boundaries of the classes by up to half a voxel: up to 0.092 on 40 x 36 x 30 voxel test maps whose
#: smallest organs are 5 voxels across (resampled by nibabel, MONAI and SimpleITK to spacings of 0.75 to 3 mm), a few
#: hundredths on maps of CT size. Another patient's map lies further off: its organs differ in size and place.
SIGNATURE_TOLERANCE = 0.2


@dataclass(frozen=True)
class _Signature:
    """What a label map (RAS, axis-aligned) holds where: for each world axis, the volume (mm^3) of each class in each
    slice across that axis, and the slices' world positions (mm); of the labelled classes (other than background and
    body), or of every class but background where it labels none."""

    classes: np.ndarray
    positions: tuple[np.ndarray, np.ndarray, np.ndarray]
    volumes: tuple[np.ndarray, np.ndarray, np.ndarray]
    spacing: tuple[float, float, float]
    total: float


#: Label values up to which a signature counts voxels by value directly; a map with larger (or negative) ones is sorted
#: into codes first.
_DIRECT_IDS = 1024


def _signature(array: np.ndarray, affine: np.ndarray) -> _Signature | None:
    """The :class:`_Signature` of a map with its axes in RAS order; None where its affine is oblique. One pass over the
    voxels, a slice at a time: two histograms (class by y, class by z) per slice along x."""
    if not _axis_aligned(affine):
        return None
    a = np.asarray(array)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= _DIRECT_IDS:
        values, inverse = np.unique(a, return_inverse=True)
        a, n = inverse.reshape(a.shape), values.size
    else:
        values, n = np.arange(hi + 1), hi + 1
    nx, ny, nz = a.shape
    along = [np.zeros((n, nx), np.int64), np.zeros((n, ny), np.int64), np.zeros((n, nz), np.int64)]
    y_index, z_index = np.arange(ny)[:, None], np.arange(nz)[None, :]
    for i in range(nx):
        c = a[i].astype(np.intp)
        by_y = np.bincount((c * ny + y_index).reshape(-1), minlength=n * ny).reshape(n, ny)
        along[0][:, i] = by_y.sum(axis=1)
        along[1] += by_y
        along[2] += np.bincount((c * nz + z_index).reshape(-1), minlength=n * nz).reshape(n, nz)
    present = along[0].sum(axis=1) > 0
    keep = present & (values != 0) & (values != BODY)
    if not keep.any():
        keep = present & (values != 0)
    spacing = tuple(float(s) for s in spacing_from_affine(affine))
    voxel = float(np.prod(spacing))
    volumes = tuple((c[keep] * voxel).astype(np.float32) for c in along)
    positions = tuple(affine[k, k] * np.arange(a.shape[k], dtype=np.float64) + affine[k, 3] for k in range(3))
    return _Signature(values[keep], positions, volumes, spacing, float(volumes[0].sum()))  # type: ignore[arg-type]


def _signature_distance(a: _Signature, b: _Signature) -> float:
    """How far apart two signatures lie (see :data:`SIGNATURE_TOLERANCE`): along each world axis, each class's volume
    is spread over slabs of :data:`SIGNATURE_SLAB_MM` (each slice shared between the two slabs nearest its position, so
    that a slice moved by a fraction of a voxel moves a fraction of its volume); the largest sum of differences."""
    smaller = min(a.total, b.total)
    if smaller <= 0:
        return math.inf
    classes = np.union1d(a.classes, b.classes)
    worst = 0.0
    for k in range(3):
        width = max(SIGNATURE_SLAB_MM, 2.0 * max(a.spacing[k], b.spacing[k]))
        slabs = []
        for s in (a, b):
            u = s.positions[k] / width
            below = np.floor(u).astype(np.int64)
            slabs.append((s, below, u - below))
        first = min(int(below.min()) for _, below, _ in slabs)
        size = max(int(below.max()) for _, below, _ in slabs) - first + 2
        profiles = []
        for s, below, frac in slabs:
            profile = np.zeros((classes.size, size))
            rows = np.searchsorted(classes, s.classes)
            for weight, offset in ((1.0 - frac, 0), (frac, 1)):
                np.add.at(profile, (rows[:, None], (below - first + offset)[None, :]), s.volumes[k] * weight[None, :])
            profiles.append(profile)
        worst = max(worst, float(np.abs(profiles[0] - profiles[1]).sum()) / smaller)
    return worst


def _relabel(array: np.ndarray, label_map: Mapping[int, int]) -> np.ndarray:
    """A map's values through a source's label map (values it does not name become background), as int32."""
    lo, hi = int(array.min()), int(array.max())
    if lo >= 0 and hi < 1 << 20:
        lut = np.zeros(hi + 1, np.int32)
        for src, dst in label_map.items():
            if 0 <= src <= hi:
                lut[src] = dst
        return lut[array]
    present, inverse = np.unique(array, return_inverse=True)
    return np.array([label_map.get(int(v), 0) for v in present], np.int32)[inverse].reshape(array.shape)


@dataclass
class _Summary:
    """What the voxel comparison needs of a held-out map, read once: its shape, the :func:`voxel_digest` of each of its
    variants (as read; in MAISI ids) and their signatures."""

    shape: tuple[int, ...]
    digests: set[str]
    signatures: list[_Signature | None]


@dataclass
class _HeldOutMap:
    """One label map of a held-out case: the prepared one, or the source one its per-case record names."""

    key: str
    path: str
    what: str
    label_map: dict[int, int] | None = None
    _grid: tuple[tuple[int, int, int], tuple[float, float, float]] | None = field(default=None, repr=False)
    _summary: _Summary | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.key}'s {self.what} {self.path}"

    def grid(self) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """Shape and spacing in RAS order (from the header where it is NIfTI). A map that cannot be read is an
        :class:`InputError` naming the case and the file: the check must not pass without its reference."""
        if self._grid is None:
            try:
                if _is_nifti(self.path):
                    import nibabel as nib

                    img = nib.load(self.path)
                    self._grid = world_grid(img.shape[:3], img.affine)
                else:
                    data, affine = self.read()
                    self._grid = world_grid(data.shape, affine)
            except InputError:
                raise
            except Exception as exc:  # readers raise many types for missing, foreign or corrupt files
                raise self.unreadable(exc) from None
        return self._grid

    def unreadable(self, exc: Exception) -> InputError:
        """The error for a held-out map that cannot be read (``exc``: why)."""
        return InputError(self.path, f"held-out case {self.key}: its {self.what} cannot be read ({type(exc).__name__}: {exc}); every "
                                     "label map on its way into generation is compared with it, so nothing passes unchecked: restore "
                                     "the file, or prepare the dataset again")  # fmt: skip

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Its voxels (RAS) and affine; an :class:`InputError` naming the case and the file where it cannot be read."""
        try:
            return _read_classes(self.path)
        except Exception as exc:  # readers raise many types for missing, foreign or corrupt files
            raise self.unreadable(exc) from None

    def variant(self, array: np.ndarray, index: int) -> np.ndarray:
        """Variant ``index`` of the map: 0 as read, 1 (a source map with the source's label map) in MAISI ids."""
        return array if index == 0 else _relabel(array, self.label_map or {})

    def summary(self) -> _Summary:
        """Its :class:`_Summary`, made on first use (the map read once, one variant at a time in memory)."""
        if self._summary is None:
            array, affine = self.read()
            digests, signatures = set(), []
            for index in range(2 if self.label_map else 1):
                v = self.variant(array, index)
                digests.add(voxel_digest(v))
                signatures.append(_signature(v, affine))
                del v
            self._summary = _Summary(tuple(array.shape), digests, signatures)
        return self._summary


class HeldOutLabelMaps:
    """The label maps of the held-out cases (``held_out``: the held-out rows of the prepared case table), to match
    maps against by case id, file, file hash and voxels (:meth:`match`).

    Each case brings its prepared map (the table's ``label``) and the source map its per-case record names
    (the table's ``meta`` column, ``input.label``), with that record's label map for the comparison in MAISI ids. A
    case whose record is not there is matched by its prepared map only (a warning says so).

    Each held-out map is read once, on first need, for its voxel digests and :class:`_Signature`; a map is resampled
    and compared voxel by voxel only with the held-out maps whose signature lies near its own
    (:data:`SIGNATURE_TOLERANCE`), so a database of thousands of maps costs one read of each.
    """

    def __init__(self, held_out: pd.DataFrame):
        self.keys = {case_key(s, c) for s, c in zip(held_out["source"], held_out["case_id"], strict=True)}
        self.maps: list[_HeldOutMap] = []
        for row in held_out.to_dict(orient="records"):
            key = case_key(row["source"], row["case_id"])
            prepared = str(row.get("label", "") or "").strip()
            if prepared and prepared.lower() != "nan":
                self.maps.append(_HeldOutMap(key, prepared, "prepared label map"))
            meta = str(row.get("meta", "") or "").strip()
            record = Path(meta) if meta and meta.lower() != "nan" else None
            if record is None or not record.is_file():
                why = f"{record} is not there" if record else "the case table names none (column meta)"
                log.warning("held-out case %s: no per-case record (%s); its source label map is not known, only its prepared one is "
                            "checked", key, why)  # fmt: skip
                continue
            given = read_json(record).get("input") or {}
            if given.get("label"):
                label_map = {int(k): int(v) for k, v in (given.get("label_map") or {}).items()}
                self.maps.append(_HeldOutMap(key, str(given["label"]), "source label map", label_map or None))
        self._last: tuple[_HeldOutMap, np.ndarray, np.ndarray] | None = None  # the held-out map last read for a comparison
        self.files: dict[str, _HeldOutMap] = {}
        self.hashes: dict[str, _HeldOutMap] = {}
        for m in self.maps:
            path = Path(m.path)
            self.files.setdefault(str(path.resolve()), m)
            if path.is_file():
                self.hashes.setdefault(sha256_file(path), m)

    def _read(self, m: _HeldOutMap) -> tuple[np.ndarray, np.ndarray]:
        """A held-out map's voxels (RAS) and affine, for a comparison; only the one last read is kept."""
        if self._last is None or self._last[0] is not m:
            self._last = None  # freed before the next is read
            self._last = (m, *m.read())
        return self._last[1], self._last[2]

    def match(self, ref: LabelMapRef) -> tuple[str, str] | None:
        """``(held-out case key, why)`` when ``ref`` is a held-out case's map, else None."""
        where = f"{ref.name}, {ref.path}"
        if ref.case_key in self.keys:
            return ref.case_key, f"{where}: is held-out case {ref.case_key}'s own entry"
        m = self.files.get(str(Path(ref.path).resolve()))
        if m is not None:
            return m.key, f"{where}: is {m.describe()}"
        m = self.hashes.get(ref.sha256 or sha256_file(ref.path))
        if m is not None:
            return m.key, f"{where}: is a byte-identical copy of {m.describe()}"
        return self._voxel_match(ref, where)

    def _voxel_match(self, ref: LabelMapRef, where: str) -> tuple[str, str] | None:
        """Match ``ref`` by its voxels against the held-out maps on nearly its field of view: those of its shape by their
        :func:`voxel_digest` (read once per held-out map), the others whose signature is near its own
        (:data:`SIGNATURE_TOLERANCE`) resampled to its grid (:func:`_resampled`, :data:`NEAR_COPY_AGREEMENT`). One map
        and one held-out map are in memory at a time."""
        import nibabel as nib

        try:
            header = nib.load(ref.path)
        except Exception as exc:  # nibabel raises many types for foreign files
            raise InputError(ref.path, f"{ref.name}: not a readable NIfTI label map ({type(exc).__name__}: {exc})") from None
        shape, spacing = world_grid(header.shape[:3], header.affine)
        near = [m for m in self.maps if m.grid()[0] == shape or _near_fov(*m.grid(), shape, spacing)]
        if not near:
            return None
        array, affine = _read_classes(ref.path)
        if any(m.grid()[0] == shape for m in near):
            digest = voxel_digest(array)
            for m in near:
                if m.summary().shape == array.shape and digest in m.summary().digests:
                    return m.key, f"{where}: has the voxels of {m.describe()}"
        signature = _signature(array, affine)
        if signature is None:
            return None  # an oblique map: compared by its digest only
        for m in near:
            for index, theirs in enumerate(m.summary().signatures):
                if theirs is None or _signature_distance(signature, theirs) > SIGNATURE_TOLERANCE:
                    continue
                held, held_affine = self._read(m)
                sampling = _sampling(held.shape, held_affine, array.shape, affine)
                if sampling is None:
                    continue
                samples = _resampled(m.variant(held, index), held_affine, array.shape, affine)
                share, equal = _agreement(array, samples, sampling.tie)
                if equal:
                    return m.key, f"{where}: has the voxels of {m.describe()}, resampled to its grid"
                if share >= NEAR_COPY_AGREEMENT:
                    why = f"agrees on {share:.0%} of its labelled voxels with {m.describe()}, resampled to its grid"
                    return m.key, f"{where}: {why}"
        return None


def check_held_out_label_maps(maps: Iterable[LabelMapRef], held_out: pd.DataFrame | HeldOutLabelMaps, stage: str) -> None:
    """Refuse (:class:`HeldOutLeak`) label maps on their way into ``stage`` of which any is a held-out case's map, by
    case id, file, file hash or voxels (:class:`HeldOutLabelMaps`); the message names the case, the map and the file."""
    reference = held_out if isinstance(held_out, HeldOutLabelMaps) else HeldOutLabelMaps(held_out)
    used: dict[str, str] = {}
    for ref in maps:
        hit = reference.match(ref)
        if hit is not None:
            used.setdefault(*hit)
    check_not_held_out(used, reference.keys, stage)
