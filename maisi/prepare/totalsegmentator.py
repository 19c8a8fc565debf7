"""TotalSegmentator as a label source: offline weights, segmentation and MAISI label masks.

Public CT collections rarely come with whole-body labels. MAISI derives them, and the body
regions, with TotalSegmentator's ``total`` task: ``fast`` (one 3 mm model, task 297) or
``full`` (five 1.5 mm models, tasks 291-295). This module

* checks a local weights folder before anything runs (:func:`check_weights`), because
  TotalSegmentator would otherwise try to download missing weights from GitHub;
* runs TotalSegmentator's Python API with usage statistics off and downloads disabled
  (:func:`offline_environment`, :func:`run_totalsegmentator`);
* maps its classes to MAISI ids through ``maisi/data/totalseg_to_maisi.json``, adds the
  ``body`` label (200) and the case's own labels (:func:`maisi_mask`);
* writes one mask per case atomically, with a JSON sidecar (:func:`segment_case`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from maisi.core.anatomy import body_mask
from maisi.core.checks import InputError, spacing_from_affine
from maisi.core.io import current_sidecar, save_nifti, sha256_file, write_json, write_with_sidecar
from maisi.core.labels import BODY
from maisi.core.schema import schema_default
from maisi.core.settings import ConfigSettings

__all__ = ["MODES", "WeightsError", "SegmentationError", "TotalSegSettings", "ModelInfo", "task_ids", "task_folder", "weights_url", "expected_labels", "check_weights", "offline_environment", "torch_device", "check_scan_size", "run_totalsegmentator", "totalseg_lut", "maisi_mask", "segment_case", "mask_path", "SEGMENTED_COLUMNS"]

#: Columns of a shard's TotalSegmentator table.
SEGMENTED_COLUMNS: tuple[str, ...] = ("case_id", "source", "status", "reason", "label", "ts_mode", "ts_device", "labels_present")


#: TotalSegmentator's ``total`` task: mode -> nnU-Net task ids.
MODES: dict[str, tuple[int, ...]] = {"fast": (297,), "full": (291, 292, 293, 294, 295)}


_DOWNLOAD_TASK = {"fast": "total_fast", "full": "total"}


_RELEASES = "https://github.com/wasserth/TotalSegmentator/releases/download"


#: Folders earlier TotalSegmentator releases used for the same models. TotalSegmentator deletes
#: them on start and nnU-Net cannot tell them apart from the current ones.
_STALE_FOLDERS = (
    "Dataset297_TotalSegmentator_total_3mm_1559subj_v204",
    "nnUNet/3d_fullres/Task256_TotalSegmentator_3mm_1139subj",
    "nnUNet/3d_fullres/Task251_TotalSegmentator_part1_organs_1139subj",
    "nnUNet/3d_fullres/Task252_TotalSegmentator_part2_vertebrae_1139subj",
    "nnUNet/3d_fullres/Task253_TotalSegmentator_part3_cardiac_1139subj",
    "nnUNet/3d_fullres/Task254_TotalSegmentator_part4_muscles_1139subj",
    "nnUNet/3d_fullres/Task255_TotalSegmentator_part5_ribs_1139subj",
)


class WeightsError(RuntimeError):
    """The TotalSegmentator weights folder lacks a model, or holds one of another version."""


class SegmentationError(InputError):
    """TotalSegmentator could not segment a case (the case is rejected, the run goes on with ``skip``)."""


@dataclass(frozen=True)
class TotalSegSettings(ConfigSettings):
    """How the ``totalsegmentator`` region backend runs (the ``totalsegmentator`` config block
    plus the source's ``regions.mode``)."""

    SECTION: ClassVar[str] = "totalsegmentator"

    weights: str
    home: str
    mode: str = "fast"
    device: str = schema_default("totalsegmentator.device")
    threads: int = 1
    body_threshold_hu: float | None = schema_default("totalsegmentator.body_threshold_hu")
    keep_labels: bool = schema_default("totalsegmentator.keep_labels")
    min_patch_fraction: float = schema_default("totalsegmentator.min_patch_fraction")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str) -> TotalSegSettings:
        """From ``config["totalsegmentator"]``, the source's ``regions.mode`` and ``threads.totalsegmentator``."""
        mode = str(config["sources"][source]["regions"].get("mode", cls.mode))
        return cls._from_block(config, mode, int(config["threads"]["totalsegmentator"]))

    @classmethod
    def for_qc(cls, config: Mapping[str, Any]) -> TotalSegSettings | None:
        """The settings QC segments image-only generated cases with (fast mode, in the generation job's threads,
        no case labels to keep), or None where ``totalsegmentator.weights`` is unset or ``qc.totalsegmentator`` is off."""
        if not config["totalsegmentator"]["weights"] or not config["qc"]["totalsegmentator"]:
            return None
        return cls._from_block(config, "fast", int(config["threads"]["generate"]), keep_labels=False)

    @classmethod
    def for_fidelity(cls, config: Mapping[str, Any]) -> TotalSegSettings:
        """The settings the label-fidelity check segments generated images with (``label_fidelity.segmenter:
        totalsegmentator``; fast mode, no case labels to keep)."""
        return cls._from_block(config, "fast", int(config["threads"]["generate"]), keep_labels=False)

    @classmethod
    def _from_block(cls, config: Mapping[str, Any], mode: str, threads: int, keep_labels: bool | None = None) -> TotalSegSettings:
        block = config["totalsegmentator"]
        return cls(
            weights=str(block["weights"]), home=str(block["home"]), mode=mode, device=str(block["device"]), threads=threads,
            body_threshold_hu=block["body_threshold_hu"], keep_labels=bool(block["keep_labels"] if keep_labels is None else keep_labels),
            min_patch_fraction=float(block["min_patch_fraction"]),
        )  # fmt: skip


@dataclass(frozen=True)
class ModelInfo:
    """One checked nnU-Net model folder."""

    task_id: int
    folder: str
    spacing: tuple[float, ...]  # mm, nnU-Net's (z, y, x) order
    patch_size: tuple[int, ...]  # voxels, same order
    n_classes: int


def task_ids(mode: str) -> tuple[int, ...]:
    if mode not in MODES:
        raise ValueError(f"unknown TotalSegmentator mode {mode!r}; expected one of {', '.join(MODES)}")
    return MODES[mode]


def _weights_config(task_id: int) -> Mapping[str, Any]:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    return TASK_ID_WEIGHTS_CONFIGS[task_id]


def task_folder(task_id: int) -> str:
    """``297`` -> ``Dataset297_TotalSegmentator_total_3mm_1559subj``."""
    return str(_weights_config(task_id)["foldername"])


def weights_url(task_id: int) -> str:
    info = _weights_config(task_id)
    return f"{_RELEASES}/{info['version']}/{info['foldername']}.zip"


def _trainer(task_id: int) -> str:
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    for sub in TASK_CONFIGS["total"]["sub_modes"].values():
        ids = sub["task_id"] if isinstance(sub["task_id"], list) else [sub["task_id"]]
        if task_id in ids:
            return str(sub["trainer"])
    raise ValueError(f"task {task_id} is not part of TotalSegmentator's 'total' task")


def expected_labels(task_id: int) -> dict[int, str]:
    """Class index -> name that the installed TotalSegmentator expects from a model."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts

    if task_id in MODES["fast"]:
        return dict(class_map["total"])
    parts = ("class_map_part_organs", "class_map_part_vertebrae", "class_map_part_cardiac",
             "class_map_part_muscles", "class_map_part_ribs")  # fmt: skip
    return dict(class_map_5_parts[parts[MODES["full"].index(task_id)]])


def _how_to_get(weights: Path, mode: str) -> str:
    urls = " ".join(weights_url(t) for t in task_ids(mode))
    return (
        f"Install the weights on a machine with internet access with "
        f"`TOTALSEG_WEIGHTS_PATH={weights} totalseg_download_weights -t {_DOWNLOAD_TASK[mode]}`, "
        f"or download {urls} and unzip into {weights} (see the README, 'TotalSegmentator weights')."
    )


def _model_info(weights: Path, task_id: int, mode: str) -> ModelInfo:
    folder = weights / task_folder(task_id)
    if not folder.is_dir():
        raise WeightsError(f"TotalSegmentator weights: model folder {folder} is missing. {_how_to_get(weights, mode)}")
    model = folder / f"{_trainer(task_id)}__nnUNetPlans__3d_fullres"
    for need in (model / "plans.json", model / "dataset.json", model / "fold_0" / "checkpoint_final.pth"):
        if not need.is_file():
            raise WeightsError(
                f"TotalSegmentator weights: {need} is missing (incomplete download or another release's layout). "
                f"{_how_to_get(weights, mode)}"
            )
    try:
        dataset = json.loads((model / "dataset.json").read_text(encoding="utf-8"))
        plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
        config = plans["configurations"]["3d_fullres"]
        spacing, patch = tuple(float(s) for s in config["spacing"]), tuple(int(p) for p in config["patch_size"])
        labels = {int(v): k for k, v in dataset["labels"].items() if int(v) != 0}
    except (ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"TotalSegmentator weights: {model} has an unreadable plans.json/dataset.json ({exc!r})") from None
    expected = expected_labels(task_id)
    if labels != expected:
        diff = sorted(set(expected.items()) ^ set(labels.items()))[:3]
        raise WeightsError(
            f"TotalSegmentator weights: {folder} is not the version this TotalSegmentator expects: its dataset.json "
            f"has {len(labels)} classes, TotalSegmentator expects {len(expected)} (first differences: {diff}). "
            f"Replace the folder. {_how_to_get(weights, mode)}"
        )
    return ModelInfo(task_id, str(folder), spacing, patch, len(labels))


def check_weights(weights: str | os.PathLike, mode: str = "fast") -> list[ModelInfo]:
    """Check that ``weights`` holds every model ``mode`` needs, in this TotalSegmentator's version.

    Raises :class:`WeightsError` naming the missing or wrong folder and how to obtain it.
    Cheap: reads two small JSON files per model, loads no network.
    """
    weights = Path(weights)
    if not weights.is_dir():
        raise WeightsError(f"TotalSegmentator weights folder {weights} does not exist. {_how_to_get(weights, mode)}")
    stale = [s for s in _STALE_FOLDERS if (weights / s).exists()]
    if stale:
        raise WeightsError(
            f"TotalSegmentator weights: {weights / stale[0]} is from an earlier TotalSegmentator release; "
            f"remove it (nnU-Net cannot tell it from the current model). {_how_to_get(weights, mode)}"
        )
    return [_model_info(weights, t, mode) for t in task_ids(mode)]


@contextlib.contextmanager
def offline_environment(settings: TotalSegSettings) -> Iterator[None]:
    """Point TotalSegmentator at the local weights, turn off usage statistics and downloads.

    ``TOTALSEG_WEIGHTS_PATH`` is the weights folder and ``TOTALSEG_HOME_DIR`` a folder of the
    factory's own, whose ``config.json`` says ``send_usage_stats: false``. TotalSegmentator's
    weight download is replaced by :func:`check_weights` for the duration, so a missing model
    is an immediate :class:`WeightsError`, never a network call.
    """
    import totalsegmentator.python_api as api

    home = Path(settings.home).absolute()
    config_file = home / "config.json"
    config = (
        json.loads(config_file.read_text(encoding="utf-8"))
        if config_file.is_file()
        else {"totalseg_id": "totalseg_offline", "prediction_counter": 0}
    )
    if config.get("send_usage_stats", True) or not config.get("statistics_disclaimer_shown"):
        write_json(config_file, {**config, "send_usage_stats": False, "statistics_disclaimer_shown": True})

    names = ("TOTALSEG_HOME_DIR", "TOTALSEG_WEIGHTS_PATH", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    saved_env = {k: os.environ.get(k) for k in names}
    saved_download = api.download_pretrained_weights
    weights = str(Path(settings.weights).absolute())

    def no_download(task_id: int) -> None:
        if task_id in MODES[settings.mode]:
            check_weights(weights, settings.mode)
        else:
            raise WeightsError(f"TotalSegmentator asked for model {task_id}, which the factory does not provide offline")

    os.environ["TOTALSEG_HOME_DIR"] = str(home)
    os.environ["TOTALSEG_WEIGHTS_PATH"] = weights
    api.download_pretrained_weights = no_download
    try:
        yield
    finally:
        api.download_pretrained_weights = saved_download
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def torch_device(device: str) -> str:
    """The factory's device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) in TotalSegmentator's
    spelling (``cpu``, ``gpu``, ``gpu:N``); ``auto`` is CUDA when present."""
    import torch

    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device in ("cuda", "gpu"):
        return "gpu"
    if device.startswith(("cuda:", "gpu:")) and device.split(":", 1)[1].isdigit():
        return "gpu:" + device.split(":", 1)[1]
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def check_scan_size(shape: Sequence[int], affine: np.ndarray, model: ModelInfo, min_fraction: float, path) -> None:
    """Reject scans that cover less than ``min_fraction`` of the model's patch along some axis.

    nnU-Net pads such scans to its patch and segments mostly padding; the masks and regions
    that come out are not worth keeping.
    """
    extent = np.asarray(shape, float) * spacing_from_affine(affine)
    # TotalSegmentator reorients to RAS (x, y, z); nnU-Net's plans are in (z, y, x).
    patch_mm = np.asarray(model.patch_size[::-1], float) * np.asarray(model.spacing[::-1], float)
    short = [(ax, e, p) for ax, e, p in zip("xyz", extent, patch_mm, strict=True) if e < min_fraction * p]
    if short:
        detail = ", ".join(f"{ax} {e:.0f} mm" for ax, e, _ in short)
        patch = "x".join(f"{p:.0f}" for p in patch_mm)
        raise SegmentationError(
            path,
            f"scan too small for TotalSegmentator's model {model.task_id}: {detail}, less than "
            f"{min_fraction:g} of its {patch} mm patch",
        )


def run_totalsegmentator(hu_path: str | os.PathLike, settings: TotalSegSettings) -> np.ndarray:
    """TotalSegmentator's ``total`` classes (uint8, its own indices) on the grid of ``hu_path``."""
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    shape = nib.load(str(hu_path)).shape
    with offline_environment(settings):
        try:
            seg = totalsegmentator(
                str(hu_path), None, ml=True, fast=settings.mode == "fast", task="total",
                device=torch_device(settings.device), quiet=True,
                nr_thr_resamp=settings.threads, nr_thr_saving=settings.threads,
            )  # fmt: skip
        except (Exception, SystemExit) as exc:  # TotalSegmentator calls sys.exit on some input errors
            raise SegmentationError(hu_path, f"TotalSegmentator failed: {type(exc).__name__}: {exc}") from exc
    data = np.asanyarray(seg.dataobj).astype(np.uint8)
    if data.shape != tuple(shape):
        raise SegmentationError(hu_path, f"TotalSegmentator returned a {data.shape} mask for a {tuple(shape)} scan")
    return data


@functools.lru_cache(maxsize=1)
def totalseg_lut() -> np.ndarray:
    """Lookup table: TotalSegmentator ``total`` class index -> MAISI label id (0 = dropped)."""
    from totalsegmentator.map_to_binary import class_map

    from maisi.sources.converters import totalseg_mapping

    mapping, _ = totalseg_mapping()
    lut = np.zeros(256, dtype=np.uint8)
    for index, name in class_map["total"].items():
        if name not in mapping:
            raise KeyError(f"TotalSegmentator class {name!r} is missing from maisi/data/totalseg_to_maisi.json")
        lut[int(index)] = mapping[name]
    return lut


def maisi_mask(
    ts_seg: np.ndarray, hu: np.ndarray | None, settings: TotalSegSettings, case_label: np.ndarray | None = None
) -> np.ndarray:
    """MAISI label map from TotalSegmentator's classes: mapped ids, ``body`` (200) on the rest of
    the body, and the case's own nonzero labels on top (e.g. a dataset's tumour masks)."""
    out = totalseg_lut()[np.asarray(ts_seg, dtype=np.uint8)]
    if settings.body_threshold_hu is not None and hu is not None:
        out[(out == 0) & body_mask(hu, float(settings.body_threshold_hu))] = BODY
    if case_label is not None and settings.keep_labels:
        case_label = np.asarray(case_label)
        if case_label.shape != out.shape:
            raise SegmentationError(None, f"label map shape {case_label.shape} differs from the scan's {out.shape}")
        np.copyto(out, case_label.astype(np.uint8), where=case_label != 0)
    return out


def mask_path(out_root: str | os.PathLike, source: str, case_id: str) -> Path:
    return Path(out_root) / source / "labels" / f"{case_id}.nii.gz"


def segment_case(
    case_id: str,
    hu_path: str | os.PathLike,
    dest: str | os.PathLike,
    settings: TotalSegSettings,
    label_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Segment one prepared case and write its MAISI mask (uint8 NIfTI on the scan's grid).

    Skips the work when ``dest`` exists and its sidecar records the same inputs and settings.
    Returns the table row (``label``, ``ts_mode``, ``ts_device``, ``labels_present``).
    """
    import nibabel as nib

    dest = Path(dest)
    inputs = {"image_hu": sha256_file(hu_path), "label": sha256_file(label_path) if label_path else ""}
    fingerprint = {"inputs": inputs, "settings": {k: v for k, v in asdict(settings).items() if k not in ("home", "threads")}}
    old = current_sidecar(dest, fingerprint)
    if old is not None:
        return {"label": str(dest), "ts_mode": settings.mode, "ts_device": old.get("device", ""),
                "labels_present": json.dumps(old.get("labels_present", []))}  # fmt: skip

    try:
        models = check_weights(settings.weights, settings.mode)
    except WeightsError as exc:
        raise SegmentationError(hu_path, str(exc)) from None
    img = nib.load(str(hu_path))
    for model in models:
        check_scan_size(img.shape, img.affine, model, settings.min_patch_fraction, hu_path)
    hu = np.asanyarray(img.dataobj)
    case_label = np.asanyarray(nib.load(str(label_path)).dataobj) if label_path else None
    ts_seg = run_totalsegmentator(hu_path, settings)
    try:
        mask = maisi_mask(ts_seg, hu, settings, case_label)
    except SegmentationError as exc:
        raise SegmentationError(label_path, exc.problem) from None
    present = sorted(int(i) for i in np.unique(mask) if i)
    device = torch_device(settings.device)
    meta = {
        "case_id": case_id,
        "fingerprint": fingerprint,
        "device": device,
        "models": [asdict(m) for m in models],
        "labels_present": present,
        "mapping_table": "maisi/data/totalseg_to_maisi.json",
    }
    write_with_sidecar(dest, lambda tmp: save_nifti(mask, img.affine, tmp, np.uint8), meta, "totalsegmentator")
    return {"label": str(dest), "ts_mode": settings.mode, "ts_device": device, "labels_present": json.dumps(present)}
