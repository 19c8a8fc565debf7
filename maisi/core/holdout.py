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
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
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
    "case_files", "NEAR_COPY_AGREEMENT", "LabelMapRef", "HeldOutLabelMaps", "check_held_out_label_maps",
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
    """sha256 of a label map's voxels (as int32) and shape: the same map saved again, renamed or in another dtype matches."""
    data = np.ascontiguousarray(np.asarray(array).astype(np.int32))
    return hashlib.sha256(repr(data.shape).encode() + data.tobytes()).hexdigest()


def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def _read_classes(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A label map's voxels as whole numbers with its axes in RAS order, and its affine (:func:`maisi.core.io.read_canonical`:
    NIfTI, or another format a source's label comes in, NRRD or a DICOM folder)."""
    data, affine = read_canonical(path, "label map")
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.rint(np.nan_to_num(data.astype(np.float64))).astype(np.int32)
    return data, affine


def _near_fov(shape_a, spacing_a, shape_b, spacing_b) -> bool:
    """Whether two grids cover nearly the same field of view (a resampled copy keeps it to a voxel or two)."""
    for na, sa, nb, sb in zip(shape_a, spacing_a, shape_b, spacing_b, strict=True):
        fa, fb = na * sa, nb * sb
        if abs(fa - fb) > max(0.05 * max(fa, fb), 2.0 * max(sa, sb)):
            return False
    return True


#: How near (in voxels of the held-out map) a sampling point must lie to the midpoint of two voxels to count as a tie,
#: which resampling tools break each their own way (round half up, down, or to even).
_TIE = 1e-3


def _resampled(ref: np.ndarray, ref_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray) -> list[np.ndarray]:
    """``ref`` on the grid of ``shape``/``affine`` (both RAS), nearest neighbour, voxel centres matched in world space
    (as a resampling tool places them): one array per way of breaking the ties between two equally near voxels (the
    first rounds half up). Empty where an affine is oblique."""
    import itertools

    for a in (ref_affine, affine):
        spacing = spacing_from_affine(a)
        if np.abs(a[:3, :3] - np.diag(np.diag(a[:3, :3]))).max() > 1e-3 * float(spacing.min()):
            return []
    choices, inside = [], []
    for k in range(3):
        world = affine[k, k] * np.arange(int(shape[k]), dtype=np.float64) + affine[k, 3]
        x = (world - ref_affine[k, 3]) / ref_affine[k, k]
        nearest, below = np.floor(x + 0.5).astype(np.int64), np.floor(x).astype(np.int64)
        tie = np.abs(x - below - 0.5) < _TIE
        up, down = np.where(tie, below + 1, nearest), np.where(tie, below, nearest)
        inside.append((nearest >= 0) & (nearest < ref.shape[k]))
        choices.append([np.clip(j, 0, ref.shape[k] - 1) for j in ((up, down) if tie.any() else (up,))])
    keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return [np.where(keep, ref[np.ix_(*index)], 0).astype(ref.dtype, copy=False) for index in itertools.product(*choices)]


def _agreement(a: np.ndarray, samples: Sequence[np.ndarray]) -> float:
    """Share of the voxels labelled (other than background and body) in ``a`` or the first of ``samples`` (one map,
    resampled with each way of breaking ties) on which ``a`` carries the class of one of them."""
    b = samples[0]
    either = ((a != 0) & (a != BODY)) | ((b != 0) & (b != BODY))
    if not either.any():
        either = (a != 0) | (b != 0)
    n = int(either.sum())
    if not n:
        return 0.0
    same = np.zeros(n, bool)
    for sample in samples:
        same |= a[either] == sample[either]
    return float(np.count_nonzero(same)) / n


#: How many held-out maps' voxels a :class:`HeldOutLabelMaps` keeps in memory at once.
_KEEP_READ = 4


@dataclass
class _HeldOutMap:
    """One label map of a held-out case: the prepared one, or the source one its per-case record names."""

    key: str
    path: str
    what: str
    label_map: dict[int, int] | None = None
    _grid: tuple[tuple[int, int, int], tuple[float, float, float]] | None = field(default=None, repr=False)

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
                    data, affine = _read_classes(self.path)
                    self._grid = world_grid(data.shape, affine)
            except Exception as exc:  # readers raise many types for missing, foreign or corrupt files
                raise self.unreadable(exc) from None
        return self._grid

    def unreadable(self, exc: Exception) -> InputError:
        """The error for a held-out map that cannot be read (``exc``: why)."""
        return InputError(self.path, f"held-out case {self.key}: its {self.what} cannot be read ({type(exc).__name__}: {exc}); every "
                                     "label map on its way into generation is compared with it, so nothing passes unchecked: restore "
                                     "the file, or prepare the dataset again")  # fmt: skip

    def variants(self, array: np.ndarray) -> list[np.ndarray]:
        """The map as read, and (a source map with the source's label map) in MAISI ids."""
        out = [array]
        if self.label_map:
            present, inverse = np.unique(array, return_inverse=True)
            out.append(np.array([self.label_map.get(int(v), 0) for v in present], np.int32)[inverse].reshape(array.shape))
        return out


class HeldOutLabelMaps:
    """The label maps of the held-out cases (``held_out``: the held-out rows of the prepared case table), to match
    maps against by case id, file, file hash and voxels (:meth:`match`).

    Each case brings its prepared map (the table's ``label``) and the source map its per-case record names
    (the table's ``meta`` column, ``input.label``), with that record's label map for the comparison in MAISI ids. A
    case whose record is not there is matched by its prepared map only (a warning says so).
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
        self._voxels: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()  # the last few read
        self.files: dict[str, _HeldOutMap] = {}
        self.hashes: dict[str, _HeldOutMap] = {}
        for m in self.maps:
            path = Path(m.path)
            self.files.setdefault(str(path.resolve()), m)
            if path.is_file():
                self.hashes.setdefault(sha256_file(path), m)

    def _read(self, m: _HeldOutMap) -> tuple[np.ndarray, np.ndarray]:
        """A held-out map's voxels (RAS) and affine; the last :data:`_KEEP_READ` read are kept, not every one."""
        key = id(m)
        if key not in self._voxels:
            try:
                self._voxels[key] = _read_classes(m.path)
            except Exception as exc:  # readers raise many types for corrupt files
                raise m.unreadable(exc) from None
            while len(self._voxels) > _KEEP_READ:
                self._voxels.popitem(last=False)
        self._voxels.move_to_end(key)
        return self._voxels[key]

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
        import nibabel as nib

        try:
            header = nib.load(ref.path)
        except Exception as exc:  # nibabel raises many types for foreign files
            raise InputError(ref.path, f"{ref.name}: not a readable NIfTI label map ({type(exc).__name__}: {exc})") from None
        shape, spacing = world_grid(header.shape[:3], header.affine)
        near = []
        for m in self.maps:
            grid = m.grid()
            if grid[0] == shape or _near_fov(grid[0], grid[1], shape, spacing):
                near.append(m)
        if not near:
            return None
        array, affine = _read_classes(ref.path)
        digest = voxel_digest(array)
        for m in near:
            theirs, their_affine = self._read(m)
            if theirs.shape == array.shape and any(voxel_digest(v) == digest for v in m.variants(theirs)):
                return m.key, f"{where}: has the voxels of {m.describe()}"
            moved = [m.variants(sample) for sample in _resampled(theirs, their_affine, array.shape, affine)]
            for variant in range(len(moved[0]) if moved else 0):
                samples = [v[variant] for v in moved]
                if voxel_digest(samples[0]) == digest:
                    return m.key, f"{where}: has the voxels of {m.describe()}, resampled to its grid"
                share = _agreement(array, samples)
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
