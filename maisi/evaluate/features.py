"""FID's preprocessing and the feature-extractor protocol, shared by :mod:`maisi.evaluate.fid` and the
networks it takes features from (:mod:`maisi.evaluate.segmenter`): volumes and label maps as MAISI's FID
script prepares them, and the central slices of each plane."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.core.checks import InputError
from maisi.evaluate.settings import FIDSettings

__all__ = ["PLANES", "load_volume", "load_label", "central_range", "central_slices", "FeatureExtractor"]


#: Plane name -> the array axis (of the RAS volume) the slices are taken along.
PLANES: dict[str, int] = {"axial": 2, "coronal": 1, "sagittal": 0}


def _load_ras(path: Path, what: str) -> Any:
    """A single-channel 3-D image file as a ``(1, X, Y, Z)`` MONAI MetaTensor in RAS; unreadable, missing or
    other-shaped files are an :class:`InputError` naming the file."""
    from monai.transforms import LoadImage, Orientation

    if not path.exists():
        raise InputError(path, "file not found")
    try:
        img = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    except Exception as exc:  # readers raise many types for corrupt or truncated files
        raise InputError(path, f"cannot be read ({type(exc).__name__}: {exc})") from exc
    if img.ndim != 4 or img.shape[0] != 1:
        raise InputError(
            path, f"expected a single-channel 3-D {what}, got shape {tuple(img.shape[1:])} with {img.shape[0]} channel(s)"
        )
    if not bool(torch.isfinite(img.as_tensor()).all()):
        raise InputError(path, "holds NaN or infinite values")
    return Orientation(axcodes="RAS")(img)


def _resample(img: Any, settings: FIDSettings, mode: str, fill: float) -> np.ndarray:
    """Resampled to ``settings.spacing`` (``mode``), padded with ``fill`` / centre-cropped to ``settings.size``."""
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    if settings.spacing is not None:
        img = Spacing(pixdim=settings.spacing, mode=mode)(img)
    if settings.size is not None:
        # ResizeWithPadOrCrop = MAISI's SpatialPad(value=-1000) then CenterSpatialCrop; extra keyword
        # arguments go to the pad function (torch.nn.functional.pad's ``value``).
        img = ResizeWithPadOrCrop(spatial_size=settings.size, mode="constant", value=fill)(img)
    return np.asarray(img.as_tensor()[0].numpy(), dtype=np.float32)


def load_volume(path: str | os.PathLike, settings: FIDSettings) -> np.ndarray:
    """A CT volume as MAISI's FID script prepares it: float32 HU ``(X, Y, Z)`` in RAS, resampled to
    ``settings.spacing`` (bilinear), padded with -1000 HU / centre-cropped to ``settings.size`` and
    clipped to ``settings.hu_range``. An unreadable file or one holding NaN is an :class:`InputError`."""
    path = Path(path)
    out = _resample(_load_ras(path, "image"), settings, "bilinear", -1000.0)
    if not np.isfinite(out).all():
        raise InputError(path, "NaN after resampling")
    return np.clip(out, settings.hu_range[0], settings.hu_range[1]).astype(np.float32, copy=False)


def load_label(path: str | os.PathLike, settings: FIDSettings) -> np.ndarray:
    """A label map on the grid :func:`load_volume` gives its image: uint8 ``(X, Y, Z)`` in RAS, resampled to
    ``settings.spacing`` (nearest), padded with 0 / centre-cropped to ``settings.size``."""
    path = Path(path)
    out = np.rint(_resample(_load_ras(path, "label map"), settings, "nearest", 0.0))
    if out.min() < 0 or out.max() > 255:
        raise InputError(path, f"label ids outside 0..255 ({out.min():.0f}..{out.max():.0f})")
    return out.astype(np.uint8)


def central_range(n: int, fraction: float) -> tuple[int, int]:
    """``(start, stop)`` of the central ``fraction`` of ``n`` slices, as MAISI's script (at least one slice)."""
    start, stop = int((1.0 - fraction) / 2.0 * n), int((1.0 + fraction) / 2.0 * n)
    if stop <= start:
        start = min(start, n - 1)
        stop = start + 1
    return start, stop


def central_slices(array: torch.Tensor, axis: int, fraction: float) -> torch.Tensor:
    """The central slices along spatial ``axis`` of a ``(..., X, Y, Z)`` tensor, slice index first:
    ``(n, ..., a, b)`` with ``(a, b)`` the two other spatial axes in order."""
    dim = array.ndim - 3 + axis
    start, stop = central_range(array.shape[dim], fraction)
    return torch.movedim(array.narrow(dim, start, stop - start), dim, 0)


class FeatureExtractor:
    """Slice features of a preprocessed HU volume per plane; ``describe()`` says what they are."""

    name: str = ""

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def plane_features(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        """``{"axial", "coronal", "sagittal"}`` -> ``(n_slices, d)`` float64 features of an ``(X, Y, Z)`` HU volume."""
        raise NotImplementedError
