"""The ``cache_latents`` stage: every prepared image encoded once with the trained autoencoder.

MAISI's reference code stores one random sample ``mu + sigma * eps`` per image, which freezes the
noise for the whole of diffusion training. This stage stores the posterior's mean and standard
deviation instead, so training can draw fresh noise every epoch (``z = mu + sigma * randn_like(mu)``).

One ``.npz`` per case (``<out_root>/<source>/<case_id>.npz``, :func:`latent_path`) holds

* ``mu``, ``sigma``: float32, channel-first ``(C=4, x, y, z)`` with ``(x, y, z)`` = the image's
  ``(X, Y, Z)`` divided by 4 (the autoencoder downsamples each axis by 4). The spatial axes are the
  prepared image's array axes, which are oriented RAS (array axes 0, 1, 2 increase towards the
  patient's right, anterior and superior, nibabel's ``aff2axcodes == ("R", "A", "S")``); latent
  voxel ``(a, b, c)`` summarises image voxels ``4a..4a+3``, ``4b..4b+3``, ``4c..4c+3``.
  ``sigma > 0`` (``exp(log_var / 2)`` of the encoder's clamped log variance).
* ``affine``: the prepared image's 4x4 voxel-to-world (RAS, mm) matrix.
* ``latent_affine``: the same for the latent grid: the 3x3 part scaled by 4 and the origin moved to
  the centre of the first 4x4x4 image block (``affine @ [[4, 0, 0, 1.5], [0, 4, 0, 1.5], [0, 0, 4, 1.5], [0, 0, 0, 1]]``),
  so that a latent channel saved with it overlays the image in any viewer.
* ``dim`` (int64, the image's ``(X, Y, Z)``), ``spacing`` (float64, the image's voxel size in mm, the
  diffusion model's spacing input), ``top_region_index`` / ``bottom_region_index`` (int64 one-hot,
  order head-neck, chest, abdomen, lower body).

A JSON sidecar (``<case_id>.npz.json``) records the same metadata, the checksums of the image and
the autoencoder checkpoint, the settings and the provenance; a case whose fingerprint has not
changed is not encoded again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from maisi.core.anatomy import RegionError, one_hot
from maisi.core.checks import InputError, spacing_from_affine
from maisi.core.holdout import case_key
from maisi.core.io import current_sidecar, sha256_file, write_with_sidecar
from maisi.core.shards import run_cases
from maisi.core.tables import read_table
from maisi.models.checkpoints import load_autoencoder
from maisi.models.networks import float32_norms, select_device
from maisi.models.tsp import TSPEncoder
from maisi.models.variants import DOWNSAMPLE, LATENT_CHANNELS
from maisi.train.settings import LatentSettings

__all__ = [
    "LATENT_COLUMNS",
    "LATENT_LAYOUT",
    "encode_volume",
    "tsp_encoder",
    "latent_affine",
    "latent_path",
    "latent_paths",
    "cache_case",
    "cache_shard",
    "read_latent",
    "LATENT_KEYS",
]

log = logging.getLogger(__name__)


#: Columns of a shard's latent table.
LATENT_COLUMNS: tuple[str, ...] = (
    "case_id", "source", "status", "reason", "latent", "latent_shape", "top_region", "bottom_region", "spacing", "dim",
    "scale_hint",
)  # fmt: skip


#: What the arrays of a latent file are (also written into every sidecar).
LATENT_LAYOUT: dict[str, str] = {
    "mu": f"float32 (C={LATENT_CHANNELS}, x, y, z): posterior mean, x, y, z = image axes / {DOWNSAMPLE}, RAS",
    "sigma": f"float32 (C={LATENT_CHANNELS}, x, y, z): posterior standard deviation (> 0); sample mu + sigma * N(0, 1)",
    "affine": "float64 4x4: the prepared image's voxel-to-world matrix (RAS, mm)",
    "latent_affine": f"float64 4x4: latent voxel-to-world; 3x3 part x {DOWNSAMPLE}, origin at the centre of the first "
    f"{DOWNSAMPLE}^3 image block",
    "dim": "int64 (3,): the image's size (X, Y, Z) in voxels",
    "spacing": "float64 (3,): the image's voxel size in mm",
    "top_region_index": "int64 (4,): one-hot head_neck, chest, abdomen, lower_body",
    "bottom_region_index": "int64 (4,): one-hot head_neck, chest, abdomen, lower_body",
}


_STEP = "cache_latents"


def tsp_encoder(
    autoencoder: torch.nn.Module, settings: LatentSettings, device: torch.device | str, shape: Sequence[int]
) -> TSPEncoder:
    """The slab-streamed encoder of ``autoencoder`` as ``settings`` say, for images of ``shape`` on ``device``.

    ``storage: auto`` keeps the maps on a GPU unless the ones the memory bound allows would fill more
    than half of its memory (then in host memory); on the CPU they are always in host memory.
    """
    device = torch.device(device)
    storage = torch.device("cpu") if settings.storage == "cpu" else device
    if settings.storage == "auto" and device.type == "cuda":
        first = max(m.out_channels for m in autoencoder.encoder.blocks[0].modules() if isinstance(m, torch.nn.Conv3d))
        itemsize = getattr(torch, settings.storage_dtype).itemsize
        need = first * math.prod(int(n) for n in shape) * itemsize * (settings.max_stored_maps or 2.0)
        if need > torch.cuda.get_device_properties(device).total_memory / 2:
            storage = torch.device("cpu")
    return TSPEncoder(
        autoencoder, [device], slab=settings.slab, storage=storage, storage_dtype=getattr(torch, settings.storage_dtype),
        max_stored_maps=settings.max_stored_maps,
    )  # fmt: skip


def encode_volume(
    autoencoder: torch.nn.Module, image: np.ndarray | torch.Tensor, settings: LatentSettings, device: torch.device | str
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)``, each float32 ``(4, X/4, Y/4, Z/4)``, of an ``(X, Y, Z)`` image in [0, 1].

    Whole volumes are encoded by :class:`~maisi.models.tsp.TSPEncoder` (``settings.encoder == "tsp"``:
    MONAI's values with memory near one full-size feature map) or MONAI's ``encode``. With
    ``settings.roi_size`` the volume is encoded window by window with MONAI's
    :func:`~monai.inferers.sliding_window_inference` (windows blended as ``settings.mode`` says),
    so memory stays bounded by the window. The model must already be on ``device``; MONAI's
    encode runs under float16 autocast on CUDA, the streamed encoder in float32.
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if x.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) image, got shape {tuple(x.shape)}")
    if any(int(n) % DOWNSAMPLE for n in x.shape):
        raise ValueError(f"image size {tuple(x.shape)} is not a multiple of {DOWNSAMPLE} along every axis")
    if settings.roi_size is None and settings.encoder == "tsp":
        engine = tsp_encoder(autoencoder, settings, device, x.shape)
        mu, sigma = engine.encode(x.to(dtype=torch.float32)[None, None])
        return np.ascontiguousarray(mu[0].cpu().numpy()), np.ascontiguousarray(sigma[0].cpu().numpy())
    x = x.to(device=device, dtype=torch.float32)[None, None]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        mu, sigma = autoencoder.encode(window)
        return torch.cat([mu, sigma], 1).float()

    on_cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if on_cuda else contextlib.nullcontext()
    norms = contextlib.nullcontext() if on_cuda else float32_norms(autoencoder)
    with torch.no_grad(), autocast, norms:
        if settings.roi_size is None:
            out = predictor(x)
        else:
            roi = [min(int(r), int(n)) for r, n in zip(settings.roi_size, x.shape[2:], strict=True)]
            out = sliding_window_inference(
                x, roi, 1, predictor, overlap=settings.overlap, mode=settings.mode, sw_device=device, device=device,
            )  # fmt: skip
    out = torch.as_tensor(out)[0].float().cpu().numpy()
    return np.ascontiguousarray(out[:LATENT_CHANNELS]), np.ascontiguousarray(out[LATENT_CHANNELS:])


def latent_affine(affine: np.ndarray) -> np.ndarray:
    """Voxel-to-world matrix of the latent grid of an image with ``affine``."""
    half = (DOWNSAMPLE - 1) / 2.0
    scale = np.array([[DOWNSAMPLE, 0, 0, half], [0, DOWNSAMPLE, 0, half], [0, 0, DOWNSAMPLE, half], [0, 0, 0, 1]], float)
    return np.asarray(affine, dtype=np.float64) @ scale


def latent_path(out_root: str | os.PathLike, source: str, case_id: str) -> Path:
    """``<out_root>/<source>/<case_id>.npz``."""
    return Path(out_root) / source / f"{case_id}.npz"


#: Alias of :func:`latent_path`.
latent_paths = latent_path


def _json_value(value: Any) -> Any:
    """A table cell that holds JSON (``"[128, 128, 128]"``) as a Python value; other values unchanged."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        return json.loads(value)
    return value


def _region_index(value: Any, what: str, path) -> list[int]:
    value = _json_value(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        index = [int(v) for v in value]
        if len(index) != 4 or sorted(index) != [0, 0, 0, 1]:
            raise InputError(path, f"{what} {index} is not a one-hot vector of 4 body regions")
        return index
    try:
        return one_hot(str(value))
    except RegionError as exc:
        raise InputError(path, f"{what}: {exc}") from None


def _load_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise InputError(path, "prepared image not found")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure means a bad file
        raise InputError(path, f"cannot be read ({type(exc).__name__}: {exc}); the file is corrupt or truncated") from exc
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D prepared image, got shape {data.shape}")
    if any(n % DOWNSAMPLE for n in data.shape):
        raise InputError(path, f"image size {data.shape} is not a multiple of {DOWNSAMPLE}; was it prepared by the factory?")
    if not np.isfinite(data).all():
        raise InputError(path, f"{int((~np.isfinite(data)).sum())} voxel(s) are NaN or infinite")
    lo, hi = float(data.min()), float(data.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        log.warning("%s: intensities %.3g..%.3g outside [0, 1]; the autoencoder expects prepared (scaled) images", path, lo, hi)
    return data, np.asarray(img.affine, dtype=np.float64)


def _row(dest: Path, shape: Sequence[int], scale_hint: float) -> dict[str, Any]:
    return {"latent": str(dest), "latent_shape": json.dumps([int(n) for n in shape]), "scale_hint": float(scale_hint)}


def cache_case(
    case: Mapping[str, Any],
    autoencoder: torch.nn.Module,
    ae_sha256: str,
    dest: str | os.PathLike,
    settings: LatentSettings,
    device: torch.device | str,
) -> dict[str, Any]:
    """Encode one prepared case into ``dest`` (see the module docstring for the layout).

    ``case`` is one row of the prepared table joined with the regions table (``case_id``,
    ``source``, ``image``, ``dim``, ``spacing``, ``top_region``, ``bottom_region``). Nothing is
    recomputed when ``dest`` and its sidecar exist and the sidecar's fingerprint (image and
    autoencoder checksums, regions, settings except the device) matches. Returns the table row
    (``latent``, ``latent_shape``, ``scale_hint`` = standard deviation of ``mu``).
    """
    dest = Path(dest)
    image_path = Path(str(case["image"]))
    if not image_path.is_file():
        raise InputError(image_path, "prepared image not found")
    top = _region_index(case.get("top_region"), "top_region", image_path)
    bottom = _region_index(case.get("bottom_region"), "bottom_region", image_path)
    fingerprint = {
        "image_sha256": sha256_file(image_path),
        "autoencoder_sha256": ae_sha256,
        "regions": [top, bottom],
        "settings": settings.fingerprint(),
    }
    old = current_sidecar(dest, fingerprint)
    if old is not None:
        log.info("%s: latent %s is up to date", case["case_id"], dest)
        return _row(dest, old["latent_shape"], old["scale_hint"])

    image, affine = _load_image(image_path)
    table_dim = _json_value(case.get("dim", ""))
    if table_dim not in ("", None) and [int(n) for n in table_dim] != list(image.shape):
        raise InputError(image_path, f"image size {list(image.shape)} differs from the prepared table's dim {table_dim}")
    table_spacing = _json_value(case.get("spacing", ""))
    spacing = np.asarray(table_spacing, dtype=np.float64) if table_spacing not in ("", None) else spacing_from_affine(affine)
    mu, sigma = encode_volume(autoencoder, image, settings, device)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise RuntimeError(f"{image_path}: the autoencoder produced non-finite latents (diverged checkpoint?)")
    arrays = {
        "mu": mu.astype(np.float32, copy=False),
        "sigma": sigma.astype(np.float32, copy=False),
        "affine": affine,
        "latent_affine": latent_affine(affine),
        "dim": np.asarray(image.shape, dtype=np.int64),
        "spacing": spacing,
        "top_region_index": np.asarray(top, dtype=np.int64),
        "bottom_region_index": np.asarray(bottom, dtype=np.int64),
    }
    scale_hint = float(mu.std())

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    meta = {
        "case_id": str(case["case_id"]),
        "source": str(case.get("source", "")),
        "dim": list(image.shape),
        "spacing": spacing.tolist(),
        "regions": {
            "top_region": str(case.get("top_region", "")),
            "bottom_region": str(case.get("bottom_region", "")),
            "top_region_index": top,
            "bottom_region_index": bottom,
        },
        "image": {"path": str(image_path), "sha256": fingerprint["image_sha256"]},
        "autoencoder": {"sha256": ae_sha256, "variant": settings.variant},
        "settings": settings.to_dict(),
        "device": str(torch.device(device)),
        "fingerprint": fingerprint,
        "latent_shape": list(mu.shape),
        "scale_hint": scale_hint,
        "sigma_mean": float(sigma.mean()),
        "layout": LATENT_LAYOUT,
    }
    write_with_sidecar(dest, writer, meta, _STEP)
    log.info("%s: encoded %s -> %s %s", case["case_id"], image_path, dest, list(mu.shape))
    return _row(dest, mu.shape, scale_hint)


def _table(table: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    return table if isinstance(table, pd.DataFrame) else read_table(table)


def cache_shard(
    prepared_table: str | os.PathLike | pd.DataFrame,
    regions_table: str | os.PathLike | pd.DataFrame,
    checkpoint: str | os.PathLike,
    settings: LatentSettings,
    out_root: str | os.PathLike,
    on_error: str = "stop",
    desc: str = "",
    held_out: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Encode every case that is ``ok`` in both the prepared and the regions table of a shard, except the
    ``held_out`` ones (:func:`maisi.core.holdout.case_key` values: no generative stage sees them).

    The autoencoder is loaded once (``settings.variant``, eval mode, on ``settings.device``);
    cases run one after the other (the model uses all cores). A case whose image cannot be read
    is an :class:`~maisi.core.checks.InputError` naming the file: a ``rejected`` row with
    ``on_error="skip"``, a :class:`~maisi.core.shards.CaseFailure` with ``"stop"``. Returns the rows
    of :data:`LATENT_COLUMNS`.
    """
    prepared, regions = _table(prepared_table), _table(regions_table)
    by_source = "source" in prepared.columns and "source" in regions.columns

    def join_key(row: Mapping[str, Any]) -> tuple[str, str]:
        return (str(row["source"]) if by_source else "", str(row["case_id"]))

    ok_regions = {join_key(r): r for r in regions.to_dict("records") if str(r.get("status", "ok")) == "ok"}
    cases: list[dict[str, Any]] = []
    for row in prepared.to_dict("records"):
        if str(row.get("status", "ok")) != "ok":
            continue
        if case_key(*join_key(row)) in held_out:
            log.info("case %s: held out (dataset.held_out); not encoded", row["case_id"])
            continue
        reg = ok_regions.get(join_key(row))
        if reg is None:
            log.info("case %s: not ok in the regions table (no body regions); not encoded", row["case_id"])
            continue
        cases.append({**row, "top_region": reg["top_region"], "bottom_region": reg["bottom_region"]})
    if not cases:
        return []

    device = select_device(settings.device)
    autoencoder = load_autoencoder(checkpoint, settings.variant).to(device).eval()
    ae_sha256 = sha256_file(checkpoint)

    def one(case: Mapping[str, Any]) -> dict[str, Any]:
        dest = latent_path(out_root, str(case["source"]), str(case["case_id"]))
        return cache_case(case, autoencoder, ae_sha256, dest, settings, device)

    rows = run_cases(one, cases, lambda c: str(c["case_id"]), threads=1, on_error=on_error, desc=desc or "cache_latents")
    out = []
    for case, row in zip(cases, rows, strict=True):
        full = {key: case.get(key, "") for key in ("source", "top_region", "bottom_region", "spacing", "dim")}
        full.update(row)
        out.append({key: full.get(key, "") for key in LATENT_COLUMNS})
    return out


#: Arrays every latent file holds.
LATENT_KEYS = ("mu", "sigma", "affine", "dim", "spacing", "top_region_index", "bottom_region_index")


def read_latent(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a latent file (see the module docstring), loaded without pickle; a missing,
    unreadable or incomplete file is a ``ValueError`` that names it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: latent file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: np.asarray(npz[k]) for k in npz.files}
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad latent file
        raise ValueError(f"{path}: not a readable latent .npz ({type(exc).__name__}: {exc})") from None
    missing = [k for k in LATENT_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: latent file lacks {', '.join(missing)}")
    mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 4 or mu.shape != sigma.shape:
        raise ValueError(f"{path}: expected mu and sigma of one shape (C, x, y, z), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: latent holds non-finite values")
    for key, n in (("spacing", 3), ("top_region_index", 4), ("bottom_region_index", 4)):
        if data[key].size != n:
            raise ValueError(f"{path}: '{key}' has {data[key].size} values, expected {n}")
    data["mu"] = mu.astype(np.float32, copy=False)
    data["sigma"] = sigma.astype(np.float32, copy=False)
    return data
