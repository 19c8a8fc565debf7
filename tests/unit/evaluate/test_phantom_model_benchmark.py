"""The phantom-model benchmark's measures (benchmarks/phantom_model.py) on known answers: organ errors against
the median of the real medians, the segmenter readings' Dice after in-plane alignment, QC reasons by kind."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from helpers.paths import ROOT

_spec = importlib.util.spec_from_file_location("phantom_model", ROOT / "benchmarks/phantom_model.py")
pm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pm)

ORGANS = ("liver", "spleen", "lung", "bone", "brain")


def test_organ_errors_are_medians_against_the_median_of_the_real_medians():
    real = {"liver": [60.0, 62.0, 70.0], "lung": [-850.0, -840.0], "bone": [300.0, 340.0, 400.0, 420.0], "brain": [30.0]}
    cases = [{"liver": 50.0, "lung": -800.0, "bone": 250.0, "heart": 40.0}, {"liver": 90.0, "bone": 400.0}, {"liver": 63.0, "bone": 380.0}]
    table = pm.organ_errors(cases, real, ORGANS, ranges={"liver": (20.0, 100.0), "bone": (260.0, 1000.0)}).set_index("organ")
    assert list(table.index) == ["liver", "lung", "bone"]  # spleen: no case, brain: no case, heart: not a QC organ
    liver, lung, bone = table.loc["liver"], table.loc["lung"], table.loc["bone"]
    assert liver.real_reference_hu == 62.0 and liver.n_cases == 3 and liver.n_real == 3
    assert liver.median_abs_error_hu == 12.0 and liver.median_signed_error_hu == 1.0  # errors -12, 28, 1
    assert liver.mean_abs_error_hu == pytest.approx(41.0 / 3) and liver.in_qc_range == 1.0
    assert lung.real_reference_hu == -845.0 and lung.median_abs_error_hu == 45.0 and np.isnan(lung.in_qc_range)
    assert bone.real_reference_hu == 370.0 and bone.median_signed_error_hu == 10.0 and bone.median_abs_error_hu == 30.0  # -120, 30, 10
    assert bone.in_qc_range == pytest.approx(2 / 3) and bone.generated_median_hu == 380.0


def _body(shape, centre, half, lung_half=0):
    """A class map: a box of body (1) around ``centre`` with a box of lung (6) inside."""
    out = np.zeros(shape, np.uint8)
    x, y, z = centre
    out[x - half : x + half, y - half : y + half, :] = 1
    if lung_half:
        out[x - lung_half : x + lung_half, y - lung_half : y + lung_half, 2:-2] = 6
    return out


def test_reading_dice_aligns_in_plane_only():
    fixed = _body((40, 40, 12), (20, 20, 0), 8, 4)
    moved = _body((40, 40, 12), (14, 25, 0), 8, 4)  # the same body 6 and 5 voxels off in-plane
    assert pm.centroid_shift(fixed > 0, moved > 0) == (6, -5)
    aligned = pm.reading_dice(fixed, moved, lung=6)
    assert aligned == {"body": 1.0, "lung": 1.0}
    grid = pm.reading_dice(fixed, moved, lung=6, align=False)
    assert grid["body"] == pytest.approx(2 * 10 * 11 / (2 * 256))  # the 16x16 boxes overlap 10x11
    assert grid["lung"] == pytest.approx(2 * 2 * 3 / 128)  # the 8x8 lungs overlap 2x3
    lower = fixed.copy()
    lower[:, :, :6] = 0  # half the body gone along z: not aligned away
    assert pm.reading_dice(fixed, lower, lung=6)["body"] == pytest.approx(2 * 6 / 18)
    assert np.isnan(pm.reading_dice(fixed, fixed, lung=None)["lung"])
    assert np.isnan(pm.dice(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))
    with pytest.raises(ValueError, match="one grid"):
        pm.reading_dice(fixed, moved[:-1], lung=6)


def test_shift_xy_moves_and_fills_with_zero():
    a = np.arange(1, 10).reshape(3, 3, 1)
    assert pm.shift_xy(a, 1, 0)[:, :, 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert pm.shift_xy(a, 0, -1)[:, :, 0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    assert not pm.shift_xy(a, 3, 0).any()



def test_qc_reasons_split_and_count_by_kind():
    text = ("fat band (-500 to -30 HU): 66.8% of the body; real cases 0.0-63.9%; liver: median -993 HU outside [20.7, 100.7]; "
            "body solidity: the body fills 28.2% of the convex hulls of its axial slices; real cases 84.3-100.0%")
    reasons = pm.split_reasons(text)
    assert len(reasons) == 3 and reasons[0] == "fat band (-500 to -30 HU): 66.8% of the body; real cases 0.0-63.9%"
    assert [pm.reason_kind(r) for r in reasons[:2]] == ["fat band (# to # HU): #% of the body; real cases #-#%", "liver: median # HU outside [#, #]"]
    assert pm.split_reasons("") == []
