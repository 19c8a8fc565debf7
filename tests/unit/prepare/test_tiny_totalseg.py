"""The tiny TotalSegmentator models load in nnU-Net and run through the real TotalSegmentator python API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
pytest.importorskip("totalsegmentator")

from helpers.tiny_totalseg import TRAINERS, task_labels, write_tiny_model  # noqa: E402

AIR, LUNG, SOFT, BONE = -1000, -700, 40, 700
BLOCK_HU = np.array([AIR, LUNG, SOFT, BONE], dtype=np.int16)


def _index(task_id: int, name: str) -> int:
    """Class index of ``name`` in ``task_id`` (0 for background)."""
    return 0 if name == "background" else {v: k for k, v in task_labels(task_id).items()}[name]


def _predict_with_nnunet(model_dir: Path, hu: np.ndarray) -> np.ndarray:
    """Argmax of the network loaded by nnU-Net's own predictor, on HU values normalized as CTNormalization does."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    x = torch.from_numpy(np.clip(hu, -1024, 3071).astype(np.float32) / 1000.0)[None, None]
    with torch.no_grad():
        return predictor.network(x).argmax(1)[0].numpy()


def _block_ids(shape: tuple[int, int, int]) -> np.ndarray:
    """Block index 0..3 per voxel, asymmetric along every axis so that flips and swaps would show."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (i * 4 // shape[0] + j * 2 // shape[1] + 2 * (k * 2 // shape[2])) % 4


def _interior(shape: tuple[int, int, int], margin: tuple[int, int, int]) -> np.ndarray:
    """Voxels at least ``margin`` voxels away from every block border (and the image border is not a block border)."""
    ids = _block_ids(shape)
    keep = np.ones(shape, dtype=bool)
    for axis, m in enumerate(margin):
        for shift in range(1, m + 1):
            for sign in (1, -1):
                idx = np.clip(np.arange(shape[axis]) + sign * shift, 0, shape[axis] - 1)
                keep &= np.take(ids, idx, axis=axis) == ids
    return keep


def _write_ct(path: Path, shape: tuple[int, int, int] = (64, 64, 40), spacing: tuple[float, ...] = (1.5, 1.5, 3.0)) -> np.ndarray:
    """Synthetic CT with air, lung, soft-tissue and bone blocks in a non-canonical (LPS-like) orientation."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, 60.0, -30.0]
    ids = _block_ids(shape)
    nib.save(nib.Nifti1Image(BLOCK_HU[ids], affine), str(path))
    return ids


@pytest.fixture
def totalseg_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline TotalSegmentator home and weights folder; returns the weights folder."""
    weights, home = tmp_path / "weights", tmp_path / "home"
    weights.mkdir()
    home.mkdir()
    config = {
        "totalseg_id": "totalseg_test",
        "send_usage_stats": False,
        "prediction_counter": 0,
        "statistics_disclaimer_shown": True,
    }
    (home / "config.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(home))
    # TotalSegmentator writes these into os.environ itself; registering them here restores them afterwards
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(weights))
    return weights


def test_layout_and_pointwise_network(tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path)
    assert model == tmp_path / "Dataset297_TotalSegmentator_total_3mm_1559subj" / (
        "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"
    )
    assert {p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file()} == {
        "plans.json",
        "dataset.json",
        "fold_0/checkpoint_final.pth",
    }
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    assert plans["configurations"]["3d_fullres"]["spacing"] == [3.0, 3.0, 3.0]
    dataset = json.loads((model / "dataset.json").read_text(encoding="utf-8"))
    assert len(dataset["labels"]) == 118 and dataset["labels"]["heart"] == 51

    hu = np.arange(-1030, 3066, dtype=float).reshape(16, 16, 16)  # every integer HU, the bounds included
    expected = np.select([hu < -900, hu < -300, hu < 300], [0, 10, 51], 38)
    assert np.array_equal(_predict_with_nnunet(model, hu), expected)


def test_custom_intervals_and_labels(tmp_path: Path) -> None:
    assert TRAINERS[297] == "nnUNetTrainer_4000epochs_NoMirroring"
    assert all(TRAINERS[t] == "nnUNetTrainerNoMirroring" for t in range(291, 296))
    assert task_labels(291)[1] == "spleen" and task_labels(297)[51] == "heart"

    labels = {1: "liver", 2: "spleen", 3: "heart"}
    intervals = [("spleen", -500.0), ("background", 100.0), ("liver", math.inf)]
    model = write_tiny_model(tmp_path, 291, intervals=intervals, patch_size=(16, 16, 16), labels=labels)
    assert model.parent.name == "Dataset291_TotalSegmentator_part1_organs_1559subj"
    hu = np.linspace(-1100, 1100, 8 * 8 * 8).reshape(8, 8, 8)
    assert np.array_equal(_predict_with_nnunet(model, hu), np.select([hu < -500, hu < 100], [2, 0], 1))

    part_default = write_tiny_model(tmp_path / "default", 292, patch_size=(16, 16, 16))
    assert np.array_equal(_predict_with_nnunet(part_default, hu), (hu >= 0).astype(int))

    with pytest.raises(ValueError, match="not labels"):
        write_tiny_model(tmp_path / "bad", 297, intervals=[("background", 0.0), ("no_such_class", math.inf)])


def test_totalsegmentator_fast_runs_tiny_model(tmp_path: Path, totalseg_env: Path) -> None:
    from totalsegmentator.python_api import totalsegmentator

    write_tiny_model(totalseg_env, 297)
    ct_path = tmp_path / "ct.nii.gz"
    ids = _write_ct(ct_path)
    seg = totalsegmentator(str(ct_path), None, ml=True, fast=True, device="cpu", quiet=True, nr_thr_resamp=1, nr_thr_saving=1)

    ct = nib.load(ct_path)
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine)
    expected = np.array([0, _index(297, "lung_upper_lobe_left"), _index(297, "heart"), _index(297, "vertebrae_T6")])[ids]
    got = np.asarray(seg.dataobj).astype(int)
    interior = _interior(ct.shape, (3, 3, 2))
    assert np.array_equal(got[interior], expected[interior])
    assert (got == expected).mean() > 0.95
