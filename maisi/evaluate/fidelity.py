"""Does a mask-conditioned case show what its mask says? Agreement of its organ medians with the real data's.

QC judges each organ against a range; these measures judge the generator: a model that ignores its mask
(untrained, a zeroed ControlNet conditioning, a wrong latent scale) gives organ medians that do not follow
the real ones, however wide the ranges are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from maisi.evaluate.qc import ORGAN_GROUPS

__all__ = ["OrganAgreement", "organ_agreement", "mean_agreement"]


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
