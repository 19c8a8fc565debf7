"""Unit tests of maisi.prepare.totalsegmentator that need no model: weights checks, offline set-up, mapping, masks."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from maisi.core.labels import BODY, label_id
from maisi.prepare.totalsegmentator import (
    ModelInfo,
    SegmentationError,
    TotalSegSettings,
    WeightsError,
    check_scan_size,
    check_weights,
    expected_labels,
    maisi_mask,
    offline_environment,
    task_folder,
    torch_device,
    totalseg_lut,
    weights_url,
)
from maisi.sources.converters import totalseg_mapping

TRAINER_297 = "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres"


def _fake_model(weights, task_id=297, labels=None, patch=(32, 32, 32), spacing=(3.0, 3.0, 3.0), trainer=TRAINER_297):
    """Only the files check_weights reads (the real loading is tested with a tiny real model elsewhere)."""
    model = weights / task_folder(task_id) / trainer
    (model / "fold_0").mkdir(parents=True)
    labels = expected_labels(task_id) if labels is None else labels
    (model / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **{n: i for i, n in labels.items()}}}), encoding="utf-8")
    (model / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"spacing": spacing, "patch_size": patch}}}), encoding="utf-8")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"")
    return model


def test_every_totalsegmentator_class_is_mapped_without_collisions():
    from totalsegmentator.map_to_binary import class_map

    mapping, _ = totalseg_mapping()
    installed = set(class_map["total"].values())
    assert installed == set(mapping), "maisi/data/totalseg_to_maisi.json must map or drop (null) every 'total' class"
    targets = [v for v in mapping.values() if v]
    assert len(targets) == len(set(targets)), "two TotalSegmentator classes map to the same MAISI id"
    lut = totalseg_lut()
    assert lut[0] == 0
    inv = {v: k for k, v in class_map["total"].items()}
    assert lut[inv["liver"]] == label_id("liver") and lut[inv["vertebrae_T6"]] == label_id("vertebrae T6")
    assert lut[inv["lung_upper_lobe_left"]] == label_id("left lung upper lobe")


def test_check_weights_accepts_a_complete_folder(tmp_path):
    _fake_model(tmp_path)
    (info,) = check_weights(tmp_path, "fast")
    assert isinstance(info, ModelInfo) and info.task_id == 297 and info.n_classes == 117 and info.patch_size == (32, 32, 32)


def test_check_weights_names_the_missing_folder_and_how_to_get_it(tmp_path):
    with pytest.raises(WeightsError) as info:
        check_weights(tmp_path / "nowhere", "fast")
    assert "nowhere does not exist" in str(info.value) and "totalseg_download_weights -t total_fast" in str(info.value)
    with pytest.raises(WeightsError) as info:
        check_weights(tmp_path, "fast")
    msg = str(info.value)
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj is missing" in msg and weights_url(297) in msg
    _fake_model(tmp_path)
    with pytest.raises(WeightsError, match="Dataset291_TotalSegmentator_part1_organs_1559subj is missing"):
        check_weights(tmp_path, "full")


def test_check_weights_incomplete_and_wrong_version(tmp_path):
    model = _fake_model(tmp_path)
    (model / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(WeightsError, match="checkpoint_final.pth is missing"):
        check_weights(tmp_path, "fast")

    old = tmp_path / "old"
    labels = {i: n for i, n in expected_labels(297).items() if i <= 104}  # a release with fewer classes
    _fake_model(old, labels=labels)
    with pytest.raises(WeightsError, match="not the version this TotalSegmentator expects: its dataset.json has 104 classes"):
        check_weights(old, "fast")

    stale = tmp_path / "stale"
    _fake_model(stale)
    (stale / "Dataset297_TotalSegmentator_total_3mm_1559subj_v204").mkdir()
    with pytest.raises(WeightsError, match="_v204 is from an earlier TotalSegmentator release"):
        check_weights(stale, "fast")


def test_offline_environment_disables_statistics_and_downloads(tmp_path, monkeypatch):
    import totalsegmentator.python_api as api

    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", "/elsewhere")
    settings = TotalSegSettings(weights=str(tmp_path / "w"), home=str(tmp_path / "home"))
    original = api.download_pretrained_weights
    with offline_environment(settings):
        assert os.environ["TOTALSEG_WEIGHTS_PATH"] == str(tmp_path / "w")
        assert os.environ["TOTALSEG_HOME_DIR"] == str(tmp_path / "home")
        config = json.loads((tmp_path / "home" / "config.json").read_text(encoding="utf-8"))
        assert config["send_usage_stats"] is False and config["statistics_disclaimer_shown"] is True
        with pytest.raises(WeightsError, match="does not exist"):
            api.download_pretrained_weights(297)  # checks, never downloads
        with pytest.raises(WeightsError, match="does not provide offline"):
            api.download_pretrained_weights(300)
    assert api.download_pretrained_weights is original
    assert "TOTALSEG_WEIGHTS_PATH" not in os.environ and os.environ["TOTALSEG_HOME_DIR"] == "/elsewhere"


def test_torch_device():
    assert torch_device("cpu") == "cpu"
    assert torch_device("cuda") == "gpu" and torch_device("cuda:1") == "gpu:1"
    assert torch_device("auto") in ("cpu", "gpu")
    with pytest.raises(ValueError, match="unknown device"):
        torch_device("tpu")


def test_check_scan_size():
    model = ModelInfo(297, "x", spacing=(3.0, 3.0, 3.0), patch_size=(112, 112, 128), n_classes=117)
    affine = np.diag([0.6, 0.6, 1.875, 1.0])
    check_scan_size((512, 512, 128), affine, model, 0.5, "ok.nii.gz")  # 307 x 307 x 240 mm
    with pytest.raises(SegmentationError) as info:
        check_scan_size((512, 512, 128), np.diag([0.6, 0.6, 0.1, 1.0]), model, 0.5, "thin.nii.gz")
    assert "thin.nii.gz: scan too small" in str(info.value) and "z 13 mm" in str(info.value)
    assert "384x336x336 mm patch" in str(info.value)


def test_maisi_mask_maps_adds_body_and_keeps_case_labels():
    from totalsegmentator.map_to_binary import class_map

    inv = {v: k for k, v in class_map["total"].items()}
    ts = np.zeros((12, 12, 4), np.uint8)
    ts[4:8, 4:8] = inv["liver"]
    ts[0, 0] = inv["spleen"]
    hu = np.full(ts.shape, -1000.0)
    hu[2:10, 2:10] = 40.0  # the body
    hu[5, 5] = -800.0  # gas inside the body still counts as body
    case_label = np.zeros(ts.shape, np.uint8)
    case_label[6, 6] = label_id("hepatic tumor")
    settings = TotalSegSettings(weights="w", home="h")
    out = maisi_mask(ts, hu, settings, case_label)
    assert out.dtype == np.uint8
    assert out[4, 4, 0] == label_id("liver") and out[0, 0, 0] == label_id("spleen")
    assert out[6, 6, 0] == label_id("hepatic tumor")
    assert out[3, 3, 0] == BODY and out[1, 1, 0] == 0
    no_body = maisi_mask(ts, hu, TotalSegSettings(weights="w", home="h", body_threshold_hu=None, keep_labels=False), case_label)
    assert BODY not in no_body and no_body[6, 6, 0] == label_id("liver")
    with pytest.raises(SegmentationError, match="differs from the scan"):
        maisi_mask(ts, hu, settings, case_label[:, :, :2])


def _block_ct(path, shape=(48, 48, 32), spacing=3.0):
    """Air around a soft-tissue body holding a lung block and a bone block."""
    hu = np.full(shape, -1000, np.int16)
    hu[8:40, 8:40, :] = 40
    hu[12:24, 12:36, 4:28] = -700
    hu[28:36, 12:36, 4:28] = 700
    affine = np.diag([spacing, spacing, spacing, 1.0])
    from maisi.core.io import save_nifti

    save_nifti(hu, affine, path, np.int16)
    return hu


def test_segment_case_with_a_tiny_real_model(tmp_path, monkeypatch):
    import requests
    from helpers.tiny_totalseg import write_tiny_model

    from maisi.prepare.totalsegmentator import segment_case

    calls = []  # TotalSegmentator swallows errors of its statistics requests, so record instead of raising
    monkeypatch.setattr(requests.Session, "request", lambda self, method, url, *a, **k: calls.append(url))

    write_tiny_model(tmp_path / "w", 297)
    hu = _block_ct(tmp_path / "ct.nii.gz")
    settings = TotalSegSettings(weights=str(tmp_path / "w"), home=str(tmp_path / "home"), device="cpu")
    dest = tmp_path / "out" / "labels" / "c1.nii.gz"
    row = segment_case("c1", tmp_path / "ct.nii.gz", dest, settings)
    mask = np.asanyarray(nib.load(dest).dataobj)
    assert mask.shape == hu.shape and mask.dtype == np.uint8
    assert np.all(mask[14:22, 14:34, 6:26] == label_id("left lung upper lobe"))
    assert np.all(mask[30:34, 14:34, 6:26] == label_id("vertebrae T6"))
    assert np.all(mask[9:11, 20:30, 10:20] == label_id("heart")) and np.all(mask[:6] == 0)
    assert json.loads(row["labels_present"]) == sorted({label_id("left lung upper lobe"), label_id("heart"), label_id("vertebrae T6")})
    assert row["ts_mode"] == "fast" and row["ts_device"] == "cpu"
    assert calls == [], f"network calls: {calls}"
    assert json.loads((tmp_path / "home" / "config.json").read_text(encoding="utf-8"))["send_usage_stats"] is False
    stamp = dest.stat().st_mtime_ns
    assert segment_case("c1", tmp_path / "ct.nii.gz", dest, settings) == row and dest.stat().st_mtime_ns == stamp

    _block_ct(tmp_path / "thin.nii.gz", shape=(48, 48, 4))
    with pytest.raises(SegmentationError, match="thin.nii.gz: scan too small"):
        segment_case("thin", tmp_path / "thin.nii.gz", tmp_path / "out" / "labels" / "thin.nii.gz", settings)
    assert not (tmp_path / "out" / "labels" / "thin.nii.gz").exists()


def test_segment_case_full_resolution_combines_the_five_models(tmp_path):
    from helpers.tiny_totalseg import task_labels, write_tiny_model

    from maisi.prepare.totalsegmentator import MODES, segment_case

    # Each part predicts its first class above a bound; later parts overwrite earlier ones, so lung
    # gets the organs part's class, soft tissue the vertebrae part's and bone the cardiac part's.
    first = {t: task_labels(t)[1] for t in MODES["full"]}
    lower = {291: -900.0, 292: -300.0, 293: 300.0, 294: 2000.0, 295: 2500.0}
    for task, bound in lower.items():
        write_tiny_model(tmp_path / "w", task, intervals=[("background", bound), (first[task], float("inf"))])
    _block_ct(tmp_path / "ct.nii.gz", shape=(32, 32, 16), spacing=4.0)
    settings = TotalSegSettings(weights=str(tmp_path / "w"), home=str(tmp_path / "home"), mode="full", device="cpu")
    dest = tmp_path / "c1.nii.gz"
    row = segment_case("c1", tmp_path / "ct.nii.gz", dest, settings)
    mask = np.asanyarray(nib.load(dest).dataobj)
    mapping, _ = totalseg_mapping()
    assert np.all(mask[14:22, 14:30, 5:11] == mapping[first[291]])  # lung block
    assert np.all(mask[9:11, 14:30, 5:11] == mapping[first[292]])  # soft tissue
    assert np.all(mask[29:31, 14:30, 5:11] == mapping[first[293]])  # bone block
    assert np.all(mask[:6] == 0) and row["ts_mode"] == "full"


def test_settings_for_the_regions_stage_and_for_qc():
    from helpers.config import validated

    cfg = validated(
        totalsegmentator={"weights": "/w", "device": "cpu"}, threads={"totalsegmentator": 3, "generate": 5},
        sources={"s": {"type": "local", "path": "/d", "images": "{case}.nii.gz", "regions": {"backend": "totalsegmentator", "mode": "full"}}},
    )  # fmt: skip
    regions = TotalSegSettings.from_config(cfg, "s")
    assert (regions.mode, regions.threads, regions.keep_labels, regions.weights) == ("full", 3, True, "/w")
    qc = TotalSegSettings.for_qc(cfg)  # image-only generated cases: the fast model, the generation job's threads
    assert (qc.mode, qc.threads, qc.keep_labels, qc.weights, qc.device) == ("fast", 5, False, "/w", "cpu")
    assert TotalSegSettings.for_qc({**cfg, "qc": {**cfg["qc"], "totalsegmentator": False}}) is None
    assert TotalSegSettings.for_qc({**cfg, "totalsegmentator": {**cfg["totalsegmentator"], "weights": None}}) is None
