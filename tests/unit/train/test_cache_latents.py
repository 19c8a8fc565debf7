"""The cache_latents stage (maisi.train.cache_latents) with the tiny variant and random weights."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.config import validated

from maisi.core.io import read_json, sidecar_path
from maisi.core.shards import CaseFailure
from maisi.core.tables import write_table
from maisi.models.networks import build_autoencoder
from maisi.train.cache_latents import LATENT_COLUMNS, cache_shard, encode_volume, latent_path, read_latent
from maisi.train.settings import LatentSettings

SHAPE = (64, 32, 48)
AFFINE = np.array([[2.0, 0, 0, -60.0], [0, 1.5, 0, -20.0], [0, 0, 3.0, 100.0], [0, 0, 0, 1]])
SETTINGS = LatentSettings(variant="tiny", device="cpu", roi_size=(32, 32, 32), overlap=0.25)
PREPARED_COLUMNS = ("case_id", "source", "status", "reason", "image", "dim", "spacing")


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save({"autoencoder_state_dict": build_autoencoder("tiny").state_dict()}, path)
    return path


def _image(seed: int, shape=SHAPE) -> np.ndarray:
    """A body-like blob in [0, 1] with texture, so every encoder window sees structure."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = sum(g**2 for g in grids) < 0.8
    img = np.where(body, 0.5, 0.0) + rng.uniform(0, 0.2, shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _region_row(case_id: str, status: str, top: str, bottom: str) -> dict:
    reason = "" if status == "ok" else "no marker organ"
    return {"case_id": case_id, "source": "src", "status": status, "reason": reason, "top_region": top, "bottom_region": bottom}


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """Two prepared cases, their tables (regions: one chest-abdomen, one lower body) and a checkpoint."""
    cases = []
    for i, case_id in enumerate(("ct_0000", "ct_0001")):
        path = tmp_path / "prepared" / "images" / f"{case_id}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(_image(i), AFFINE), str(path))
        cases.append({
            "case_id": case_id, "source": "src", "status": "ok", "reason": "", "image": str(path),
            "dim": json.dumps(list(SHAPE)), "spacing": json.dumps([2.0, 1.5, 3.0]),
        })  # fmt: skip
    prepared = tmp_path / "prepared.tsv"
    write_table(cases, prepared, "test", PREPARED_COLUMNS)
    regions = tmp_path / "regions.tsv"
    write_table([_region_row("ct_0000", "ok", "chest", "abdomen"), _region_row("ct_0001", "ok", "lower_body", "lower_body")],
                regions, "test")  # fmt: skip
    return {"prepared": prepared, "regions": regions, "cases": cases, "ckpt": _checkpoint(tmp_path / "ae.pt", 0),
            "out": tmp_path / "latents", "root": tmp_path}  # fmt: skip


def test_layout_shapes_affine_and_regions(dataset):
    rows = cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], SETTINGS, dataset["out"])
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(set(r) == set(LATENT_COLUMNS) for r in rows)
    latent_shape = [4, SHAPE[0] // 4, SHAPE[1] // 4, SHAPE[2] // 4]
    row = rows[0]
    assert row["latent"] == str(latent_path(dataset["out"], "src", "ct_0000"))
    assert json.loads(row["latent_shape"]) == latent_shape
    data = read_latent(row["latent"])
    for key in ("mu", "sigma"):
        assert data[key].dtype == np.float32 and list(data[key].shape) == latent_shape
        assert np.isfinite(data[key]).all()
    assert (data["sigma"] > 0).all()
    assert row["scale_hint"] == pytest.approx(float(data["mu"].std()))
    np.testing.assert_allclose(data["affine"], AFFINE)
    # latent voxel (a, b, c) sits at the centre of image voxels 4a..4a+3 (etc.)
    lat = data["latent_affine"]
    for idx in ((0, 0, 0), (3, 1, 5)):
        centre = np.asarray(idx, float) * 4 + 1.5
        np.testing.assert_allclose(lat @ [*idx, 1.0], AFFINE @ [*centre, 1.0])
    np.testing.assert_array_equal(data["dim"], SHAPE)
    np.testing.assert_allclose(data["spacing"], [2.0, 1.5, 3.0])
    np.testing.assert_array_equal(data["top_region_index"], [0, 1, 0, 0])
    np.testing.assert_array_equal(data["bottom_region_index"], [0, 0, 1, 0])
    np.testing.assert_array_equal(read_latent(rows[1]["latent"])["top_region_index"], [0, 0, 0, 1])
    assert (row["top_region"], row["bottom_region"], json.loads(row["dim"])) == ("chest", "abdomen", list(SHAPE))

    side = read_json(sidecar_path(row["latent"]))
    assert side["case_id"] == "ct_0000" and side["source"] == "src"
    assert side["latent_shape"] == latent_shape and side["dim"] == list(SHAPE)
    assert side["fingerprint"]["settings"]["roi_size"] == [32, 32, 32] and "device" not in side["fingerprint"]["settings"]
    assert set(side["layout"]) >= {"mu", "sigma", "affine", "latent_affine"}
    assert side["regions"]["top_region_index"] == [0, 1, 0, 0]
    assert "versions" in side["provenance"]


def test_settings_from_config_and_json():
    cfg = validated(cache_latents={"roi_size": [64, 64, 32], "overlap": 0.5}, model={"variant": "rflow-ct", "device": "cpu"})
    settings = LatentSettings.from_config(cfg)
    assert settings == LatentSettings(variant="rflow-ct", device="cpu", roi_size=(64, 64, 32), overlap=0.5)
    assert LatentSettings.from_json(settings.to_json()) == settings
    assert LatentSettings.from_config(validated(cache_latents={"roi_size": None})).roi_size is None
    with pytest.raises(ValueError, match="multiple of 4"):
        LatentSettings(roi_size=(64, 64, 64), overlap=0.4)  # 38-voxel step: off the latent grid
    with pytest.raises(ValueError, match="roi_size"):
        LatentSettings(roi_size=(30, 64, 64))


def _without_norms(model: torch.nn.Module) -> torch.nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    return model


def test_sliding_window_matches_whole_volume():
    torch.manual_seed(1)
    model = build_autoencoder("tiny").eval()
    image = _image(3, (64, 64, 64))
    whole_mu, whole_sigma = encode_volume(model, image, LatentSettings(roi_size=None), "cpu")
    assert whole_mu.shape == whole_sigma.shape == (4, 16, 16, 16)
    # A window as large as the volume (or larger: clipped) is the whole-volume pass.
    mu, sigma = encode_volume(model, image, LatentSettings(roi_size=(64, 64, 128)), "cpu")
    np.testing.assert_allclose(mu, whole_mu, atol=1e-5)
    np.testing.assert_allclose(sigma, whole_sigma, atol=1e-5)
    # Smaller windows differ: GroupNorm normalises each window with its own statistics (measured here:
    # mean |diff| 0.11 for mu std 0.44). Without the norms the encoder is local, and the stitched
    # windows must match the whole-volume latents up to the zero padding at window borders
    # (measured: mu max 0.075, mean 0.0037 for mu std 0.33; the same latents one voxel off along
    # any axis: mean >= 0.019, max >= 0.135).
    local = _without_norms(model)  # MONAI's encode: the streamed encoder needs the norms where the network has them
    whole_mu, whole_sigma = encode_volume(local, image, LatentSettings(roi_size=None, encoder="monai"), "cpu")
    mu, sigma = encode_volume(local, image, LatentSettings(roi_size=(32, 32, 32), overlap=0.5), "cpu")
    assert np.abs(mu - whole_mu).mean() < 0.025 * whole_mu.std()
    assert np.abs(mu - whole_mu).max() < 0.35 * whole_mu.std()
    assert np.abs(sigma - whole_sigma).mean() < 0.05 * whole_sigma.std()


def test_skip_when_unchanged_recompute_on_new_checkpoint(dataset):
    rows = cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], SETTINGS, dataset["out"])
    paths = [Path(r["latent"]) for r in rows]
    before = [os.stat(p).st_mtime_ns for p in paths]
    mu_before = read_latent(paths[0])["mu"]
    again = cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], SETTINGS, dataset["out"])
    assert again == rows
    assert [os.stat(p).st_mtime_ns for p in paths] == before
    # another device setting does not change the latents' fingerprint
    cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], LatentSettings(**{**SETTINGS.__dict__, "device": "auto"}),
                dataset["out"])  # fmt: skip
    assert [os.stat(p).st_mtime_ns for p in paths] == before

    _checkpoint(dataset["ckpt"], seed=7)  # retrained autoencoder, same path
    new = cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], SETTINGS, dataset["out"])
    assert [os.stat(p).st_mtime_ns for p in paths] != before
    assert all(os.stat(p).st_mtime_ns != b for p, b in zip(paths, before, strict=True))
    assert not np.allclose(read_latent(paths[0])["mu"], mu_before)
    assert new[0]["latent"] == rows[0]["latent"]


def test_corrupt_image_rejected_or_stops(dataset):
    bad = Path(dataset["cases"][1]["image"])
    bad.write_bytes(bad.read_bytes()[:200])  # truncated gzip
    rows = cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], SETTINGS, dataset["out"], on_error="skip")
    by_id = {r["case_id"]: r for r in rows}
    assert by_id["ct_0000"]["status"] == "ok"
    assert by_id["ct_0001"]["status"] == "rejected" and str(bad) in by_id["ct_0001"]["reason"]
    assert by_id["ct_0001"]["source"] == "src" and by_id["ct_0001"]["latent"] == ""
    assert not latent_path(dataset["out"], "src", "ct_0001").exists()
    with pytest.raises(CaseFailure, match=re.escape(str(bad))):
        cache_shard(dataset["prepared"], dataset["regions"], dataset["ckpt"], SETTINGS, dataset["out"], on_error="stop")


def test_cases_without_regions_are_not_encoded(dataset):
    regions = dataset["root"] / "regions_partial.tsv"
    write_table([_region_row("ct_0000", "rejected", "", ""), _region_row("ct_0001", "ok", "chest", "chest")], regions, "test")
    rows = cache_shard(dataset["prepared"], regions, dataset["ckpt"], SETTINGS, dataset["out"])
    assert [r["case_id"] for r in rows] == ["ct_0001"]
    assert not latent_path(dataset["out"], "src", "ct_0000").exists()
    assert latent_path(dataset["out"], "src", "ct_0001").exists()
