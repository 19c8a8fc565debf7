"""Converters from extracted public datasets to the factory's common layout.

Every converter turns an extracted dataset into::

    <out>/images/<case>.nii.gz      the CT (hard link to the source file, copy as fallback)
    <out>/labels/<case>.nii.gz      uint8 MAISI label map, only for cases with labels
    <out>/cases.tsv                 case_id, image, label ("" if none), source_image
    <out>/cases.tsv.json            sidecar: dataset, url, checksum, case counts, provenance

``image`` and ``label`` in ``cases.tsv`` are relative to ``<out>``, ``source_image`` is relative
to the extracted folder. Every file is written atomically (:func:`maisi.core.io.atomic_path`). Images
are hard-linked, so they share their data with the extracted copy: do not modify them in place.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import nibabel as nib
import numpy as np
import pandas as pd

from maisi.core.io import atomic_path, write_with_sidecar
from maisi.core.labels import label_id

__all__ = ["ConversionError", "CONVERTERS", "NEEDS_LABEL_MAP", "CASES_COLUMNS", "convert_dataset", "convert_msd", "convert_totalsegmentator", "totalseg_mapping", "register_converter"]

logger = logging.getLogger(__name__)


CASES_COLUMNS: tuple[str, ...] = ("case_id", "image", "label", "source_image")




class DatasetEntry(Protocol):
    """What a converter reads of a catalog entry (:class:`maisi.sources.catalog.DatasetEntry`)."""

    name: str
    url: str
    md5: str | None
    sha256: str | None
    licence: str
    converter: str
    label_map: dict[int, int]
    subdir: str | None


Converter = Callable[[DatasetEntry, Path, Path], pd.DataFrame]


class ConversionError(ValueError):
    """An extracted dataset does not look as its converter expects."""


def _nii_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ConversionError(f"{path}: not a NIfTI file name")


def _link_or_copy(src: Path, dest: Path) -> None:
    """Atomically make ``dest`` a hard link to ``src`` (a copy when linking is impossible)."""
    if dest.exists() and os.path.samefile(src, dest):
        return
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:  # other file system, no hard-link support...
            shutil.copyfile(src, tmp)


def _save_label(label: np.ndarray, reference: nib.spatialimages.SpatialImage, dest: Path) -> None:
    """Write ``label`` as uint8 NIfTI with the affine and header of the ``reference`` image."""
    if isinstance(reference, nib.Nifti1Image):
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        img = type(reference)(label.astype(np.uint8, copy=False), reference.affine, header=header)
    else:
        img = nib.Nifti1Image(label.astype(np.uint8, copy=False), reference.affine)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_data_dtype(np.uint8)
    with atomic_path(dest) as tmp:
        nib.save(img, tmp)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _finish(
    entry: DatasetEntry, out_dir: Path, rows: list[dict[str, str]], step: str, extra: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Write ``cases.tsv`` and its sidecar; return the table."""
    df = pd.DataFrame(rows, columns=list(CASES_COLUMNS))
    if df["case_id"].duplicated().any():
        dup = sorted(df.loc[df["case_id"].duplicated(), "case_id"].unique())
        raise ConversionError(f"{entry.name}: duplicate case ids {dup[:5]}")
    df = df.sort_values("case_id", kind="stable").reset_index(drop=True)
    meta = {
        "dataset": entry.name,
        "url": entry.url,
        "md5": entry.md5,
        "sha256": entry.sha256,
        "licence": entry.licence,
        "converter": entry.converter,
        "n_cases": len(df),
        "n_labelled": int((df["label"] != "").sum()),
        "columns": list(CASES_COLUMNS),
        **(extra or {}),
    }
    write_with_sidecar(
        out_dir / "cases.tsv", lambda tmp: df.to_csv(tmp, sep="\t", index=False), meta, step=step
    )
    return df


def _inside(path: Path, root: Path, what: str) -> Path:
    resolved = path.resolve()
    root = root.resolve()
    if resolved != root and root not in resolved.parents:
        raise ConversionError(f"{what} {path} points outside {root}")
    return path


def _find_msd_task(entry: DatasetEntry, extracted_dir: Path) -> Path:
    if entry.subdir:
        task = extracted_dir / entry.subdir
        if not (task / "dataset.json").is_file():
            raise ConversionError(f"{entry.name}: no {entry.subdir}/dataset.json in {extracted_dir}")
        return task
    found = sorted(
        p.parent for p in (*extracted_dir.glob("dataset.json"), *extracted_dir.glob("*/dataset.json"))
    )
    if len(found) != 1:
        raise ConversionError(
            f"{entry.name}: expected one MSD task folder with dataset.json in {extracted_dir}, found {len(found)}"
        )
    return found[0]


def _map_labels(values: np.ndarray, label_map: dict[int, int], source: Path) -> np.ndarray:
    """Map dataset label values to MAISI ids; unmapped nonzero values raise (naming file and value)."""
    data = np.asanyarray(values)
    present = np.unique(data)  # label volumes are sometimes stored as float
    odd = [float(v) for v in present if not float(v).is_integer()]
    if odd:
        raise ConversionError(f"{source}: label volume has non-integer value(s) {odd[:5]}")
    unmapped = [int(v) for v in present if v != 0 and int(v) not in label_map]
    if unmapped:
        raise ConversionError(f"{source}: label value(s) {unmapped} not in the dataset's label_map {label_map}")
    out = np.zeros(data.shape, dtype=np.uint8)
    for value in present:
        if value != 0:
            out[data == value] = label_map[int(value)]
    return out


def convert_msd(
    entry: DatasetEntry, extracted_dir: str | os.PathLike, out_dir: str | os.PathLike, *, include_unlabelled: bool = True
) -> pd.DataFrame:
    """Convert a Medical Segmentation Decathlon task.

    Reads the task's ``dataset.json``: its ``training`` pairs become labelled cases (labels mapped
    with ``entry.label_map``) and, with ``include_unlabelled``, its ``test`` images become cases
    without label. macOS ``._*`` resource files are skipped.
    """
    extracted_dir, out_dir = Path(extracted_dir), Path(out_dir)
    if not entry.label_map:
        raise ConversionError(f"{entry.name}: the msd converter needs a label_map")
    task = _find_msd_task(entry, extracted_dir)
    with open(task / "dataset.json", encoding="utf-8") as fh:
        meta = json.load(fh)

    pairs: list[tuple[Path, Path | None]] = []
    for item in meta.get("training", []):
        pairs.append((task / item["image"], task / item["label"]))
    if include_unlabelled:
        for item in meta.get("test", []):
            pairs.append((task / (item["image"] if isinstance(item, dict) else item), None))
    if not pairs:
        raise ConversionError(f"{task / 'dataset.json'}: no training or test cases listed")

    rows: list[dict[str, str]] = []
    for image, label in pairs:
        if image.name.startswith("._"):
            continue
        _inside(image, task, "image")
        if not image.is_file():
            raise ConversionError(f"{entry.name}: image {image} listed in dataset.json is missing")
        case = _nii_stem(image)
        out_image = out_dir / "images" / f"{case}.nii.gz"
        _link_or_copy(image, out_image)
        row = {"case_id": case, "image": _rel(out_image, out_dir), "label": "",
               "source_image": _rel(image, extracted_dir)}
        if label is not None:
            _inside(label, task, "label")
            if not label.is_file():
                raise ConversionError(f"{entry.name}: label {label} listed in dataset.json is missing")
            ref = nib.load(image)
            lbl = nib.load(label)
            if tuple(lbl.shape[:3]) != tuple(ref.shape[:3]) or (len(lbl.shape) > 3 and lbl.shape[3] != 1):
                raise ConversionError(f"{label}: shape {lbl.shape} differs from image shape {ref.shape}")
            mapped = _map_labels(np.asanyarray(lbl.dataobj).reshape(ref.shape[:3]), entry.label_map, label)
            out_label = out_dir / "labels" / f"{case}.nii.gz"
            _save_label(mapped, ref, out_label)
            row["label"] = _rel(out_label, out_dir)
        rows.append(row)
        logger.debug("%s: converted %s", entry.name, case)
    return _finish(
        entry, out_dir, rows, step="convert_msd",
        extra={"task": task.name, "label_map": {str(k): v for k, v in entry.label_map.items()}},
    )


@functools.lru_cache(maxsize=1)
def totalseg_mapping() -> tuple[dict[str, int], tuple[str, ...]]:
    """TotalSegmentator class -> MAISI id (0 for dropped classes) and the overlap priority.

    Read from ``maisi/data/totalseg_to_maisi.json``; classes later in the priority win where
    masks overlap.
    """
    text = resources.files("maisi").joinpath("data/totalseg_to_maisi.json").read_text(encoding="utf-8")
    data = json.loads(text)
    mapping = {name: (label_id(target) if target is not None else 0) for name, target in data["mapping"].items()}
    priority = tuple(data["priority"])
    if sorted(priority) != sorted(mapping):
        raise ConversionError("totalseg_to_maisi.json: 'priority' must list every class of 'mapping' once")
    return mapping, priority


def _find_totalseg_cases(extracted_dir: Path) -> list[Path]:
    cases = [
        p.parent
        for pattern in ("*/ct.nii.gz", "*/*/ct.nii.gz")
        for p in extracted_dir.glob(pattern)
        if not p.parent.name.startswith("._") and (p.parent / "segmentations").is_dir()
    ]
    return sorted(set(cases), key=lambda p: p.name)


def convert_totalsegmentator(
    entry: DatasetEntry, extracted_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> pd.DataFrame:
    """Convert the TotalSegmentator dataset (``<case>/ct.nii.gz`` + ``<case>/segmentations/*.nii.gz``).

    The binary masks of each case are combined into one MAISI label map through
    ``maisi/data/totalseg_to_maisi.json``, in its priority order (later classes win overlaps).
    Voxels of dropped classes stay 0; mask files of classes missing from the table are skipped
    and listed in the sidecar.
    """
    extracted_dir, out_dir = Path(extracted_dir), Path(out_dir)
    root = extracted_dir / entry.subdir if entry.subdir else extracted_dir
    mapping, priority = totalseg_mapping()
    cases = _find_totalseg_cases(root)
    if not cases:
        raise ConversionError(f"{entry.name}: no <case>/ct.nii.gz with segmentations/ found in {root}")
    rank = {name: i for i, name in enumerate(priority)}
    unknown: set[str] = set()
    rows: list[dict[str, str]] = []
    for case_dir in cases:
        case = case_dir.name
        ct = case_dir / "ct.nii.gz"
        ref = nib.load(ct)
        shape = tuple(ref.shape[:3])
        masks = {_nii_stem(p): p for p in (case_dir / "segmentations").glob("*.nii*") if not p.name.startswith("._")}
        unknown.update(n for n in masks if n not in mapping)
        label = np.zeros(shape, dtype=np.uint8)
        for name in sorted((n for n in masks if n in mapping and mapping[n]), key=rank.__getitem__):
            img = nib.load(masks[name])
            if tuple(img.shape[:3]) != shape:
                raise ConversionError(f"{masks[name]}: shape {img.shape} differs from {ct} {ref.shape}")
            label[np.asanyarray(img.dataobj).reshape(shape) > 0] = mapping[name]
        out_image = out_dir / "images" / f"{case}.nii.gz"
        _link_or_copy(ct, out_image)
        out_label = out_dir / "labels" / f"{case}.nii.gz"
        _save_label(label, ref, out_label)
        rows.append({"case_id": case, "image": _rel(out_image, out_dir), "label": _rel(out_label, out_dir),
                     "source_image": _rel(ct, extracted_dir)})
    if unknown:
        logger.warning("%s: mask classes not in totalseg_to_maisi.json were skipped: %s", entry.name, sorted(unknown))
    return _finish(
        entry, out_dir, rows, step="convert_totalsegmentator",
        extra={"mapping_table": "maisi/data/totalseg_to_maisi.json", "unknown_classes": sorted(unknown)},
    )


#: Converter name (the catalog's ``converter`` key) -> function ``(entry, extracted_dir, out_dir)``.
CONVERTERS: dict[str, Converter] = {
    "msd": convert_msd,
    "totalsegmentator": convert_totalsegmentator,
}


#: Converters that need a non-empty ``label_map`` in the catalog entry.
NEEDS_LABEL_MAP: frozenset[str] = frozenset({"msd"})


def register_converter(name: str, func: Converter, *, overwrite: bool = False) -> None:
    """Add a converter to :data:`CONVERTERS`."""
    if name in CONVERTERS and not overwrite:
        raise ValueError(f"converter {name!r} is already registered")
    CONVERTERS[name] = func


def convert_dataset(
    entry: DatasetEntry, extracted_dir: str | os.PathLike, out_dir: str | os.PathLike
) -> pd.DataFrame:
    """Convert an extracted dataset with the converter its catalog entry names."""
    try:
        converter = CONVERTERS[entry.converter]
    except KeyError:
        raise ConversionError(f"{entry.name}: unknown converter {entry.converter!r}") from None
    extracted_dir = Path(extracted_dir)
    if not extracted_dir.is_dir():
        raise ConversionError(f"{entry.name}: extracted folder {extracted_dir} does not exist")
    return converter(entry, extracted_dir, Path(out_dir))
