"""Does a mask-conditioned case show what its mask says? Agreement of its organ medians with the real data's,
and the overlap of a segmenter's reading of the image with the mask (:func:`label_dice`).

QC judges each organ against a range; these measures judge the generator: a model that ignores its mask
(untrained, a zeroed ControlNet conditioning, a wrong latent scale) gives organ medians that do not follow
the real ones, however wide the ranges are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from maisi.evaluate.qc import ORGAN_GROUPS

__all__ = ["OrganAgreement", "organ_agreement", "mean_agreement", "label_dice"]


@dataclass(frozen=True)
class OrganAgreement:
    """One case's organ medians against the real means."""

    organs: tuple[str, ...]  # the organs measured in the case that have a real mean
    spearman: float  # rank correlation of the case's medians with the real means over those organs
    pearson: float  # linear correlation over the same organs
    mae_hu: float  # mean absolute error over MAISI's QC organs present (nan when none is)
    errors_hu: dict[str, float]  # per QC organ
    liver_minus_lung_hu: float  # nan unless both are present


def organ_agreement(medians: Mapping[str, float], real: Mapping[str, float], min_organs: int = 5) -> OrganAgreement:
    """Spearman's rank correlation of a case's organ medians with the real data's means (every organ with
    both, at least ``min_organs``), the error of MAISI's QC organs and the liver's contrast over the lungs."""
    from scipy.stats import spearmanr

    organs = tuple(sorted(o for o in medians if o in real))
    if len(organs) < min_organs:
        raise ValueError(f"only {len(organs)} organs ({', '.join(organs) or 'none'}) have both a generated median and a real mean; need {min_organs}")
    generated, expected = [float(medians[o]) for o in organs], [float(real[o]) for o in organs]
    rho = float(spearmanr(generated, expected).statistic)
    r = float(np.corrcoef(generated, expected)[0, 1])
    errors = {o: abs(float(medians[o]) - float(real[o])) for o in ORGAN_GROUPS if o in medians and o in real}
    contrast = float(medians["liver"]) - float(medians["lung"]) if {"liver", "lung"} <= set(medians) else float("nan")
    return OrganAgreement(organs, rho, r, float(np.mean(list(errors.values()))) if errors else float("nan"), errors, contrast)


def mean_agreement(cases: Sequence[OrganAgreement]) -> dict[str, float]:
    """The cases' mean Spearman, worst Spearman, mean QC-organ error and smallest liver-lung contrast."""
    return {
        "spearman_mean": float(np.mean([c.spearman for c in cases])), "spearman_min": float(np.min([c.spearman for c in cases])),
        "organ_mae_hu": float(np.nanmean([c.mae_hu for c in cases])),
        "liver_minus_lung_min_hu": float(np.nanmin([c.liver_minus_lung_hu for c in cases])),
    }  # fmt: skip


def label_dice(predicted: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Dice of each of MAISI's QC organ groups between a segmenter's classes of a generated image
    (:func:`maisi.evaluate.segmenter.segment_volume`, trained on real cases only) and the label map the image
    was conditioned on (both on one grid), for the groups the mask holds: the "does the image show what the
    label says" check. A segmenter that cannot find an organ in real images either bounds what it can tell."""
    if predicted.shape != mask.shape:
        raise ValueError(f"segmentation {predicted.shape} and mask {mask.shape} are not on one grid")
    out = {}
    for k, (group, ids) in enumerate(ORGAN_GROUPS.items(), start=2):  # the segmenter's classes: outside, body, groups
        truth = np.isin(mask, ids)
        if truth.any():
            pred = predicted == k
            out[group] = float(2.0 * (pred & truth).sum() / (pred.sum() + truth.sum()))
    return out
