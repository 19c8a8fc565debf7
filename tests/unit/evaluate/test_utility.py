"""The downstream-utility experiment: three arms, one budget, held-out real cases, paired bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from maisi.evaluate.qc import ORGAN_GROUPS
from maisi.evaluate.utility import UtilityBudget, bootstrap_difference, class_map, utility_experiment

LUNG, LIVER = ORGAN_GROUPS["lung"][0], ORGAN_GROUPS["liver"][0]
CLASSES = {"lung": ORGAN_GROUPS["lung"], "liver": ORGAN_GROUPS["liver"]}


def _case(seed: int, shape=(32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A body with two lungs and a liver whose sizes and positions vary with the seed (HU, MAISI ids)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.uniform(-0.1, 0.1, 3)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    body = ((x - c[0]) / 0.8) ** 2 + ((y - c[1]) / 0.6) ** 2 < 1
    hu[body], label[body] = 30.0 + rng.normal(0, 10, int(body.sum())), 200
    r = rng.uniform(0.22, 0.3)
    for side in (-0.4, 0.4):
        lung = body & (((x - c[0] - side) / r) ** 2 + ((y - c[1]) / 0.3) ** 2 + ((z - 0.3) / 0.5) ** 2 < 1)
        hu[lung], label[lung] = -850.0 + rng.normal(0, 20, int(lung.sum())), LUNG
    liver = body & (((x - c[0] + 0.3) / 0.35) ** 2 + ((y - c[1]) / 0.3) ** 2 + ((z + 0.4) / 0.3) ** 2 < 1)
    hu[liver], label[liver] = 160.0, LIVER
    return hu, label


def test_class_map_and_bootstrap_known_answers():
    label = np.array([0, LUNG, ORGAN_GROUPS["lung"][-1], LIVER, 200])
    assert class_map(label, CLASSES).tolist() == [0, 1, 1, 2, 0]
    a = [0.5, 0.6, 0.7, np.nan]
    mean, lo, hi = bootstrap_difference(a, [0.6, 0.7, 0.8, 0.1])
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    mean, lo, hi = bootstrap_difference([0.2, 0.4, 0.6, 0.8], [0.3, 0.3, 0.9, 0.7])
    assert lo < mean < hi and mean == pytest.approx(0.05)
    assert all(np.isnan(bootstrap_difference([np.nan], [0.1])))


def test_mislabelled_synthetic_data_shows_as_a_loss():
    """Real cases teach the network; "synthetic" cases whose images do not show their labels (each image paired
    with another case's label map) teach it less: (c - a) is negative with its whole interval below 0, and the
    real arm finds the lungs and the liver of unseen cases."""
    real = [_case(i) for i in range(3)]
    images, labels = zip(*[_case(10 + i) for i in range(3)], strict=True)
    mislabelled = [(images[i], labels[(i + 1) % 3][::-1].copy()) for i in range(3)]
    held = {f"held{i}": _case(20 + i) for i in range(3)}
    budget = UtilityBudget(steps=60, batch_size=2, crop=(32, 32, 32), lr=3e-3, init_filters=8, seed=0)
    dice, diffs = utility_experiment(real, mislabelled, held, CLASSES, budget)
    assert set(dice["arm"]) == {"real", "real+synthetic", "synthetic"} and len(dice) == 3 * 3 * 2
    rows = diffs.set_index("class")
    assert rows.loc["lung", "dice_real"] > 0.7
    for organ in ("lung", "liver"):
        assert rows.loc[organ, "c_minus_a"] < 0 and rows.loc[organ, "c_minus_a_hi"] < 0
        assert rows.loc[organ, "c_minus_a_lo"] <= rows.loc[organ, "c_minus_a"] <= rows.loc[organ, "c_minus_a_hi"]


def test_no_held_out_cases_is_an_error():
    with pytest.raises(ValueError, match="held-out"):
        utility_experiment([_case(0)], [], {}, CLASSES, UtilityBudget(steps=1))
