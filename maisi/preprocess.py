"""MAISI's preparation of diffusion-training data, one case at a time.

The chain follows MAISI's reference code: load, channel first, orient to RAS, clip HU to the
window and scale to [0, 1], and resize each axis to ``max(round(n / 128), 1) * 128`` voxels with
trilinear interpolation (label maps with nearest neighbour). The image is resized, not resampled
to a fixed spacing, so the new spacing is ``old_spacing * old_dim / new_dim``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from maisi.checks import InputError, check_ct_image, check_label_matches, check_nifti_spacing, spacing_from_affine
from maisi.io import read_json, save_nifti, sha256_file, write_json
from maisi.labels import maisi_labels
from maisi.provenance import provenance

if TYPE_CHECKING:
    import torch
    from monai.data import MetaTensor

# torch and MONAI are imported where they are used: Snakemake imports this module (CaseInput,
# PreprocessSettings) while planning the DAG, and importing them takes seconds.

__all__ = [
    "new_dim",
    "target_shape",
    "CaseInput",
    "PreprocessSettings",
    "load_scan",
    "map_labels",
    "preprocess_case",
    "case_outputs",
]

log = logging.getLogger(__name__)


def new_dim(n: int, divisor: int = 128) -> int:
    """MAISI's target size of an axis of ``n`` voxels (Python's round: halves go to even)."""
    return int(max(round(n / divisor), 1.0) * divisor)


def target_shape(shape: Sequence[int], divisor: int = 128) -> tuple[int, ...]:
    return tuple(new_dim(int(n), divisor) for n in shape)


@dataclass(frozen=True)
class CaseInput:
    """One case of a source: an image, an optional label map and how its labels map to MAISI ids."""

    source: str
    case_id: str
    image: str
    label: str | None = None
    label_map: Mapping[int, int] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if self.label_map is not None:
            d["label_map"] = {str(k): int(v) for k, v in sorted(self.label_map.items())}
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> CaseInput:
        lm = d.get("label_map")
        return cls(
            source=d["source"],
            case_id=d["case_id"],
            image=d["image"],
            label=d.get("label") or None,
            label_map={int(k): int(v) for k, v in lm.items()} if lm is not None else None,
        )


@dataclass(frozen=True)
class PreprocessSettings:
    divisor: int = 128
    hu_range: tuple[float, float] = (-1000.0, 1000.0)
    keep_hu: bool = True
    ct_check: Mapping[str, float] = field(
        default_factory=lambda: {"min_below": -500.0, "max_value": 32767.0, "min_value": -32768.0}
    )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PreprocessSettings:
        return cls(
            divisor=int(cfg["divisor"]),
            hu_range=(float(cfg["hu_range"][0]), float(cfg["hu_range"][1])),
            keep_hu=bool(cfg["keep_hu"]),
            ct_check={k: float(v) for k, v in cfg["ct_check"].items()},
        )

    def to_json(self) -> str:
        """Stable JSON text (a Snakemake param: any change reruns the stage)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PreprocessSettings:
        d = json.loads(text)
        return cls(divisor=d["divisor"], hu_range=tuple(d["hu_range"]), keep_hu=d["keep_hu"], ct_check=d["ct_check"])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _reader_for(path: Path):
    from monai.data import NibabelReader, NrrdReader, PydicomReader

    name = path.name.lower()
    if path.is_dir():
        return PydicomReader()
    if name.endswith((".nii", ".nii.gz")):
        return NibabelReader()
    if name.endswith((".nrrd", ".nhdr")):
        return NrrdReader()
    raise InputError(path, "unsupported file type; expected NIfTI (.nii/.nii.gz), NRRD (.nrrd/.nhdr) or a DICOM folder")


def load_scan(path: str | Path) -> MetaTensor:
    """Load an image or label map channel-first with MONAI's readers (affine in RAS world mm)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    from monai.transforms import LoadImage

    reader = _reader_for(path)
    check_nifti_spacing(path)
    try:
        return LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    except InputError:
        raise
    except Exception as exc:  # readers raise many types for corrupt or truncated files
        raise InputError(path, f"cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc


def map_labels(label: np.ndarray, label_map: Mapping[int, int] | None, path) -> np.ndarray:
    """Map a source's label values to MAISI ids (uint8); values without a mapping are an error."""
    values = np.unique(label).astype(np.int64)
    if label_map is None:
        valid = {0, *maisi_labels().values()}
        unknown = sorted(set(values.tolist()) - valid)
        if unknown:
            raise InputError(path, f"label values {unknown} are not MAISI label ids; give the source a 'label_map'")
        return label.astype(np.uint8)
    lut = np.zeros(256, dtype=np.uint8)
    for src, dst in label_map.items():
        lut[int(src)] = int(dst)
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in label_map)
    if unknown:
        raise InputError(path, f"label values {unknown} have no entry in the source's label_map")
    return lut[label.astype(np.int64)]


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
    """Save a channel-first tensor's single channel (see :func:`maisi.io.save_nifti`)."""
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
