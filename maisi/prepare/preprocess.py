"""MAISI's preparation of diffusion-training data, one case at a time.

The chain follows MAISI's reference code: load, channel first, orient to RAS, clip HU to the
window and scale to [0, 1], and resize each axis to ``max(round(n / 128), 1) * 128`` voxels with
trilinear interpolation (label maps with nearest neighbour). The image is resized, not resampled
to a fixed spacing, so the new spacing is ``old_spacing * old_dim / new_dim``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from maisi.core.checks import (
    InputError,
    check_ct_image,
    check_label_matches,
    check_nifti_spacing,
    check_spacing,
    spacing_from_affine,
)
from maisi.core.io import read_json, save_nifti, sha256_file, write_json
from maisi.core.labels import maisi_labels
from maisi.core.provenance import provenance
from maisi.core.schema import schema_default
from maisi.core.settings import ConfigSettings
from maisi.sources.cases import CaseInput

if TYPE_CHECKING:
    import torch
    from monai.data import MetaTensor

__all__ = ["new_dim", "target_shape", "PreprocessSettings", "load_scan", "map_labels", "preprocess_case", "case_outputs"]

log = logging.getLogger(__name__)


def new_dim(n: int, divisor: int = 128) -> int:
    """MAISI's target size of an axis of ``n`` voxels (Python's round: halves go to even)."""
    return int(max(round(n / divisor), 1.0) * divisor)


def target_shape(shape: Sequence[int], divisor: int = 128) -> tuple[int, ...]:
    return tuple(new_dim(int(n), divisor) for n in shape)


@dataclass(frozen=True)
class PreprocessSettings(ConfigSettings):
    """How MAISI prepares a case (the ``preprocess`` config block)."""

    SECTION: ClassVar[str] = "preprocess"

    divisor: int = schema_default("preprocess.divisor")
    hu_range: tuple[float, float] = schema_default("preprocess.hu_range")
    keep_hu: bool = schema_default("preprocess.keep_hu")
    ct_check: Mapping[str, float] = field(
        default_factory=lambda: {k: float(schema_default(f"preprocess.ct_check.{k}")) for k in ("min_below", "max_value", "min_value")}
    )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PreprocessSettings:
        """From ``config["preprocess"]``."""
        block = config["preprocess"]
        return cls(
            divisor=int(block["divisor"]), hu_range=(float(block["hu_range"][0]), float(block["hu_range"][1])),
            keep_hu=bool(block["keep_hu"]), ct_check={k: float(v) for k, v in block["ct_check"].items()},
        )  # fmt: skip

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _reader_for(path: Path):
    from monai.data import NibabelReader, PydicomReader

    name = path.name.lower()
    if path.is_dir():
        return PydicomReader()
    if name.endswith((".nii", ".nii.gz")):
        return NibabelReader()
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_reader_class()()
    raise InputError(path, "unsupported file type; expected NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or a DICOM folder")


def load_scan(path: str | Path) -> MetaTensor:
    """Load an image or label map channel-first with MONAI's readers (affine in RAS world mm)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    from monai.transforms import LoadImage

    reader = _reader_for(path)
    check_nifti_spacing(path)
    check_nrrd_spacing(path)
    if path.is_dir():
        check_dicom_slices(path)
    try:
        return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    except InputError:
        raise
    except Exception as exc:  # readers raise many types for corrupt or truncated files
        broken = _broken_dicom_slice(path) if path.is_dir() else None
        if broken is not None:
            raise broken from exc
        raise InputError(path, f"cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc


@functools.cache
def _nrrd_reader_class() -> type:
    """MONAI's NRRD reader, which also reads the legal headers it fails on (see :func:`_complete_nrrd_header`)."""
    from monai.data import NrrdReader
    from monai.utils import ensure_tuple

    class Reader(NrrdReader):
        def read(self, data, **kwargs):
            images = super().read(data, **kwargs)
            for name, image in zip(ensure_tuple(data), ensure_tuple(images), strict=True):
                image.header = _complete_nrrd_header(image.header, Path(name))
            return images

    return Reader


def _complete_nrrd_header(header: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Fill in the geometry a legal NRRD header may leave out, as ITK (and 3D Slicer) read it.

    'spacings' without 'space directions' gives the spacing but no orientation: the axes are taken as identity
    directions in the header's 'space' (LPS when it has none), with a warning that the orientation is assumed.
    Without 'space origin' the origin is 0.
    """
    header = dict(header)
    if "space directions" not in header and "spacings" in header:
        space = header.setdefault("space", "left-posterior-superior")
        header["space directions"] = np.diag(np.asarray(header["spacings"], dtype=np.float64))
        log.warning(
            "%s: the NRRD header gives 'spacings' and no 'space directions': the orientation is assumed "
            "(identity directions in %s, origin 0, as ITK reads it)", path, space,
        )  # fmt: skip
    if "space directions" in header and "space origin" not in header:
        header["space origin"] = np.zeros(np.asarray(header["space directions"]).shape[1])
    return header


def check_nrrd_spacing(path: Path) -> None:
    """An NRRD header must say where its voxels are: 'space directions' (or 'spacings'), non-zero and finite."""
    if not path.name.lower().endswith((".nrrd", ".nhdr")):
        return
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:
        raise InputError(path, f"cannot be read ({type(exc).__name__}: {exc}); the NRRD header is corrupt or truncated") from exc
    if "space directions" in header:
        rows = [d for d in header["space directions"] if d is not None and not np.all(np.isnan(np.asarray(d, float)))]
        if len(rows) < 3:
            raise InputError(path, f"the NRRD header's 'space directions' give {len(rows)} spatial axes, not 3")
        check_spacing(np.sqrt((np.asarray(rows, float) ** 2).sum(axis=1)), path, "the NRRD header's 'space directions'")
    elif "spacings" in header:
        spacings = np.asarray(header["spacings"], float)
        if spacings.shape != (3,):
            raise InputError(path, f"the NRRD header's 'spacings' give {spacings.size} axes, not 3 (and there are no 'space directions')")
        check_spacing(spacings, path, "the NRRD header's 'spacings'")
    else:
        raise InputError(path, "the NRRD header has no 'space directions' (nor 'spacings'): the voxel spacing is missing")


def check_dicom_slices(folder: Path) -> None:
    """Every file of a DICOM series must be a readable slice with a position; the first that is not is named.

    MONAI's DICOM reader skips a slice it cannot place (with a warning), which would leave a gap in the volume.
    """
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise InputError(folder, "the DICOM folder holds no file")
    for file in files:
        try:
            ds = pydicom.dcmread(str(file), stop_before_pixels=True)
        except Exception as exc:
            raise InputError(file, f"slice of the DICOM series {folder} cannot be read ({type(exc).__name__}: {exc})") from exc
        missing = [tag for tag in ("InstanceNumber", "ImagePositionPatient", "PixelSpacing") if tag not in ds]
        if missing:
            raise InputError(file, f"{_slice(ds)} of the DICOM series {folder} lacks {', '.join(missing)} (truncated or not an image slice)")


def _slice(ds) -> str:
    """'slice (InstanceNumber 4)', or 'slice' where the header has no instance number (0020,0013)."""
    number = ds.get("InstanceNumber")
    return f"slice (InstanceNumber {number})" if number is not None and str(number) != "" else "slice"


def _broken_dicom_slice(folder: Path) -> InputError | None:
    """The first slice of a DICOM series whose pixel data cannot be read, as an error naming the file and its
    InstanceNumber (MONAI's reader names only the folder); ``None`` when every slice reads on its own."""
    import pydicom

    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(str(file))
        except Exception as exc:
            return InputError(file, f"slice of the DICOM series {folder} cannot be read ({type(exc).__name__}: {exc})")
        try:
            ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:
            return InputError(
                file, f"{_slice(ds)} of the DICOM series {folder}: its pixel data cannot be read "
                f"({type(exc).__name__}: {exc}); the file is truncated or corrupt",
            )  # fmt: skip
    return None


def map_labels(label: np.ndarray, label_map: Mapping[int, int] | None, path) -> np.ndarray:
    """Map a source's label values to MAISI ids (uint8); values without a mapping are an error."""
    values = np.unique(label).astype(np.int64)
    if label_map is None:
        valid = {0, *maisi_labels().values()}
        unknown = sorted(set(values.tolist()) - valid)
        if unknown:
            raise InputError(path, f"label values {unknown} are not MAISI label ids; give the source a 'label_map'")
        return label.astype(np.uint8)
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in label_map)
    if unknown:
        raise InputError(path, f"label values {unknown} have no entry in the source's label_map")
    # Source values may exceed 255 (other segmenters' outputs): map the values present, not a 256-entry table.
    present, inverse = np.unique(label.astype(np.int64), return_inverse=True)
    mapped = np.array([label_map.get(int(v), 0) for v in present], dtype=np.uint8)
    return mapped[inverse].reshape(label.shape)


def case_outputs(out_root: str | Path, source: str, case_id: str) -> dict[str, Path]:
    """Where a prepared case lives (MSD-like folders per source)."""
    root = Path(out_root) / source
    return {
        "image": root / "images" / f"{case_id}.nii.gz",
        "image_hu": root / "images_hu" / f"{case_id}.nii.gz",
        "label": root / "labels" / f"{case_id}.nii.gz",
        "meta": root / "cases" / f"{case_id}.json",
    }


def _input_fingerprint(case: CaseInput, settings: PreprocessSettings) -> str:
    h = hashlib.sha256()
    for p in (case.image, case.label):
        if not p:
            continue
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
    h.update(json.dumps(case.to_json(), sort_keys=True).encode())
    h.update(settings.fingerprint().encode())
    return h.hexdigest()


def _save_nifti(tensor: torch.Tensor, affine, dest: Path, dtype) -> None:
    """Save a channel-first tensor's single channel (see :func:`maisi.core.io.save_nifti`)."""
    save_nifti(tensor.detach().cpu().numpy()[0], affine, dest, dtype)


def preprocess_case(case: CaseInput, out_root: str | Path, settings: PreprocessSettings) -> dict[str, Any]:
    """Prepare one case; returns its table row. Raises :class:`InputError` for bad input.

    A case whose inputs and settings are unchanged since its sidecar was written is not
    recomputed, so a rerun shard only redoes what is missing or stale.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Resize, ScaleIntensityRange

    outs = case_outputs(out_root, case.source, case.case_id)
    fingerprint = _input_fingerprint(case, settings)
    if outs["meta"].exists():
        meta = read_json(outs["meta"])
        wanted = [outs["image"]] + ([outs["image_hu"]] if settings.keep_hu else []) + ([outs["label"]] if case.label else [])
        if meta.get("fingerprint") == fingerprint and all(p.exists() for p in wanted):
            log.info("case %s unchanged, kept", case.case_id)
            return _row(meta)

    image = load_scan(case.image)
    check_ct_image(image.numpy(), image.affine.numpy(), case.image, settings.ct_check)
    orig_dim = [int(n) for n in image.shape[1:]]
    orig_spacing = spacing_from_affine(image.affine.numpy()).tolist()
    label = None
    if case.label:
        label = load_scan(case.label)
        check_label_matches(label.numpy(), label.affine.numpy(), image.numpy(), image.affine.numpy(), case.label, case.image)
        mapped = map_labels(label.numpy()[0], case.label_map, case.label)
        label = MetaTensor(torch.from_numpy(mapped[None].astype(np.float32)), meta=dict(label.meta))

    orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
    image = orient(image)
    dim = list(target_shape(image.shape[1:], settings.divisor))
    lo, hi = settings.hu_range
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
    image01 = Resize(spatial_size=dim, mode="trilinear")(scaled)
    affine = image01.affine.numpy()
    _save_nifti(image01, affine, outs["image"], np.float32)
    if settings.keep_hu:
        hu = Resize(spatial_size=dim, mode="trilinear")(image)
        _save_nifti(torch.round(hu), affine, outs["image_hu"], np.int16)
    labels_present: list[int] = []
    if label is not None:
        label = Resize(spatial_size=dim, mode="nearest")(orient(label))
        _save_nifti(label, affine, outs["label"], np.uint8)
        labels_present = sorted(int(v) for v in np.unique(label.numpy()) if v != 0)

    meta = {
        "source": case.source,
        "case_id": case.case_id,
        "input": case.to_json(),
        "fingerprint": fingerprint,
        "orig_dim": orig_dim,
        "orig_spacing": [round(s, 6) for s in orig_spacing],
        "dim": dim,
        "spacing": [round(float(s), 6) for s in spacing_from_affine(affine)],
        "affine": np.round(affine, 6).tolist(),
        "hu_range": list(settings.hu_range),
        "labels_present": labels_present,
        "outputs": {
            key: {"path": str(outs[key]), "sha256": sha256_file(outs[key])}
            for key in ("image", "image_hu", "label")
            if outs[key].exists() and (key != "label" or label is not None) and (key != "image_hu" or settings.keep_hu)
        },
        "provenance": provenance("preprocess"),
    }
    write_json(outs["meta"], meta)
    return _row(meta)


def _row(meta: Mapping[str, Any]) -> dict[str, Any]:
    outputs = meta["outputs"]
    return {
        "source": meta["source"],
        "image": outputs["image"]["path"],
        "image_hu": outputs.get("image_hu", {}).get("path", ""),
        "label": outputs.get("label", {}).get("path", ""),
        "meta": str(Path(outputs["image"]["path"]).parent.parent / "cases" / f"{meta['case_id']}.json"),
        "dim": json.dumps(meta["dim"]),
        "spacing": json.dumps(meta["spacing"]),
        "orig_dim": json.dumps(meta["orig_dim"]),
        "orig_spacing": json.dumps(meta["orig_spacing"]),
        "labels_present": json.dumps(meta["labels_present"]),
    }


PREPARED_COLUMNS = (
    "case_id", "source", "status", "reason", "image", "image_hu", "label", "meta",
    "dim", "spacing", "orig_dim", "orig_spacing", "labels_present",
)  # fmt: skip
