"""ControlNet training (MAISI's third stage) on the frozen latent diffusion UNet.

The ControlNet is initialised from the UNet (MAISI's way) and learns to steer it with the case's
label map, given as 8 bit-channels at image resolution (4x the latent size per axis). The UNet is
frozen; only the ControlNet is optimised. The L1 loss weighs latent voxels whose 4x4x4 label block
holds a tumour label ``tumour_weight`` times (MAISI: 100). Sampling, noising, the loop, resume
states and checkpoints are those of :mod:`maisi.train.diffusion`.

With a contrastive weight (rflow-ct's default: NVIDIA's 0.01), MAISI v2's region-contrastive loss
(:mod:`maisi.train.losses`) is added: the models run a second time on the label map with its tumours
removed (:func:`maisi.core.labels.remove_tumours` of the whole map, as NVIDIA's ``remove_tumors``),
with the same noise, timesteps and conditions. With ``init_from`` the ControlNet starts from a parent
checkpoint (fine-tuning) instead of the UNet's copy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from maisi.core.io import sha256_file
from maisi.core.labels import remove_tumours
from maisi.models.checkpoints import diffusion_scheduler, load_diffusion, load_parent
from maisi.models.networks import build_controlnet, build_scheduler, label_to_bits
from maisi.models.variants import DOWNSAMPLE, scheduler_spec, variant
from maisi.train.batches import Batch, LatentCase, check_patch, conditions, l1_loss, noise_inputs, read_cases, sample_batch
from maisi.train.distributed import data_parallel, rank_device
from maisi.train.loop import (
    ResumeState,
    TrainLoop,
    cpu_state,
    files_fingerprint,
    fingerprint,
    loss_metrics,
    plot_losses,
    save_checkpoint,
    seed_everything,
    small_data_warning,
)
from maisi.train.losses import contrastive_regions, region_contrastive_loss
from maisi.train.settings import ControlNetSettings
from maisi.train.validation import Validation, split_cases

__all__ = ["train_controlnet", "LabelCache", "tumour_weights"]

log = logging.getLogger(__name__)


STAGE = "train_controlnet"


class LabelCache:
    """The cases' uint8 label maps (loaded once, on first use); shapes are checked up front from the headers.

    A label map must cover ``4 x`` the latent size per axis; one up to 3 voxels short per axis
    (an image size that is not a multiple of 4) is zero-padded at the far end.
    """

    def __init__(self, cases: Sequence[LatentCase]):
        self._arrays: dict[str, np.ndarray] = {}
        self._roi_free: dict[str, np.ndarray] = {}
        self._cases = {c.case_id: c for c in cases}
        for case in cases:
            path = case.label
            if path is None or not Path(path).is_file():
                raise ValueError(f"case {case.case_id}: label map {path} not found")
            try:
                shape = tuple(int(n) for n in nib.load(str(path)).shape)
            except Exception as exc:  # noqa: BLE001 - any read failure is a bad label file
                raise ValueError(f"case {case.case_id}: {path}: not a readable NIfTI label map ({exc})") from None
            want = tuple(DOWNSAMPLE * n for n in case.shape)
            if len(shape) != 3 or any(not w - DOWNSAMPLE < s <= w for s, w in zip(shape, want, strict=True)):
                raise ValueError(
                    f"case {case.case_id}: label map {path} has shape {shape}; expected {want} "
                    f"({DOWNSAMPLE}x the latent size {case.shape} of {case.path.name})"
                )

    def get(self, case: LatentCase) -> np.ndarray:
        """The case's label map as uint8, padded to 4x its latent size."""
        if case.case_id not in self._arrays:
            path = case.label
            data = np.asanyarray(nib.load(str(path)).dataobj)
            if data.min() < 0 or data.max() > 255 or (data.dtype.kind == "f" and not np.array_equal(data, np.round(data))):
                raise ValueError(f"case {case.case_id}: {path} is not a label map of integer ids 0-255")
            want = [DOWNSAMPLE * n for n in case.shape]
            data = np.pad(data.astype(np.uint8), [(0, w - s) for s, w in zip(data.shape, want, strict=True)])
            self._arrays[case.case_id] = data
        return self._arrays[case.case_id]

    def get_roi_free(self, case: LatentCase) -> np.ndarray:
        """The case's label map with its tumours removed (:func:`~maisi.core.labels.remove_tumours` of the
        whole map, computed once; a map without tumours is shared, not copied)."""
        if case.case_id not in self._roi_free:
            label = self.get(case)
            free = remove_tumours(label)
            self._roi_free[case.case_id] = label if np.array_equal(free, label) else free
        return self._roi_free[case.case_id]

    def crops(self, batch: Batch, roi_free: bool = False) -> torch.Tensor:
        """The label crops (B, 1, 4x, 4y, 4z) matching a batch's latent crops (zero-padded alike); with ``roi_free``,
        crops of the tumour-free maps."""
        out = []
        size = [DOWNSAMPLE * n for n in batch.shape]
        for case, start in zip(batch.cases, batch.starts, strict=True):
            label = self.get_roi_free(case) if roi_free else self.get(case)
            sl = tuple(slice(DOWNSAMPLE * s, DOWNSAMPLE * s + n) for s, n in zip(start, size, strict=True))
            crop = label[sl]
            crop = np.pad(crop, [(0, n - c) for c, n in zip(crop.shape, size, strict=True)])
            out.append(torch.from_numpy(np.ascontiguousarray(crop)))
        return torch.stack(out)[:, None]


def tumour_weights(labels: torch.Tensor, tumour_labels: Sequence[int], weight: float) -> torch.Tensor | None:
    """Per-latent-voxel loss weights (B, 1, x, y, z): ``weight`` where the 4x4x4 label block holds a
    tumour label, else 1. ``None`` when the weight is 1 (a plain mean)."""
    if weight == 1.0:
        return None
    ids = torch.as_tensor(list(tumour_labels), dtype=labels.dtype, device=labels.device)
    hit = F.max_pool3d(torch.isin(labels, ids).float(), kernel_size=DOWNSAMPLE, stride=DOWNSAMPLE)
    return 1.0 + (float(weight) - 1.0) * hit


def _twice(x: torch.Tensor) -> torch.Tensor:
    """``x`` stacked on itself along the batch axis."""
    return torch.cat([x, x])


@data_parallel  # settings.processes > 1: that many processes (DistributedDataParallel)
def train_controlnet(
    records: pd.DataFrame | Iterable[Mapping[str, Any]],
    diffusion_checkpoint: str | os.PathLike,
    settings: ControlNetSettings,
    checkpoint: str | os.PathLike,
    curve_png: str | os.PathLike,
    resume_path: str | os.PathLike,
) -> dict[str, Any]:
    """Train the ControlNet on the frozen UNet of ``diffusion_checkpoint`` (from ``settings.init_from`` when set);
    write the checkpoint (+ JSON sidecar) and the loss curve. Returns the sidecar's metadata plus the loss history."""
    cases, held_out = split_cases(read_cases(records, need_label=True), settings)  # held_out: model.validation_fold's cases
    labels = LabelCache(cases + held_out)
    divisor = check_patch(settings, cases)
    data_fp = files_fingerprint([c.path for c in cases + held_out] + [c.label for c in cases + held_out if c.label is not None])
    diffusion_sha = sha256_file(diffusion_checkpoint)
    parent_sha = sha256_file(settings.init_from) if settings.init_from is not None else None
    contrastive_weight, contrastive_max = settings.contrastive
    device = rank_device(settings.device)  # with several processes, cuda:<rank> (or the CPU)
    resume = ResumeState(resume_path, fingerprint({
        "stage": STAGE, "settings": settings.run_fingerprint(), "data": data_fp, "diffusion": diffusion_sha, "parent": parent_sha,
    }))  # fmt: skip

    unet, scale, num_train_timesteps = load_diffusion(diffusion_checkpoint, settings.variant)
    kind = diffusion_scheduler(diffusion_checkpoint, settings.kind)
    var = variant(settings.variant)
    unet = unet.to(device).eval().requires_grad_(False)
    seed_everything(settings.seed)
    controlnet = build_controlnet(settings.variant, unet)
    if settings.init_from is not None:
        load_parent(controlnet, settings.init_from, "ControlNet", settings.variant, key=f"{STAGE}.init_from")
    controlnet = controlnet.to(device)
    scheduler = build_scheduler(scheduler_spec(var, kind, num_train_timesteps))
    scale_t = torch.tensor(scale, dtype=torch.float32)
    loop = TrainLoop(STAGE, controlnet, settings, device, resume)
    log.info("%s: %d cases, variant %s, %s scheduler (%d timesteps), scale factor %.5f, device %s, steps %d (from %d), from %s, "
             "contrastive loss weight %g (bound %g)", STAGE, len(cases), settings.variant, kind, num_train_timesteps, scale,
             device, settings.steps, loop.start, settings.init_from or "the UNet", contrastive_weight,
             contrastive_max)  # fmt: skip
    # The loss's parts per step, kept in the resume state with the loop's history.
    parts: dict[str, list[float]] = loop.extra.get("loss_parts") or {"weighted L1": [], "contrastive (ROI)": [], "background": []}

    def predict(
        noisy: torch.Tensor, t: torch.Tensor, label: torch.Tensor, inputs: Mapping[str, torch.Tensor], net: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """The UNet's prediction steered by the ControlNet with ``label`` (``net``: the ControlNet as called, by default
        the loop's, which with several processes is DDP's wrapper)."""
        cond = label_to_bits(label)
        down, mid = (net or loop.net)(x=noisy, timesteps=t, controlnet_cond=cond, class_labels=inputs.get("class_labels"))
        return unet(x=noisy, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **inputs)

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        batch = sample_batch(cases, gen, settings.batch_size, settings.latent_patch, divisor, scale_t)  # the global batch
        noisy, timesteps, target = noise_inputs(scheduler, kind, batch.z, gen, device, batch.whole, part=loop.part)
        batch = batch.select(loop.part)  # this process's share
        label = labels.crops(batch).to(device)
        inputs = conditions(batch, device, var)
        weights = tumour_weights(label, settings.tumour_labels, settings.tumour_weight)
        if contrastive_weight == 0:
            return l1_loss(predict(noisy, timesteps, label, inputs), target, weights)
        label_free = labels.crops(batch, roi_free=True).to(device)
        roi, background = contrastive_regions(label, label_free)
        if bool(roi.any()):
            # The tumour-free maps with the same noise, timesteps and conditions, in the same forward pass as the
            # maps (the networks treat samples independently; one forward per step suits DistributedDataParallel).
            doubled = {k: _twice(v) for k, v in inputs.items()}
            both = predict(_twice(noisy), _twice(timesteps), torch.cat([label, label_free]), doubled)
            prediction, prediction_free = both.chunk(2)
        else:  # no tumour in the batch: identical maps, hence an identical output
            prediction = prediction_free = predict(noisy, timesteps, label, inputs)
        loss = l1_loss(prediction, target, weights)
        inside, outside = region_contrastive_loss(prediction, prediction_free, target, roi, background, contrastive_max)
        for name, value in (("weighted L1", loss), ("contrastive (ROI)", inside), ("background", outside)):
            parts[name].append(float(value.detach()))
        return loss + contrastive_weight * (inside + outside)

    def validation_loss(batch: Batch, noisy: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted L1 loss of held-out samples (rank 0, no gradients: the ControlNet itself, not DDP's wrapper)."""
        label = labels.crops(batch).to(device)
        prediction = predict(noisy, timesteps, label, conditions(batch, device, var), net=controlnet)
        return l1_loss(prediction, target, tumour_weights(label, settings.tumour_labels, settings.tumour_weight))

    validation = None  # the held-out cases' loss every model.validation_every steps
    if held_out:
        validation = Validation(STAGE, held_out, settings, divisor, scale_t, scheduler, kind, validation_loss, device)
    history = loop.run(loss_fn, extra={"loss_parts": parts} if contrastive_weight else None, validate=validation)
    metrics = {**loss_metrics(history), **loop.validation_metrics()}
    meta = {
        "stage": STAGE, "settings": asdict(settings), "data_fingerprint": data_fp, "diffusion_checkpoint": str(diffusion_checkpoint),
        "diffusion_sha256": diffusion_sha, "init_from": settings.init_from, "init_from_sha256": parent_sha, "scheduler": kind,
        "scale_factor": float(scale), "contrastive_loss": {"weight": contrastive_weight, "max": contrastive_max},
        "metrics": metrics,
        "cases": [c.case_id for c in cases], "resumed_from": loop.start, "device": str(device),
        "train_seconds": round(resume.elapsed_s(), 1),
        "small_data_warning": small_data_warning(STAGE, len(cases), settings.min_cases),
    }  # fmt: skip
    if contrastive_weight:
        meta["contrastive_loss"]["metrics"] = {name: loss_metrics(values) for name, values in parts.items()}
    if validation is not None:
        meta["validation"] = validation.record(loop.validation)
    payload = {"controlnet_state_dict": cpu_state(controlnet), "variant": settings.variant, "steps": int(settings.steps)}
    save_checkpoint(checkpoint, payload, meta, STAGE)
    curves = {"total": history, **parts} if contrastive_weight else {"weighted L1": history}
    held_out_curve = {"weighted L1, held-out cases": loop.validation}
    plot_losses(curves, curve_png, f"ControlNet ({kind}, {settings.variant})", validation=held_out_curve)
    resume.clear()
    return {**meta, "history": history}
