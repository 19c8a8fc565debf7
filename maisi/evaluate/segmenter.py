"""FID's independent feature network: a 2-D segmenter trained once on the real cases, cached by their hash.

MAISI's FID takes its features from a ResNet-50 pretrained on RadImageNet, whose weights cannot be
fetched offline; the run's own autoencoder is a weak referee, since the generator's training shaped
its features. This network is trained on the real data only, and for another task: segmenting the real
cases' tissues (outside, body and MAISI's seven QC organ groups, from their label maps; the body alone where no real case has one) on slices of all three planes,
preprocessed exactly as FID preprocesses volumes (:func:`maisi.evaluate.features.load_volume`). Its features
for FID are the spatial means of the encoder's deepest feature map per slice
(:class:`SegmenterFeatures`), as MAISI's are the spatial means of the ResNet's last map.

The trained weights are stored under a key hashed from the real cases' files, the training settings
and FID's preprocessing (:func:`segmenter_key`), so runs on the same real data share one referee and
its FIDs stay comparable across model versions.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.core.anatomy import body_mask
from maisi.core.checks import InputError
from maisi.core.io import atomic_path, read_json, sha256_file, write_json
from maisi.core.provenance import provenance
from maisi.evaluate.features import PLANES, FeatureExtractor, central_range, central_slices, load_label, load_volume
from maisi.evaluate.qc import ORGAN_GROUPS
from maisi.evaluate.settings import FIDSettings, SegmenterSettings
from maisi.models.checkpoints import CheckpointError, read_checkpoint
from maisi.models.networks import select_device
from maisi.train.loop import (
    ResumeState,
    TrainLoop,
    cpu_state,
    files_fingerprint,
    fingerprint,
    loss_metrics,
    plot_losses,
    seed_everything,
)

__all__ = ["STAGE", "NETWORK", "CLASSES", "WINDOWS", "hu_windows", "tissue_classes", "RealSlices", "build_segmenter", "segmenter_key", "train_segmenter", "SegmenterFeatures", "read_cases", "segment_volume"]

log = logging.getLogger(__name__)


STAGE = "fid_segmenter"


#: The network (a change here changes every cache key).
NETWORK = "monai SegResNet 2-D, classes outside, body and MAISI QC organ groups, blocks_down (1, 2, 2, 4), blocks_up (1, 1, 1), HU windows (-1000, 1000), (-1000, -400), (-160, 240), (150, 1000); organ-centred slices half the time"


#: The segmenter's classes: outside the body, the body, MAISI's QC organ groups.
CLASSES: tuple[str, ...] = ("outside", "body", *ORGAN_GROUPS)


#: SegResNet halves the slices three times: training slices are padded to a multiple of this.
_STRIDE = 8


def build_segmenter(n_classes: int, init_filters: int) -> torch.nn.Module:
    """MONAI's 2-D SegResNet with ``n_classes`` outputs; its deepest map has ``8 * init_filters`` channels."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=2, init_filters=init_filters, in_channels=len(WINDOWS), out_channels=n_classes,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))  # fmt: skip


#: The input channels: HU windows (whole range, lung, soft tissue, bone), each scaled to [0, 1]. A single
#: [-1000, 1000] channel puts lung 0.08 above air and the abdominal organs within 0.05 of each other; with
#: it the network had not told lungs from air after 300 steps, with these windows it had.
WINDOWS: tuple[tuple[float, float], ...] = ((-1000.0, 1000.0), (-1000.0, -400.0), (-160.0, 240.0), (150.0, 1000.0))


def hu_windows(hu: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)`` HU slices -> ``(n, len(WINDOWS), H, W)`` network inputs."""
    hu = hu.float()[:, None]
    return torch.cat([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in WINDOWS], dim=1)


def segmenter_key(images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike], settings: SegmenterSettings, fid: FIDSettings) -> str:
    """The cache key: sha256 over the real cases' files, the training settings, FID's preprocessing and the network."""
    preprocessing = {"spacing": fid.spacing, "size": fid.size, "hu_range": fid.hu_range}
    return fingerprint({"images": files_fingerprint(images), "labels": files_fingerprint(labels), "settings": settings.training_dict(),
                        "preprocessing": preprocessing, "network": NETWORK})  # fmt: skip


def tissue_classes(hu: np.ndarray, label: np.ndarray | None) -> np.ndarray:
    """The segmenter's target: 0 outside the body, 1 the body (:func:`maisi.core.anatomy.body_mask`, or any
    labelled voxel), 2.. MAISI's QC organ groups (:data:`CLASSES`) where ``label`` has them."""
    body = body_mask(hu)
    if label is None:
        return body.astype(np.uint8)
    out = (body | (label > 0)).astype(np.uint8)
    for k, ids in enumerate(ORGAN_GROUPS.values(), start=2):
        out[np.isin(label, ids)] = k
    return out


class RealSlices:
    """The real cases in FID's preprocessing (HU as int16) with their training targets (:func:`tissue_classes`).

    The classes are :data:`CLASSES` (outside, body, MAISI's seven QC organ groups) when a case has a label map,
    else outside and body only; cases without a label map are left out when others have one. ``sample`` draws
    slices of any plane, padded with air to one size.
    """

    def __init__(self, images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike | None], fid: FIDSettings):
        if len(images) != len(labels) or not images:
            raise ValueError(f"{STAGE}: expected one label entry per image and at least one image, got {len(images)} / {len(labels)}")
        pairs = [(Path(i), Path(lab) if lab else None) for i, lab in zip(images, labels, strict=True)]
        labelled = [p for p in pairs if p[1] is not None]
        self.target = "labels" if labelled else "body"
        self.classes = list(CLASSES if labelled else CLASSES[:2])
        self.cases = [p[0] for p in (labelled or pairs)]
        self.volumes: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        for image, label in labelled or pairs:
            hu = load_volume(image, fid)
            lab = None if label is None else load_label(label, fid)
            if lab is not None and lab.shape != hu.shape:
                raise InputError(label, f"label grid {lab.shape} differs from its image's {hu.shape} after FID's preprocessing")
            self.volumes.append(np.rint(hu).astype(np.int16))
            self.targets.append(tissue_classes(hu, lab))
        self.hu_range = fid.hu_range
        # up to 4096 voxels of each organ class per case, for organ-centred slices
        rng = np.random.default_rng(0)
        self.organ_voxels: list[list[np.ndarray]] = []
        for target in self.targets:
            coords = [np.argwhere(target == k) for k in range(2, len(self.classes))]
            self.organ_voxels.append([c[rng.choice(len(c), min(len(c), 4096), replace=False)] for c in coords if len(c)])
        sides = [d for v in self.volumes for d in v.shape]
        side = -(-max(sides) // _STRIDE) * _STRIDE
        self.shape = (side, side)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def _organ_slice(self, case: int, axis: int, generator: torch.Generator) -> int | None:
        """The position (along ``axis``) of a random voxel of a random organ class present in ``case``."""
        voxels = self.organ_voxels[case]
        if not voxels:
            return None
        coords = voxels[int(torch.randint(len(voxels), (1,), generator=generator))]
        return int(coords[int(torch.randint(len(coords), (1,), generator=generator)), axis])

    def sample(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random slices (case, plane and position from ``generator``; half of them through a voxel of a
        random organ class, as MONAI's ``RandCropByLabelClasses`` balances classes): ``(n, len(WINDOWS), H, W)``
        inputs (air padded) and ``(n, 1, H, W)`` int64 targets."""
        xs, ys = [], []
        for _ in range(n):
            case = int(torch.randint(len(self.volumes), (1,), generator=generator))
            axis = int(torch.randint(3, (1,), generator=generator))
            index = self._organ_slice(case, axis, generator) if torch.rand((), generator=generator) < 0.5 else None
            if index is None:
                index = int(torch.randint(self.volumes[case].shape[axis], (1,), generator=generator))
            xs.append(self.slice(self.volumes[case], axis, index, self.hu_range[0]))
            ys.append(self.slice(self.targets[case], axis, index, 0))
        return hu_windows(torch.from_numpy(np.stack(xs))), torch.from_numpy(np.stack(ys).astype(np.int64))[:, None]

    def slice(self, volume: np.ndarray, axis: int, index: int, fill: float) -> np.ndarray:
        """One slice of ``volume``, padded with ``fill`` (centred) to :attr:`shape`."""
        a = np.take(volume, index, axis=axis)
        (h, w), (th, tw) = a.shape, self.shape
        pad = (((th - h) // 2, th - h - (th - h) // 2), ((tw - w) // 2, tw - w - (tw - w) // 2))
        return np.pad(a, pad, constant_values=fill)


@torch.no_grad()
def _predict(model: torch.nn.Module, slices: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """Class indices of ``(n, len(WINDOWS), H, W)`` inputs (H, W multiples of 8)."""
    return torch.cat([model(slices[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(slices), batch_size)])


def _dice(model: torch.nn.Module, data: RealSlices, fid: FIDSettings, device: torch.device, batch_size: int) -> dict[str, float]:
    """Dice per class over the central slices (FID's) of every plane of every training case."""
    inter, pred_sum, true_sum = (np.zeros(data.n_classes) for _ in range(3))
    model.eval()
    for hu, target in zip(data.volumes, data.targets, strict=True):
        for axis in PLANES.values():
            start, stop = central_range(hu.shape[axis], fid.central_fraction)
            x = np.stack([data.slice(hu, axis, i, fid.hu_range[0]) for i in range(start, stop)])
            y = torch.from_numpy(np.stack([data.slice(target, axis, i, 0) for i in range(start, stop)]).astype(np.int64))
            p = _predict(model, hu_windows(torch.from_numpy(x)), device, batch_size)
            for k in range(1, data.n_classes):
                inter[k] += float(((p == k) & (y == k)).sum())
                pred_sum[k] += float((p == k).sum())
                true_sum[k] += float((y == k).sum())
    return {data.classes[k]: 2 * inter[k] / (pred_sum[k] + true_sum[k]) for k in range(1, data.n_classes) if true_sum[k] > 0}


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest, suffix=dest.suffix) as tmp:
        shutil.copyfile(src, tmp)


def _cached(cache: Path | None, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The cached checkpoint of ``key`` and its content, when it is there, readable and holds that key
    (else a warning, None)."""
    if cache is None or not (cache / f"{key}.pt").is_file():
        return None
    path = cache / f"{key}.pt"
    try:
        data = read_checkpoint(path)
        if data.get("key") == key:
            return path, data
        log.warning("%s: %s holds another key; training again", STAGE, path)
    except CheckpointError as exc:
        log.warning("%s: ignoring the unreadable cached segmenter %s (%s); training again", STAGE, path, exc)
    return None


def train_segmenter(
    images: Sequence[str | os.PathLike], labels: Sequence[str | os.PathLike | None], settings: SegmenterSettings,
    fid: FIDSettings, out: str | os.PathLike, losses: str | os.PathLike | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train the segmenter on the real cases (or take it from ``settings.cache``) and write it to ``out``, with
    a JSON sidecar (key, cases, target, Dice per class on the training cases, losses) and, with ``losses``,
    the loss curve. Returns the sidecar's content."""
    out = Path(out)
    label_files = [p for p in labels if p]
    key = segmenter_key(images, label_files, settings, fid)
    cache = Path(settings.cache) if settings.cache else None
    cached = _cached(cache, key)
    if cached is not None:
        hit, history = cached[0], cached[1]["history"]
        log.info("%s: reusing %s (same real cases, settings and preprocessing)", STAGE, hit)
        _copy(hit, out)
        meta = {k: v for k, v in read_json(hit.with_name(hit.name + ".json")).items() if k not in ("file", "sha256")}
        meta["cache"] = {"folder": os.fspath(cache), "reused": True}
    else:
        data = RealSlices(images, labels, fid)
        seed_everything(settings.seed)
        device = select_device(settings.device)
        model = build_segmenter(data.n_classes, settings.init_filters).to(device)
        from monai.losses import DiceCELoss

        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)  # Dice over the batch: rare organs are in few slices
        resume = ResumeState(out.with_name(out.name + ".resume.pt"), key)

        def step_loss(step: int, gen: torch.Generator) -> torch.Tensor:
            x, y = data.sample(gen, settings.batch_size)
            return loss(model(x.to(device)), y.to(device))

        loop = TrainLoop(STAGE, model, settings, device, resume)
        history = loop.run(step_loss)
        dice = _dice(model, data, fid, device, settings.batch_size)
        log.info("%s: Dice on the training cases' central slices: mean %.3f over %d labels", STAGE, float(np.mean(list(dice.values()))), len(dice))
        payload = {"state_dict": cpu_state(model), "key": key, "classes": data.classes,
                   "init_filters": settings.init_filters, "network": NETWORK, "history": history,
                   "preprocessing": {"spacing": fid.spacing, "size": fid.size, "hu_range": fid.hu_range}}  # fmt: skip
        with atomic_path(out, suffix=".pt") as tmp:
            torch.save(payload, str(tmp))
        meta = {"key": key, "network": NETWORK, "settings": settings.training_dict(), "preprocessing": payload["preprocessing"],
                "target": data.target, "classes": data.classes, "cases": [os.fspath(c) for c in data.cases],
                "dice_training_cases": dice, "dice_mean": float(np.mean(list(dice.values()))) if dice else float("nan"),
                **loss_metrics(history)}  # fmt: skip
        if cache is not None:
            _copy(out, cache / f"{key}.pt")
            write_json(cache / f"{key}.pt.json", {"file": f"{key}.pt", "sha256": sha256_file(out), **meta})
        meta["cache"] = {"folder": os.fspath(cache) if cache else None, "reused": False}
        resume.clear()
    meta = {"file": out.name, "sha256": sha256_file(out), **meta, "provenance": provenance(STAGE)}
    write_json(out.with_name(out.name + ".json"), meta)
    if losses is not None:
        plot_losses({"Dice + cross-entropy": history}, losses, "FID segmenter (real cases only)")
    return meta


@torch.no_grad()
def segment_volume(
    model: torch.nn.Module, hu: np.ndarray, device: torch.device | str = "cpu", batch_size: int = 8, axis: int = 2
) -> np.ndarray:
    """The segmenter's class (index into :data:`CLASSES`) of every voxel of an HU volume on FID's grid, slice by
    slice along ``axis`` (axial by default; slices padded with air to a multiple of 8, centred, and cropped back)."""
    model.eval()
    vol = np.moveaxis(np.asarray(hu, dtype=np.float32), axis, 0)
    h, w = vol.shape[1:]
    th, tw = -(-h // _STRIDE) * _STRIDE, -(-w // _STRIDE) * _STRIDE
    top, left = (th - h) // 2, (tw - w) // 2
    padded = np.pad(vol, ((0, 0), (top, th - h - top), (left, tw - w - left)), constant_values=-1000.0)
    classes = _predict(model, hu_windows(torch.from_numpy(padded)), torch.device(device), batch_size).numpy()
    return np.moveaxis(classes[:, top : top + h, left : left + w].astype(np.uint8), 0, axis)


class SegmenterFeatures(FeatureExtractor):
    """FID features of the independent segmenter: per slice, the spatial mean of its encoder's deepest map."""

    name = "fid-segmenter"

    def __init__(self, checkpoint: str | os.PathLike, settings: FIDSettings):
        path = Path(checkpoint)
        data = read_checkpoint(path)
        missing = [k for k in ("state_dict", "classes", "init_filters", "preprocessing") if k not in data]
        if missing:
            raise CheckpointError(f"{path}: not an FID segmenter checkpoint (missing {', '.join(missing)})")
        made = data["preprocessing"]
        wanted = {"spacing": settings.spacing, "size": settings.size, "hu_range": settings.hu_range}
        for key, value in wanted.items():
            have = None if made.get(key) is None else tuple(made[key])
            if have != (None if value is None else tuple(value)):
                raise CheckpointError(f"{path}: trained with fid.{key} {have}, but FID now uses {value}; train it again")
        self.model = build_segmenter(len(data["classes"]), int(data["init_filters"]))
        self.model.load_state_dict(data["state_dict"])
        self.device = select_device(settings.device)
        self.model = self.model.to(self.device).eval()
        self.checkpoint, self.sha256 = path, sha256_file(path)
        self.key, self.classes = data.get("key", ""), list(data["classes"])
        self.feature_dim = 8 * int(data["init_filters"])
        self.settings = settings

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "what": "2-D SegResNet trained once on the real cases' slices to segment their labels (no generative stage "
            "trains it); spatial mean of the encoder's deepest feature map per slice",
            "checkpoint": os.fspath(self.checkpoint), "checkpoint_sha256": self.sha256, "key": self.key,
            "n_classes": len(self.classes), "feature_dim": self.feature_dim,
            "note": "independent of the generator, but trained on this run's real data: not comparable with published MAISI FID values",
        }  # fmt: skip

    @torch.no_grad()
    def slice_features(self, slices: torch.Tensor) -> np.ndarray:
        """``(n, H, W)`` HU slices -> ``(n, 8 * init_filters)`` float64."""
        x = hu_windows(slices)
        out = []
        for i in range(0, len(x), self.settings.batch_size):
            deepest, _ = self.model.encode(x[i : i + self.settings.batch_size].to(self.device))
            out.append(deepest.float().mean(dim=(2, 3)).cpu())
        return torch.cat(out).double().numpy()

    def plane_features(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
        return {p: self.slice_features(central_slices(vol, a, self.settings.central_fraction)) for p, a in PLANES.items()}


def read_cases(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str | None]]:
    """Images (``image_hu``) and label maps (``label``, None where empty) of the prepared cases' table rows."""
    images = [str(r["image_hu"]) for r in rows]
    labels = [str(r["label"]) if isinstance(r.get("label"), str) and r["label"].strip() else None for r in rows]
    return images, labels
