"""2.5D FID (maisi.evaluate.fid): the Frechet distance, MAISI's preprocessing and both feature extractors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.config import validated

from maisi.core.checks import ConfigError, InputError
from maisi.core.io import read_json, save_nifti, sha256_file
from maisi.evaluate import fid
from maisi.models.checkpoints import CheckpointError
from maisi.models.networks import build_autoencoder

KEEP = fid.FIDSettings(extractors=("autoencoder",), spacing=None, size=None, device="cpu")


def _phantom(shape=(32, 32, 32), seed=0) -> np.ndarray:
    """Air around a textured soft-tissue ellipsoid with a bony blob; size and position vary with the seed."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.uniform(-0.15, 0.15, 3)
    r = rng.uniform(0.5, 0.8, 3)
    body = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grids, c, r, strict=True)) < 1
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[body] = 40.0 + rng.normal(0, 30, int(body.sum()))
    bone = sum((g - ci - 0.2) ** 2 for g, ci in zip(grids, c, strict=True)) < rng.uniform(0.02, 0.06)
    vol[bone & body] = 700.0
    return vol


@pytest.fixture(scope="module")
def ae_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny autoencoder, saved as maisi.train.vae saves checkpoints."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "autoencoder.pt"
    torch.save({"autoencoder_state_dict": build_autoencoder("tiny").state_dict(), "variant": "tiny", "steps": 0}, path)
    return path


# --------------------------------------------------------------------------- settings


def test_settings_from_config_and_json():
    s = fid.FIDSettings.from_config(validated(fid={"spacing": [2, 2, 2], "size": [64, 64, 32], "central_fraction": 0.5}))
    assert s.spacing == (2.0, 2.0, 2.0) and s.size == (64, 64, 32) and s.central_fraction == 0.5
    assert fid.FIDSettings.from_config(validated(fid={"spacing": None, "size": None})).spacing is None
    text = s.to_json()
    assert json.loads(text)["size"] == [64, 64, 32]
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert fid.FIDSettings.from_json(text) == s
    assert fid.FIDSettings.from_config(validated()) == fid.FIDSettings()  # the class's defaults are the schema's
    with pytest.raises(ConfigError, match="sizee"):
        validated(fid={"sizee": [1, 1, 1]})
    with pytest.raises(ValueError, match="fid.weights"):
        fid.FIDSettings(extractors=("segmenter", "radimagenet_resnet50"))
    with pytest.raises(ValueError, match="inception"):
        fid.FIDSettings(extractors=("inception",))
    with pytest.raises(ValueError, match="central_fraction"):
        fid.FIDSettings(central_fraction=0)


def test_central_range_matches_maisi():
    assert fid.central_range(256, 0.4) == (int(0.3 * 256), int(0.7 * 256)) == (76, 179)
    assert fid.central_range(10, 1.0) == (0, 10)
    assert fid.central_range(4, 0.1) == (1, 2)  # MAISI's formula gives no slice; one is kept


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_matches_monai_fidmetric():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (200, 16))
    b = rng.normal(0.3, 1.5, (300, 16)) @ rng.normal(0, 0.5, (16, 16))
    ours = fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b))
    theirs = float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)))
    assert ours > 1.0
    assert ours == pytest.approx(theirs, rel=1e-3)


def test_frechet_closed_forms():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    m = rng.normal(size=(5, 5))
    sigma = m @ m.T + 0.1 * np.eye(5)
    assert fid.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-8)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_frechet_from_large_samples_converges():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([0.5, 1.0, 0.0, 2.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 0.5, 0.5, 4.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    a = rng.normal(mu1, np.sqrt(s1), (200_000, 4))
    b = rng.normal(mu2, np.sqrt(s2), (200_000, 4))
    assert fid.frechet_distance(*fid.feature_stats(a), *fid.feature_stats(b)) == pytest.approx(expected, rel=0.02)


def test_frechet_singular_and_invalid():
    rng = np.random.default_rng(3)
    few = rng.normal(size=(5, 16))  # rank-4 covariance in 16 dimensions
    mu, sigma = fid.feature_stats(few)
    assert np.linalg.matrix_rank(sigma) < 16
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-4)
    value = fid.frechet_distance(mu, sigma, *fid.feature_stats(rng.normal(2.0, 1.0, (6, 16))))
    assert np.isfinite(value) and value > 16
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# --------------------------------------------------------------------------- load_volume


def test_load_volume_orients_to_ras(tmp_path):
    vol = np.full((8, 6, 4), -1000, np.int16)
    vol[0, 0, 0] = 500
    path = save_nifti(vol, np.diag([-1.0, -1.0, 1.0, 1.0]), tmp_path / "lps.nii.gz", np.int16)  # axes 0, 1 point L, P
    out = fid.load_volume(path, KEEP)
    assert out.dtype == np.float32 and out.shape == (8, 6, 4)
    assert out[7, 5, 0] == 500 and np.count_nonzero(out == 500) == 1


def test_load_volume_resamples(tmp_path):
    x = np.arange(20, dtype=np.float32)[:, None, None] * 10.0  # 10 HU per mm along x
    vol = np.broadcast_to(x, (20, 20, 10)).astype(np.int16)
    path = save_nifti(vol, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "ramp.nii.gz", np.int16)
    out = fid.load_volume(path, fid.FIDSettings(spacing=(2.0, 2.0, 2.0), size=None, device="cpu"))
    assert out.shape == (10, 10, 10)
    np.testing.assert_allclose(out[:, 5, 5], np.arange(10) * 20.0, atol=1e-3)


def test_load_volume_pads_with_air_crops_and_clips(tmp_path):
    vol = np.zeros((8, 8, 8), np.int16)
    vol[0, 0, 0], vol[4, 4, 4], vol[3, 3, 3] = 3000, -3000, 2
    path = save_nifti(vol, np.eye(4), tmp_path / "v.nii.gz", np.int16)
    padded = fid.load_volume(path, fid.FIDSettings(spacing=None, size=(12, 12, 12), device="cpu"))
    assert padded.shape == (12, 12, 12)
    assert (padded[:2] == -1000).all() and (padded[-2:] == -1000).all() and (padded[:, :, :2] == -1000).all()
    assert padded[2, 2, 2] == 1000 and padded[6, 6, 6] == -1000 and padded[5, 5, 5] == 2  # clipped, shifted by 2
    assert padded[2:10, 2:10, 2:10].sum() == 1000 - 1000 + 2
    cropped = fid.load_volume(path, fid.FIDSettings(spacing=None, size=(4, 4, 4), device="cpu"))
    np.testing.assert_array_equal(cropped, np.clip(vol[2:6, 2:6, 2:6], -1000, 1000))


def test_load_label_follows_its_image_grid(tmp_path):
    label = np.zeros((20, 20, 10), np.uint8)
    label[4:12, 6:14, 2:8] = 7
    label[13:17, 2:5, 1:3] = 200
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])  # axis 0 points L
    image = np.where(label > 0, 40, -1000).astype(np.int16)
    lab_path = save_nifti(label, affine, tmp_path / "lab.nii.gz", np.uint8)
    img_path = save_nifti(image, affine, tmp_path / "img.nii.gz", np.int16)
    settings = fid.FIDSettings(spacing=(2.0, 2.0, 2.0), size=(12, 12, 12), device="cpu")
    out, hu = fid.load_label(lab_path, settings), fid.load_volume(img_path, settings)
    assert out.dtype == np.uint8 and out.shape == hu.shape == (12, 12, 12)
    assert set(np.unique(out)) == {0, 7, 200}  # nearest: no new ids
    assert ((out > 0) == (hu > -500)).mean() > 0.97  # on its image's grid (orientation, spacing, padding)
    with pytest.raises(InputError, match=r"img\.nii\.gz.*0\.\.255"):
        fid.load_label(img_path, settings)


def test_load_volume_errors_name_the_file(tmp_path):
    bad = np.zeros((4, 4, 4), np.float32)
    bad[1, 1, 1] = np.nan
    nan_path = save_nifti(bad, np.eye(4), tmp_path / "nan.nii.gz", np.float32)
    with pytest.raises(InputError, match=r"nan\.nii\.gz.*NaN"):
        fid.load_volume(nan_path, KEEP)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really a NIfTI file")
    with pytest.raises(InputError, match=r"corrupt\.nii\.gz"):
        fid.load_volume(corrupt, KEEP)
    with pytest.raises(InputError, match=r"missing\.nii\.gz.*not found"):
        fid.load_volume(tmp_path / "missing.nii.gz", KEEP)


# --------------------------------------------------------------------------- autoencoder features


def test_autoencoder_features_shapes_and_layer(ae_checkpoint):
    ex = fid.AutoencoderEncoderFeatures(ae_checkpoint, "tiny", central_fraction=0.5, device="cpu")
    vol = _phantom((32, 24, 16))
    feats = ex.plane_features(vol)
    # feature map (16, 8, 6, 4); central half of each axis: z 1..3, y 1..4, x 2..6
    assert {k: v.shape for k, v in feats.items()} == {"axial": (2, 16), "coronal": (3, 16), "sagittal": (4, 16)}
    assert all(v.dtype == np.float64 for v in feats.values())
    # the layer: the encoder's blocks up to (not including) the final group norm and latent convolution
    encoder = build_autoencoder("tiny")
    encoder.load_state_dict(torch.load(ae_checkpoint, weights_only=True)["autoencoder_state_dict"])
    h = torch.from_numpy(np.clip((vol + 1000) / 2000, 0, 1).astype(np.float32))[None, None]
    with torch.no_grad():
        for block in list(encoder.encoder.blocks)[:-2]:
            h = block(h)
    assert tuple(h.shape) == (1, 16, 8, 6, 4)
    np.testing.assert_allclose(feats["axial"], h[0, :, :, :, 1:3].mean(dim=(1, 2)).T.double().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(feats["sagittal"], h[0, :, 2:6].mean(dim=(2, 3)).T.double().numpy(), rtol=1e-5, atol=1e-6)
    info = ex.describe()
    assert info["name"] == "maisi-autoencoder-encoder" and info["checkpoint_sha256"] == sha256_file(ae_checkpoint)
    assert fid.NOT_COMPARABLE in info["note"] and info["feature_dim"] == 16


def test_autoencoder_fid_orders_sets(ae_checkpoint):
    ex = fid.AutoencoderEncoderFeatures(ae_checkpoint, "tiny", central_fraction=1.0, device="cpu")
    rng = np.random.default_rng(5)
    real = [_phantom(seed=s) for s in range(6)]
    noisy = [np.clip(v + rng.normal(0, 20, v.shape), -1000, 1000).astype(np.float32) for v in real]
    shifted = [np.clip(v + 300, -1000, 1000).astype(np.float32) for v in real]

    def feats(vols):
        return fid._stack([ex.plane_features(v) for v in vols])

    f_real, f_noisy, f_shift = feats(real), feats(noisy), feats(shifted)
    assert f_real["axial"].shape == (48, 16)
    same, near, far = (fid._plane_fids(f_real, other) for other in (f_real, f_noisy, f_shift))
    for plane in (*fid.PLANES, "average"):
        assert abs(same[plane]) < 1e-6 * far[plane]
        assert near[plane] < 0.5 * far[plane]
        assert far[plane] > 0


# --------------------------------------------------------------------------- RadImageNet ResNet-50


def _sequential_resnet_file(path: Path, seed: int) -> torch.nn.Module:
    """A random torchvision ResNet-50 without classifier, saved as the hub's Sequential of the ResNet's children."""
    from torchvision.models import resnet50

    torch.manual_seed(seed)
    model = resnet50(weights=None)
    model.fc = torch.nn.Identity()
    torch.save(torch.nn.Sequential(*list(model.children())[:-2]).state_dict(), path)  # without avgpool / fc
    return model.eval()


def _maisi_reference(model: torch.nn.Module, slices: np.ndarray) -> np.ndarray:
    """MAISI's get_features_2p5d on (n, H, W) slices: 3 channels, BGR, stack min-max, minus means, spatial mean."""
    x = torch.from_numpy(slices.astype(np.float32))[:, None].repeat(1, 3, 1, 1)[:, [2, 1, 0]]
    x = (x - x.min()) / (x.max() - x.min() + 1e-10)
    for c, m in enumerate((0.406, 0.456, 0.485)):
        x[:, c] -= m
    body = torch.nn.Sequential(*list(model.children())[:-2])
    with torch.no_grad():
        return body(x).mean(dim=(2, 3)).double().numpy()


def test_radimagenet_sequential_layout_and_preprocessing(tmp_path):
    path = tmp_path / "radimagenet_seq.pth"
    model = _sequential_resnet_file(path, seed=0)
    ex = fid.RadImageNetResNet50(path, central_fraction=0.1, batch_size=4, device="cpu")
    assert ex.layout == "torchvision"
    vol = _phantom((64, 64, 64), seed=1)
    feats = ex.plane_features(vol)
    assert {k: v.shape for k, v in feats.items()} == {p: (7, 2048) for p in fid.PLANES}  # slices 28..34 of 64
    np.testing.assert_allclose(feats["axial"], _maisi_reference(model, np.moveaxis(vol[:, :, 28:35], 2, 0)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        feats["coronal"], _maisi_reference(model, np.moveaxis(vol[:, 28:35, :], 1, 0)), rtol=1e-4, atol=1e-5
    )
    assert not np.allclose(feats["axial"], feats["sagittal"])
    info = ex.describe()
    assert info["name"] == "radimagenet_resnet50" and info["weights_sha256"] == sha256_file(path)
    assert fid.NOT_COMPARABLE not in json.dumps(info)


def test_radimagenet_hub_keras_layout_and_prefixes(tmp_path):
    torch.manual_seed(1)
    keras = fid._resnet50(keras_layout=True)
    for block in keras.layer2:
        torch.nn.init.normal_(block.conv1.bias)
    path = tmp_path / "RadImageNet-ResNet50_notop.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in keras.state_dict().items()}}, path)
    ex = fid.RadImageNetResNet50(path, central_fraction=0.05, device="cpu")
    assert ex.layout == "keras"
    block = ex.model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1) and block.bn1.eps == pytest.approx(1.001e-5)
    torch.testing.assert_close(block.conv1.bias, keras.layer2[0].conv1.bias)
    feats = ex.plane_features(_phantom((32, 32, 32)))
    assert all(v.shape == (1, 2048) and np.isfinite(v).all() for v in feats.values())


def test_radimagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.pth.*fid\.weights"):
        fid.RadImageNetResNet50(tmp_path / "absent.pth", device="cpu")
    from torchvision.models import resnet18

    wrong = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth.*not a ResNet-50"):
        fid.RadImageNetResNet50(wrong, device="cpu")
    with pytest.raises(ValueError, match="autoencoder"):
        fid.build_extractor("autoencoder", fid.FIDSettings(device="cpu"))
    with pytest.raises(ValueError, match="segmenter"):
        fid.build_extractor("segmenter", fid.FIDSettings(device="cpu"))


# --------------------------------------------------------------------------- compute_fid end to end


def test_compute_fid_end_to_end(tmp_path, ae_checkpoint):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    noise = [np.random.default_rng(i).uniform(-1000, 1000, (16, 16, 16)) for i in range(3)]  # unlike any real volume
    gen = [save_nifti(v, affine, tmp_path / "gen" / f"g{i}.nii.gz", np.int16) for i, v in enumerate(noise)]
    real = [save_nifti(_phantom((16, 16, 16), seed=i), affine, tmp_path / "real" / f"r{i}.nii.gz", np.int16) for i in range(4)]
    settings = fid.FIDSettings(extractors=("autoencoder",), spacing=(2.0, 2.0, 2.0), size=(16, 16, 16), central_fraction=1.0, device="cpu")
    shuffled = [real[2], real[0], real[3], real[1]]
    result = fid.compute_fid(gen, shuffled, settings, autoencoder=ae_checkpoint, variant="tiny", progress=False)

    assert set(result) >= {"extractors", "n_generated", "n_real", "settings", "floor_split"}
    assert result["n_generated"] == 3 and result["n_real"] == 4
    (entry,) = result["extractors"]
    assert entry["n_features"]["generated"] == {p: 12 for p in fid.PLANES}  # 4 feature-map slices per volume
    assert entry["n_features"]["real_even"] == {p: 8 for p in fid.PLANES}
    assert result["floor_split"] == {"even": [str(real[0]), str(real[2])], "odd": [str(real[1]), str(real[3])]}
    assert entry["extractor"]["name"] == "maisi-autoencoder-encoder" and result["settings"]["size"] == [16, 16, 16]

    ex = fid.AutoencoderEncoderFeatures(ae_checkpoint, "tiny", 1.0, "cpu")
    per = {p: ex.plane_features(fid.load_volume(p, settings)) for p in [*gen, *real]}
    floor = fid._plane_fids(fid._stack([per[real[0]], per[real[2]]]), fid._stack([per[real[1]], per[real[3]]]))
    expected = fid._plane_fids(fid._stack([per[p] for p in gen]), fid._stack([per[p] for p in real]))
    for plane in (*fid.PLANES, "average"):
        assert entry["real_floor"][plane] == pytest.approx(floor[plane], rel=1e-6)
        assert entry["fid"][plane] == pytest.approx(expected[plane], rel=1e-6)
        assert entry["fid"][plane] > entry["real_floor"][plane] > 0  # noise is farther from the real set than its halves
    assert entry["fid"]["average"] == pytest.approx(np.mean([entry["fid"][p] for p in fid.PLANES]))

    table, js = tmp_path / "out" / "fid.tsv", tmp_path / "out" / "fid.json"
    fid.write_fid(result, table, js)
    frame = pd.read_csv(table, sep="\t")
    assert list(frame.columns) == list(fid.FID_COLUMNS)
    assert list(frame["plane"]) == ["axial", "coronal", "sagittal", "average"]
    np.testing.assert_allclose(frame["fid"], [entry["fid"][p] for p in frame["plane"]])
    np.testing.assert_allclose(frame["real_floor"], [entry["real_floor"][p] for p in frame["plane"]])
    assert list(frame["n_generated_slices"]) == [12, 12, 12, 36] and list(frame["n_real_slices"]) == [16, 16, 16, 48]
    assert set(frame["extractor"]) == {"maisi-autoencoder-encoder"}
    saved = read_json(js)
    assert saved["extractors"][0]["fid"] == pytest.approx(entry["fid"])
    assert saved["extractors"][0]["extractor"]["checkpoint_sha256"] == sha256_file(ae_checkpoint)
    assert "provenance" in saved


def test_compute_fid_needs_two_volumes_per_side(tmp_path, ae_checkpoint):
    path = save_nifti(_phantom((16, 16, 16)), np.eye(4), tmp_path / "one.nii.gz", np.int16)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_fid([path], [path, path], KEEP, autoencoder=ae_checkpoint, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute_fid([path, path], [path], KEEP, autoencoder=ae_checkpoint, progress=False)
