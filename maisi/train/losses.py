"""MAISI v2's region-specific contrastive loss for the ControlNet.

NVIDIA trains rflow-ct's ControlNet with a second pass of the ControlNet and the UNet on the same noisy
latents, timesteps and conditions, but with the label map's tumours removed (the map of classifier-free
guidance's unconditional branch). The region of interest (ROI) is where the two label maps differ. Two
terms are added, times a weight, to the L1 loss:

- inside the ROI, the mean absolute difference between the two outputs, negated (the tumour must change
  the prediction) and bounded below at ``-max_loss`` (it need not grow without end);
- outside the ROI grown by one voxel (3x3x3), the mean absolute error of the tumour-free output against
  the target (the tumour must change nothing else).

The masks are given at label resolution and taken to the latent grid by nearest-neighbour resampling; the
means run over the masked voxels of every channel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["contrastive_regions", "region_contrastive_loss"]

#: Keeps an empty mask's mean at zero.
_EPS = 1e-5


def contrastive_regions(label: torch.Tensor, label_roi_free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ROI (voxels where ``label`` and its tumour-free ``label_roi_free`` differ) and the background (outside
    the ROI dilated by a 3x3x3 cube; voxels beyond the volume count as outside the ROI), both float 0/1 masks of
    the labels' shape ``(B, 1, X, Y, Z)``."""
    if label.shape != label_roi_free.shape or label.ndim != 5 or label.shape[1] != 1:
        raise ValueError(
            f"expected two label maps of one shape (B, 1, X, Y, Z), got {tuple(label.shape)} and {tuple(label_roi_free.shape)}"
        )
    roi = (label != label_roi_free).float()
    grown = F.max_pool3d(roi, kernel_size=3, stride=1, padding=1)  # padding never wins the max of a 0/1 mask
    return roi, 1.0 - grown


def _on_grid(mask: torch.Tensor, size: Sequence[int], name: str) -> torch.Tensor:
    """A one-channel mask resampled (nearest neighbour) to the output's spatial ``size``."""
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(f"the {name} mask must have one channel, shape (B, 1, X, Y, Z); got {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=tuple(size), mode="nearest")


def _masked_mean(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``error`` weighted by the one-channel ``mask`` (broadcast over channels), over the masked element count."""
    weight = mask.expand_as(error)
    return (error * weight).sum() / ((weight > 0).sum() + _EPS)


def region_contrastive_loss(
    output: torch.Tensor,
    output_roi_free: torch.Tensor,
    target: torch.Tensor,
    roi: torch.Tensor,
    background: torch.Tensor,
    max_loss: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the region-contrastive loss, in float32: ``(inside, outside)``.

    Args:
        output: the model's prediction with the label map, ``(B, C, x, y, z)``.
        output_roi_free: its prediction with the tumour-free label map (same shape).
        target: the training target of both (velocity or noise, same shape).
        roi: the ROI mask ``(B, 1, X, Y, Z)`` at any resolution (see :func:`contrastive_regions`).
        background: the background mask ``(B, 1, X, Y, Z)``.
        max_loss: the bound: ``inside`` is never below ``-max_loss``.

    Returns:
        ``inside``: minus the mean absolute difference of ``output`` and ``output_roi_free`` over the ROI,
        bounded below at ``-max_loss`` (0 for an empty ROI); ``outside``: the mean absolute error of
        ``output_roi_free`` against ``target`` over the background.
    """
    if output.shape != output_roi_free.shape or output.shape != target.shape:
        raise ValueError(f"output, tumour-free output and target differ in shape: {tuple(output.shape)}, "
                         f"{tuple(output_roi_free.shape)}, {tuple(target.shape)}")  # fmt: skip
    size = output.shape[2:]
    output, output_roi_free, target = output.float(), output_roi_free.float(), target.float()
    inside = -_masked_mean((output - output_roi_free).abs(), _on_grid(roi, size, "ROI"))
    inside = torch.clamp(inside, min=-float(max_loss))
    outside = _masked_mean((output_roi_free - target).abs(), _on_grid(background, size, "background"))
    return inside, outside
