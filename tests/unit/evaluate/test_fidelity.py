"""Organ agreement of a generated case with the real data (known answers)."""

from __future__ import annotations

import numpy as np
import pytest

from maisi.evaluate.fidelity import mean_agreement, organ_agreement

REAL = {"liver": 61.0, "spleen": 44.0, "pancreas": 35.0, "kidney": 21.0, "lung": -842.0, "bone": 338.0, "heart": 36.0}


def test_a_case_with_the_real_medians_agrees_fully():
    a = organ_agreement(dict(REAL), REAL)
    assert a.spearman == pytest.approx(1.0) and a.pearson == pytest.approx(1.0) and a.mae_hu == 0.0
    assert a.liver_minus_lung_hu == 903.0 and set(a.errors_hu) == {"liver", "spleen", "pancreas", "kidney", "lung", "bone"}  # the heart is not a QC organ


def test_errors_ranks_and_contrast_are_measured():
    flipped = {k: -v for k, v in REAL.items()}  # every order reversed
    a = organ_agreement(flipped, REAL)
    assert a.spearman == pytest.approx(-1.0) and a.liver_minus_lung_hu == -903.0
    assert a.errors_hu["lung"] == 1684.0 and a.mae_hu == pytest.approx(np.mean([122, 88, 70, 42, 1684, 676]))
    shifted = organ_agreement({k: v + 30.0 for k, v in REAL.items()}, REAL)  # a uniform bias keeps the order, costs 30 HU
    assert shifted.spearman == pytest.approx(1.0) and shifted.mae_hu == pytest.approx(30.0)
    summary = mean_agreement([organ_agreement(dict(REAL), REAL), shifted])
    assert summary["organ_mae_hu"] == pytest.approx(15.0) and summary["spearman_min"] == pytest.approx(1.0)


def test_too_few_organs_is_an_error():
    with pytest.raises(ValueError, match="only 2 organs"):
        organ_agreement({"liver": 60.0, "lung": -800.0, "unknown organ": 5.0}, REAL)
