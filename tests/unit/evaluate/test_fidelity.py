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


def test_label_fidelity_known_answers():
    """A reading that is the mask itself scores 1 for each group the mask holds (and nothing for groups it lacks);
    a liver shifted by half its width scores what the overlap says; FID's segmenter's class offset is undone."""
    import pandas as pd

    from maisi.evaluate.fidelity import class_dice, class_map, fidelity_summary, label_dice, label_fidelity
    from maisi.evaluate.qc import ORGAN_GROUPS

    classes = {"liver": ORGAN_GROUPS["liver"], "lung": ORGAN_GROUPS["lung"], "spleen": ORGAN_GROUPS["spleen"]}
    mask = np.zeros((10, 10, 4), np.uint8)
    mask[0:4, 0:4] = ORGAN_GROUPS["liver"][0]
    mask[6:10, 6:10] = ORGAN_GROUPS["lung"][1]
    assert label_fidelity(class_map(mask, classes), mask, classes) == {"liver": 1.0, "lung": 1.0}
    shifted = class_map(np.roll(mask, 2, axis=0), classes)  # liver rows 2-5: 2 of 4 rows overlap
    assert label_fidelity(shifted, mask, classes)["liver"] == pytest.approx(0.5)
    assert np.isnan(class_dice(np.zeros((2, 2)), np.zeros((2, 2)), 1)[0])
    fid_classes = np.where(class_map(mask) > 0, class_map(mask) + 1, 1)  # outside/body = 0/1, groups from 2
    assert label_dice(fid_classes, mask) == {"liver": 1.0, "lung": 1.0}
    cases = pd.DataFrame({"case_id": ["a", "b"], "request": ["r", "r"], "class": ["liver", "liver"], "dice": ["0.5", "0.7"]})
    held = pd.DataFrame({"class": ["liver"], "dice_real": ["0.9"]})
    row = fidelity_summary(cases, held, "utility").iloc[0]
    assert (row["n_cases"], row["dice_mean"], row["dice_min"], row["held_out_dice_real"]) == (2, pytest.approx(0.6), 0.5, 0.9)


def test_fidelity_summary_reads_an_undefined_dice_from_the_written_tables(tmp_path):
    """A class no held-out case holds and no arm predicts has a Dice of 0/0: the utility table writes it as an empty
    cell, and the summary read back from the written tables keeps it undefined instead of failing; a cell that is
    not a number at all is an error naming the column."""
    import pandas as pd

    from maisi.core.tables import numeric, read_table, write_table
    from maisi.evaluate.fidelity import fidelity_summary

    write_table([{"class": "kidney", "dice_real": float("nan")}, {"class": "lung", "dice_real": 0.8}], tmp_path / "u.tsv", "t")
    write_table([{"case_id": "a", "request": "r", "class": "kidney", "dice": float("nan")},
                 {"case_id": "a", "request": "r", "class": "lung", "dice": 0.6}], tmp_path / "c.tsv", "t")  # fmt: skip
    held = read_table(tmp_path / "u.tsv")
    assert held.loc[0, "dice_real"] == ""  # what the workflow's tables hold
    summary = fidelity_summary(read_table(tmp_path / "c.tsv"), held, "utility").set_index("class")
    assert np.isnan(summary.loc["kidney", "held_out_dice_real"]) and np.isnan(summary.loc["kidney", "dice_mean"])
    assert summary.loc["lung", "held_out_dice_real"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="'dice_real': 'n/a'"):
        numeric(pd.Series(["0.5", "n/a"], name="dice_real"))


def test_totalsegmentator_as_the_label_fidelity_segmenter(tmp_path, monkeypatch):
    """``label_fidelity.segmenter: totalsegmentator`` with a tiny real nnU-Net model (a pointwise HU classifier:
    lung lobe for -900..-300 HU, vertebra from 300 HU): an image whose mask says lung where the lung-dark block is
    and bone where the bright block is scores 1, the same image with the two labels swapped scores 0."""
    import requests
    from helpers.tiny_totalseg import write_tiny_model

    from maisi.core.io import save_nifti
    from maisi.core.labels import label_id
    from maisi.evaluate.fidelity import label_fidelity_rows, totalseg_reader
    from maisi.evaluate.qc import ORGAN_GROUPS
    from maisi.evaluate.settings import FIDSettings
    from maisi.prepare.totalsegmentator import TotalSegSettings

    monkeypatch.setattr(requests.Session, "request", lambda self, method, url, *a, **k: None)  # never the network
    write_tiny_model(tmp_path / "w", 297)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    hu = np.full((48, 48, 32), -1000, np.int16)
    hu[8:40, 8:40, :] = 40
    hu[12:24, 12:36, 4:28] = -700
    hu[28:36, 12:36, 4:28] = 700
    save_nifti(hu, affine, tmp_path / "image.nii.gz", np.int16)
    lung, bone = label_id("left lung upper lobe"), label_id("vertebrae T6")
    for name, (a, b) in {"right": (lung, bone), "swapped": (bone, lung)}.items():
        mask = np.zeros(hu.shape, np.uint8)
        mask[12:24, 12:36, 4:28], mask[28:36, 12:36, 4:28] = a, b
        save_nifti(mask, affine, tmp_path / f"{name}.nii.gz", np.uint8)
    import pandas as pd

    cases = pd.DataFrame({"case_id": ["right", "swapped"], "request": ["r", "r"], "image": [str(tmp_path / "image.nii.gz")] * 2,
                          "label": [str(tmp_path / "right.nii.gz"), str(tmp_path / "swapped.nii.gz")]})  # fmt: skip
    classes = {"lung": ORGAN_GROUPS["lung"], "bone": ORGAN_GROUPS["bone"]}
    fid = FIDSettings(extractors=("autoencoder",), spacing=(3.0, 3.0, 3.0), size=(48, 48, 32))
    settings = TotalSegSettings(weights=str(tmp_path / "w"), home=str(tmp_path / "home"), device="cpu", keep_labels=False)
    rows = label_fidelity_rows(cases, totalseg_reader(settings, tmp_path / "ts", fid, classes), fid, classes)
    dice = {(r["case_id"], r["class"]): r["dice"] for r in rows}
    assert dice[("right", "lung")] > 0.95 and dice[("right", "bone")] > 0.95
    assert dice[("swapped", "lung")] < 0.05 and dice[("swapped", "bone")] < 0.05
    assert (tmp_path / "ts" / "right.nii.gz").is_file()  # TotalSegmentator's mask kept, with its sidecar
