"""The downstream-utility experiment: three arms, one budget, held-out real cases, paired bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.volumes import organ_body

from maisi.evaluate.fidelity import class_map
from maisi.evaluate.qc import ORGAN_GROUPS
from maisi.evaluate.utility import UtilityBudget, bootstrap_difference, utility_experiment

LUNG, LIVER = ORGAN_GROUPS["lung"][0], ORGAN_GROUPS["liver"][0]
CLASSES = {"lung": ORGAN_GROUPS["lung"], "liver": ORGAN_GROUPS["liver"]}


def _case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A body with lungs, a liver (brighter than the phantom's, for the small budget) and a spine, varying with the seed."""
    return organ_body(seed, liver_hu=160.0)


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


def test_an_arm_saved_and_loaded_predicts_the_same(tmp_path):
    """The workflow trains each arm in a job of its own: the checkpoint (with its sidecar) gives back the same
    network, classes, budget and arm; evaluation refuses a missing arm."""
    from maisi.core.io import read_json, sha256_file
    from maisi.evaluate.utility import (
        arm_cases,
        evaluate_arms,
        load_segmentation,
        predict_classes,
        save_segmentation,
        train_segmentation,
    )

    budget = UtilityBudget(steps=2, crop=(32, 32, 32), init_filters=8)
    model = train_segmentation(arm_cases("real", [_case(0)], [], CLASSES), 2, budget, "real")
    save_segmentation(model, tmp_path / "real.pt", CLASSES, budget, "real", ["s/a"])
    loaded, record = load_segmentation(tmp_path / "real.pt")
    assert record["arm"] == "real" and record["budget"] == budget and record["classes"] == CLASSES
    hu = _case(5)[0]
    assert np.array_equal(predict_classes(model, hu, budget), predict_classes(loaded, hu, budget))
    side = read_json(tmp_path / "real.pt.json")
    assert side["cases"] == ["s/a"] and side["sha256"] == sha256_file(tmp_path / "real.pt")
    with pytest.raises(ValueError, match="synthetic have no network"):
        evaluate_arms({"real": loaded, "real+synthetic": loaded}, {"h": _case(1)}, CLASSES, budget)
    (tmp_path / "bad.pt").write_bytes(b"no")
    with pytest.raises(ValueError, match="not a utility segmentation checkpoint"):
        load_segmentation(tmp_path / "bad.pt")
