"""FID's independent segmenter (maisi.evaluate.segmenter): targets, slice sampling, training, its cache and its features."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.volumes import organ_body as _case

from maisi.core.io import read_json, save_nifti, sha256_file
from maisi.evaluate import fid
from maisi.evaluate import segmenter as seg
from maisi.evaluate.qc import ORGAN_GROUPS
from maisi.evaluate.settings import FIDSettings, SegmenterSettings
from maisi.models.checkpoints import CheckpointError

KEEP = FIDSettings(extractors=("segmenter",), spacing=None, size=None, central_fraction=1.0, batch_size=16, device="cpu")
LUNG, BONE, LIVER = ORGAN_GROUPS["lung"][0], ORGAN_GROUPS["bone"][0], ORGAN_GROUPS["liver"][0]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("real")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    images, labels = [], []
    for i in range(4):
        hu, label = _case(i)
        images.append(save_nifti(hu, affine, root / f"img{i}.nii.gz", np.int16))
        labels.append(save_nifti(label, affine, root / f"lab{i}.nii.gz", np.uint8))
    return {"images": images, "labels": labels}


SETTINGS = SegmenterSettings(steps=200, batch_size=8, lr=3e-3, init_filters=8, seed=0, cache=None, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cases) -> tuple[Path, dict, Path]:
    root = tmp_path_factory.mktemp("segmenter")
    settings = SegmenterSettings(**{**SETTINGS.to_dict(), "cache": str(root / "cache")})
    meta = seg.train_segmenter(cases["images"], cases["labels"], settings, KEEP, root / "segmenter.pt", losses=root / "losses.png")
    return root / "segmenter.pt", meta, root / "cache"


def test_tissue_classes_known_answer():
    hu = np.full((6, 6, 1), -1000.0)
    hu[1:5, 1:5] = 40.0
    hu[2, 2] = -850.0  # a lung voxel inside the body (holes of the body are filled)
    label = np.zeros((6, 6, 1), np.uint8)
    label[2, 2], label[3, 3], label[1, 4] = LUNG, ORGAN_GROUPS["kidney"][1], 7  # 7: an organ outside the QC groups
    out = seg.tissue_classes(hu, label)
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 1 and out[1, 4, 0] == 1
    assert out[2, 2, 0] == seg.CLASSES.index("lung") and out[3, 3, 0] == seg.CLASSES.index("kidney")
    assert seg.CLASSES[:2] == ("outside", "body") and set(seg.CLASSES[2:]) == set(ORGAN_GROUPS)
    body = np.zeros((6, 6, 1), np.uint8)
    body[1:5, 1:5] = 1  # the lung voxel is a hole of the body
    np.testing.assert_array_equal(seg.tissue_classes(hu, None), body)


def test_hu_windows():
    x = seg.hu_windows(torch.tensor([[[-1000.0, -850.0, 40.0, 1000.0]]]))
    assert x.shape == (1, len(seg.WINDOWS), 1, 4)
    np.testing.assert_allclose(x[0, :, 0].numpy(), [[0, 0.075, 0.52, 1], [0, 0.25, 1, 1], [0, 0, 0.5, 1], [0, 0, 0, 1]], atol=1e-6)


def test_real_slices_targets_and_organ_centred_sampling(cases):
    data = seg.RealSlices(cases["images"], cases["labels"], KEEP)
    assert data.target == "labels" and data.classes == list(seg.CLASSES) and data.shape == (32, 32)
    hu, label = _case(0)
    np.testing.assert_array_equal(data.targets[0], seg.tissue_classes(hu, label))
    x, y = data.sample(torch.Generator().manual_seed(3), 64)
    assert x.shape == (64, len(seg.WINDOWS), 32, 32) and y.shape == (64, 1, 32, 32) and y.dtype == torch.int64
    x2, y2 = data.sample(torch.Generator().manual_seed(3), 64)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # the generator decides everything
    liver = seg.CLASSES.index("liver")
    balanced = float((y == liver).any(dim=(1, 2, 3)).float().mean())
    data.organ_voxels = [[] for _ in data.organ_voxels]  # uniform slices only
    _, y3 = data.sample(torch.Generator().manual_seed(3), 64)
    uniform = float((y3 == liver).any(dim=(1, 2, 3)).float().mean())
    assert balanced > uniform + 0.1, (balanced, uniform)


def test_real_slices_without_labels_segment_the_body(cases):
    data = seg.RealSlices(cases["images"][:2], [None, None], KEEP)
    assert data.target == "body" and data.classes == ["outside", "body"]
    assert set(np.unique(data.targets[0])) == {0, 1}
    mixed = seg.RealSlices(cases["images"][:2], [cases["labels"][0], None], KEEP)  # unlabelled cases left out
    assert mixed.cases == [cases["images"][0]] and mixed.target == "labels"


def test_segmenter_learns_the_real_tissues(trained):
    path, meta, _ = trained
    dice = meta["dice_training_cases"]
    # body, lungs and liver are learned within 200 steps (the thin spine not yet); an untrained network scores near 0
    assert dice["body"] > 0.9 and dice["lung"] > 0.8 and dice["liver"] > 0.5, dice
    assert meta["target"] == "labels" and meta["cache"]["reused"] is False and meta["final_loss"] < meta["first_loss"]
    saved = read_json(path.with_name(path.name + ".json"))
    assert saved["sha256"] == sha256_file(path) and saved["key"] == meta["key"] and "provenance" in saved
    assert (path.parent / "losses.png").stat().st_size > 0


def test_segmenter_cache_reuses_by_data_hash(tmp_path, trained, cases, caplog):
    path, meta, cache = trained
    assert (cache / f"{meta['key']}.pt").is_file()
    settings = SegmenterSettings(**{**SETTINGS.to_dict(), "cache": str(cache)})
    again = seg.train_segmenter(cases["images"], cases["labels"], settings, KEEP, tmp_path / "again.pt")
    assert again["cache"]["reused"] is True and again["key"] == meta["key"] and again["dice_training_cases"] == meta["dice_training_cases"]
    assert sha256_file(tmp_path / "again.pt") == sha256_file(path)
    # another label file, other settings or another preprocessing: another key
    other = seg.segmenter_key(cases["images"], cases["labels"][:3], settings, KEEP)
    assert other != meta["key"]
    assert seg.segmenter_key(cases["images"], cases["labels"], SegmenterSettings(**{**settings.to_dict(), "steps": 201}), KEEP) != meta["key"]
    assert seg.segmenter_key(cases["images"], cases["labels"], settings, FIDSettings(spacing=(2.0, 2.0, 2.0), size=None)) != meta["key"]
    # the cache folder and device are not part of the key
    assert seg.segmenter_key(cases["images"], cases["labels"], SegmenterSettings(**{**settings.to_dict(), "cache": None}), KEEP) == meta["key"]
    # a damaged cache entry is trained again, with a warning that names it
    bad_cache = tmp_path / "bad"
    bad_cache.mkdir()
    (bad_cache / f"{meta['key']}.pt").write_bytes(b"not a checkpoint")
    quick = SegmenterSettings(**{**SETTINGS.to_dict(), "cache": str(bad_cache)})
    with caplog.at_level(logging.WARNING, logger="maisi.evaluate.segmenter"):
        redone = seg.train_segmenter(cases["images"], cases["labels"], quick, KEEP, tmp_path / "redone.pt")
    assert redone["cache"]["reused"] is False and "unreadable" in caplog.text and meta["key"] in caplog.text
    first, second = (torch.load(f, weights_only=True)["state_dict"] for f in (path, tmp_path / "redone.pt"))
    assert max(float((first[k].float() - second[k].float()).abs().max()) for k in first) < 1e-3  # same seed and settings


def test_segmenter_features_are_the_encoders_deepest_map(trained):
    path, _, _ = trained
    ex = seg.SegmenterFeatures(path, KEEP)
    hu, _ = _case(7)
    feats = ex.plane_features(hu)
    assert {k: v.shape for k, v in feats.items()} == {p: (32, 64) for p in fid.PLANES}
    model = seg.build_segmenter(len(seg.CLASSES), 8)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval()
    with torch.no_grad():
        deepest, _ = model.encode(seg.hu_windows(torch.from_numpy(np.moveaxis(hu, 2, 0))))
    np.testing.assert_allclose(feats["axial"], deepest.mean(dim=(2, 3)).double().numpy(), rtol=1e-5, atol=1e-6)
    info = ex.describe()
    assert info["name"] == "fid-segmenter" and info["feature_dim"] == 64 and info["checkpoint_sha256"] == sha256_file(path)
    with pytest.raises(CheckpointError, match=r"fid\.spacing"):
        seg.SegmenterFeatures(path, FIDSettings(spacing=(3.0, 3.0, 3.0), size=None, device="cpu"))


def test_segmenter_fid_orders_sets(tmp_path, trained):
    path, _, _ = trained
    ex = seg.SegmenterFeatures(path, KEEP)
    rng = np.random.default_rng(5)
    sets: dict[str, list[np.ndarray]] = {"real": [], "mirrored": [], "no lungs": [], "noise": []}
    for i in range(6):
        hu, label = _case(10 + i)
        no_lungs = hu.copy()
        no_lungs[label == LUNG] = 30.0  # lungs filled with soft tissue
        for name, vol in (("real", hu), ("mirrored", hu[:, ::-1]), ("no lungs", no_lungs), ("noise", rng.uniform(-1000, 1000, hu.shape))):
            sets[name].append(ex.plane_features(np.ascontiguousarray(vol, dtype=np.float32)))
    feats = {name: fid._stack(v) for name, v in sets.items()}
    d = {name: fid._plane_fids(feats["real"], feats[name])["average"] for name in ("mirrored", "no lungs", "noise")}
    # the same anatomy mirrored is near, the anatomy without lungs farther, noise farthest
    assert d["mirrored"] < 0.5 * d["no lungs"] and 10 * d["no lungs"] < d["noise"], d

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    real = [save_nifti(_case(10 + i)[0], affine, tmp_path / "real" / f"r{i}.nii.gz", np.int16) for i in range(4)]
    noise = [save_nifti(rng.uniform(-1000, 1000, (32, 32, 32)), affine, tmp_path / "gen" / f"g{i}.nii.gz", np.int16) for i in range(2)]
    settings = FIDSettings(**{**KEEP.to_dict(), "extractors": ("segmenter", "autoencoder")})
    with pytest.raises(ValueError, match="autoencoder"):
        fid.compute_fid(noise, real, settings, segmenter=path, progress=False)
    (entry,) = fid.compute_fid(noise, real, KEEP, segmenter=path, progress=False)["extractors"]
    assert entry["extractor"]["name"] == "fid-segmenter" and entry["feature_dim"] == 64
    assert entry["fid"]["average"] > 10 * entry["real_floor"]["average"]


def test_label_fidelity_reads_what_the_image_shows(trained):
    """The segmenter's reading of an unseen case agrees with the case's own label map and not with a mirrored one
    (the liver lies on one side): the label-fidelity check tells an image that shows its mask from one that does not."""
    from maisi.evaluate.fidelity import label_dice

    checkpoint, _, _ = trained
    model = seg.SegmenterFeatures(checkpoint, KEEP).model
    hu, label = _case(10)
    predicted = seg.segment_volume(model, hu, "cpu", batch_size=8)
    assert predicted.shape == hu.shape and predicted.dtype == np.uint8
    own = label_dice(predicted, label)
    mirrored = label_dice(predicted, np.ascontiguousarray(label[::-1]))
    assert set(own) == {"lung", "liver", "bone"}
    assert own["lung"] > 0.7 and own["liver"] > 0.5
    assert mirrored["liver"] < own["liver"] - 0.3
    with pytest.raises(ValueError, match="one grid"):
        label_dice(predicted, label[:-1])
