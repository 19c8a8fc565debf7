"""Does a mask-conditioned case show what its mask says? Agreement of its organ medians with the real data's,
and the overlap of a segmenter's reading of the image with the mask (:func:`label_dice`).

QC judges each organ against a range; these measures judge the generator: a model that ignores its mask
(untrained, a zeroed ControlNet conditioning, a wrong latent scale) gives organ medians that do not follow
the real ones, however wide the ranges are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from maisi.core.tables import numeric
from maisi.evaluate.qc import ORGAN_GROUPS

if TYPE_CHECKING:
    from maisi.evaluate.settings import FIDSettings
    from maisi.prepare.totalsegmentator import TotalSegSettings

__all__ = ["OrganAgreement", "organ_agreement", "mean_agreement", "class_map", "class_dice", "label_fidelity", "label_dice", "fidelity_summary", "FIDELITY_COLUMNS",
           "Reader", "totalseg_reader", "label_fidelity_rows"]


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


def class_map(label: np.ndarray, classes: Mapping[str, Sequence[int]] = ORGAN_GROUPS) -> np.ndarray:
    """0 for background, ``k + 1`` for the voxels whose MAISI id is in the ``k``-th class group."""
    out = np.zeros(label.shape, dtype=np.int64)
    for k, ids in enumerate(classes.values(), start=1):
        out[np.isin(label, list(ids))] = k
    return out


def class_dice(predicted: np.ndarray, target: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of classes ``1..n_classes`` between two class maps on one grid; NaN where a class is in neither."""
    if predicted.shape != target.shape:
        raise ValueError(f"segmentation {predicted.shape} and reference {target.shape} are not on one grid")
    out = np.full(n_classes, np.nan)
    for k in range(1, n_classes + 1):
        p, t = predicted == k, target == k
        if p.any() or t.any():
            out[k - 1] = 2.0 * (p & t).sum() / (p.sum() + t.sum())
    return out


def label_fidelity(predicted: np.ndarray, mask: np.ndarray, classes: Mapping[str, Sequence[int]] = ORGAN_GROUPS) -> dict[str, float]:
    """Dice of each class group between a segmenter's reading of a generated image (``predicted``: class map,
    ``k + 1`` for the ``k``-th group of ``classes``) and the label map the image was conditioned on (``mask``: MAISI
    ids), for the groups the mask holds: the "does the image show what the label says" check. The segmenter is
    trained on real cases only; its Dice on held-out real cases bounds what it can tell."""
    target = class_map(mask, classes)
    scores = class_dice(predicted, target, len(classes))
    return {name: float(scores[k]) for k, name in enumerate(classes) if (target == k + 1).any()}


def label_dice(predicted: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """:func:`label_fidelity` for FID's segmenter (:func:`maisi.evaluate.segmenter.segment_volume`), whose classes
    are outside, body, then MAISI's QC organ groups."""
    return label_fidelity(np.where(predicted >= 2, predicted.astype(np.int64) - 1, 0), mask, ORGAN_GROUPS)


#: Columns of the per-case label-fidelity table (one row per case and organ group its mask holds).
FIDELITY_COLUMNS: tuple[str, ...] = ("case_id", "request", "class", "dice")


def fidelity_summary(cases: pd.DataFrame, held_out: pd.DataFrame | None, segmenter: str) -> pd.DataFrame:
    """Per organ group: the cases, mean, median and lowest Dice between the segmenter's reading of generated images
    and their masks, and (``held_out``: the utility stage's differences table) the same segmenter's mean Dice on
    held-out real cases, what it can tell at best."""
    columns = ["class", "n_cases", "dice_mean", "dice_median", "dice_min", "held_out_dice_real", "segmenter"]
    if cases.empty:
        return pd.DataFrame(columns=columns)
    dice = cases.assign(dice=numeric(cases["dice"])).groupby("class", sort=False)["dice"]
    out = pd.DataFrame({"n_cases": dice.size(), "dice_mean": dice.mean(), "dice_median": dice.median(), "dice_min": dice.min()})
    real = numeric(held_out.set_index("class")["dice_real"]) if held_out is not None and len(held_out) else pd.Series(dtype=float)
    out["held_out_dice_real"] = [float(real.get(c, np.nan)) for c in out.index]
    out["segmenter"] = segmenter
    return out.reset_index().reindex(columns=columns)


#: A segmenter's reading of a generated image: (case id, image file) -> class map on FID's grid.
Reader = Callable[[str, str], np.ndarray]


def totalseg_reader(settings: TotalSegSettings, out_root: str | os.PathLike, fid: FIDSettings, classes: Mapping[str, Sequence[int]]) -> Reader:
    """TotalSegmentator as the label-fidelity segmenter: its MAISI-id mask of each image (kept under ``out_root``,
    reused while the image and settings are the same), on FID's grid, as class groups."""
    from maisi.evaluate.features import load_label
    from maisi.prepare.totalsegmentator import segment_case

    def read(case_id: str, image: str) -> np.ndarray:
        mask = segment_case(case_id, image, Path(out_root) / f"{case_id}.nii.gz", settings)["label"]
        return class_map(load_label(mask, fid), classes)

    return read


def label_fidelity_rows(cases: pd.DataFrame, read: Reader, fid: FIDSettings, classes: Mapping[str, Sequence[int]]) -> list[dict[str, Any]]:
    """One row (:data:`FIDELITY_COLUMNS`) per released case (``case_id``, ``request``, ``image``, ``label``) and organ
    group its mask holds."""
    from maisi.evaluate.features import load_label

    rows = []
    for r in cases.itertuples():
        for name, dice in label_fidelity(read(str(r.case_id), str(r.image)), load_label(r.label, fid), classes).items():
            rows.append({"case_id": r.case_id, "request": r.request, "class": name, "dice": dice})
    return rows
