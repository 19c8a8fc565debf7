"""Generation of single cases and shards with tiny models saved in the released checkpoint layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.masks import COLUMNS, mask_row, phantom

from maisi.core.anatomy import body_mask
from maisi.core.io import read_json, sidecar_path
from maisi.core.tables import read_table
from maisi.generate.augment import AugmentSettings
from maisi.generate.mask_database import build_mask_database, write_mask_database
from maisi.generate.requests import parse_requests
from maisi.generate.sampling import load_models, to_hu
from maisi.generate.settings import DecodeSettings, GenerateSettings
from maisi.generate.shard import case_paths, generate_case, generate_shard
from maisi.models.networks import build_autoencoder, build_controlnet, build_diffusion_unet

SIZE, SPACING = [32, 32, 32], [4.0, 4.0, 4.0]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random tiny-variant weights, saved as NVIDIA's released checkpoints are laid out."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    unet = build_diffusion_unet("tiny")
    paths = {k: root / f"{k}.pt" for k in ("autoencoder", "diffusion", "controlnet")}
    torch.save(build_autoencoder("tiny").state_dict(), paths["autoencoder"])
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.3), "num_train_timesteps": 1000,
                "scheduler": "rflow"}, paths["diffusion"])  # fmt: skip
    torch.save({"controlnet_state_dict": build_controlnet("tiny", unet).state_dict()}, paths["controlnet"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def mask_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    rows = [mask_row(root, "exact", phantom(32), SPACING, "chest", "abdomen"),
            mask_row(root, "coarse", phantom(24, tumour=False, lesion=False), [6.0, 6.0, 6.0], "chest", "abdomen")]  # fmt: skip
    db = root / "database.json"
    write_mask_database(build_mask_database(pd.DataFrame(rows, columns=list(COLUMNS))), db)
    return str(db)


def request(**changes):
    block = {"n_cases": 3, "size": SIZE, "spacing": SPACING, "top_region": "chest", "bottom_region": "abdomen", "steps": 3,
             "cases_per_shard": 3, **changes}  # fmt: skip
    return parse_requests({"requests": {"r": block}}, "tiny", "rflow")[0]


SETTINGS = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), augment=AugmentSettings())


@pytest.fixture(scope="module")
def models(checkpoints):
    return load_models(checkpoints["autoencoder"], checkpoints["diffusion"], checkpoints["controlnet"], "tiny", "cpu")


def _load(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def test_masked_case_outputs_and_sidecar(tmp_path, models, mask_db):
    from maisi.generate.mask_database import read_mask_database

    req = request(anatomy=["liver"], allow_tumour=True)
    case = req.cases()[0]
    row = generate_case(models, req, case, read_mask_database(mask_db), SETTINGS, tmp_path, progress=False)
    paths = case_paths(tmp_path, "r", case.case_id)
    image, img = _load(paths["image"])
    label, lab = _load(paths["label"])
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert image.shape == label.shape == tuple(SIZE)
    assert np.allclose(img.affine, lab.affine) and np.allclose(img.header.get_zooms(), SPACING)
    assert image.min() >= -1000 and image.max() <= 1000
    assert np.all(image[label == 0] == -1000)  # outside the body
    assert (label == 1).any()  # the required liver
    record = read_json(sidecar_path(paths["image"]))
    assert record["seed"] == case.seed and record["conditions"]["anatomy"] == [1]
    assert record["mask"]["case_id"] == "src/exact" and record["mask"]["resampled"] is False
    assert "augmentation" in record["mask"]
    assert set(record["checkpoints"]) == {"autoencoder", "diffusion", "controlnet"}
    assert record["timings"]["sampling_s"] > 0 and record["memory"]["peak_rss_mb"] > 0 and record["device"] == "cpu"
    assert row["mask_source"] == "src/exact"


def test_same_seed_same_case_and_rerun_is_skipped(tmp_path, models, mask_db):
    from maisi.generate.mask_database import read_mask_database

    req = request(anatomy=["liver"], allow_tumour=True)
    case = req.cases()[1]
    masks = read_mask_database(mask_db)
    for out in ("a", "b"):
        generate_case(models, req, case, masks, SETTINGS, tmp_path / out, progress=False)
    a = case_paths(tmp_path / "a", "r", case.case_id)
    b = case_paths(tmp_path / "b", "r", case.case_id)
    assert np.array_equal(_load(a["image"])[0], _load(b["image"])[0])
    assert np.array_equal(_load(a["label"])[0], _load(b["label"])[0])
    before = a["image"].stat().st_mtime_ns
    generate_case(models, req, case, masks, SETTINGS, tmp_path / "a", progress=False)
    assert a["image"].stat().st_mtime_ns == before  # outputs current: not generated again
    other = req.cases()[2]
    generate_case(models, req, other, masks, SETTINGS, tmp_path / "a", progress=False)
    assert not np.array_equal(_load(case_paths(tmp_path / "a", "r", other.case_id)["image"])[0], _load(a["image"])[0])


def test_unmasked_case_labels_the_body(tmp_path, models):
    req = request(masks=False)
    generate_case(models, req, req.cases()[0], None, SETTINGS, tmp_path, progress=False)
    image, _ = _load(case_paths(tmp_path, "r", "r_00000")["image"])
    label, _ = _load(case_paths(tmp_path, "r", "r_00000")["label"])
    assert set(np.unique(label)) <= {0, 200}
    assert np.all(image[label == 0] == -1000)
    record = read_json(sidecar_path(case_paths(tmp_path, "r", "r_00000")["image"]))
    assert record["mask"] is None and record["label_source"].startswith("body threshold")
    assert "controlnet" not in record["checkpoints"]


def test_fallback_mask_is_resampled(tmp_path, models, mask_db):
    from maisi.generate.mask_database import read_mask_database

    req = request(anatomy=["liver"], spacing=[5.0, 5.0, 5.0])  # no tumour allowed: only the coarse map
    generate_case(models, req, req.cases()[0], read_mask_database(mask_db), SETTINGS, tmp_path, progress=False)
    record = read_json(sidecar_path(case_paths(tmp_path, "r", "r_00000")["image"]))
    assert record["mask"]["case_id"] == "src/coarse" and record["mask"]["resampled"] is True


def test_shard_keeps_finished_cases_when_one_fails(tmp_path, checkpoints, mask_db):
    req = request(anatomy=["brain"], top_region="head_neck", bottom_region="abdomen", spacing=[4.0, 4.0, 10.0], n_cases=2)
    skip = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), on_error="skip")
    rows = generate_shard(req, req.cases(), checkpoints, mask_db, skip, tmp_path, tmp_path / "t.tsv", progress=False)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "brain" in rows[0]["reason"]
    table = read_table(tmp_path / "t.tsv")
    assert list(table.status) == ["failed", "failed"]
    ok = request(masks=False, n_cases=2)
    rows = generate_shard(ok, ok.cases(), checkpoints, None, skip, tmp_path, tmp_path / "u.tsv", progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    stop = GenerateSettings(variant="tiny", device="cpu", decoder=DecodeSettings(devices=("cpu",)), on_error="stop")
    with pytest.raises(RuntimeError, match="failed"):
        generate_shard(req, req.cases(), checkpoints, mask_db, stop, tmp_path, tmp_path / "v.tsv", progress=False)
    assert (tmp_path / "v.tsv").exists()  # the table still records what happened


def test_ddpm_sampler(tmp_path, checkpoints):
    ckpt = torch.load(checkpoints["diffusion"], weights_only=True)
    ckpt["scheduler"] = "ddpm"
    torch.save(ckpt, tmp_path / "ddpm.pt")
    models = load_models(checkpoints["autoencoder"], tmp_path / "ddpm.pt", None, "tiny", "cpu")
    req = parse_requests({"requests": {"d": {"n_cases": 1, "size": SIZE, "spacing": SPACING, "top_region": "chest",
                                              "bottom_region": "chest", "masks": False, "steps": 4}}}, "tiny", "ddpm")[0]  # fmt: skip
    generate_case(models, req, req.cases()[0], None, SETTINGS, tmp_path, progress=False)
    record = read_json(sidecar_path(case_paths(tmp_path, "d", "d_00000")["image"]))
    assert record["conditions"]["sampler"] == "ddpm" and record["conditions"]["steps"] == 4
    with pytest.raises(ValueError, match="differs"):
        generate_case(models, request(masks=False), request(masks=False).cases()[0], None, SETTINGS, tmp_path / "x", progress=False)


def test_hu_mapping_and_body():
    vol = np.zeros((8, 8, 8), np.float32)
    vol[2:6, 2:6, :] = 0.52
    vol[0, 0, 0] = 1.7  # clipped
    hu = to_hu(vol, None)
    assert hu.dtype == np.int16 and hu[3, 3, 3] == 40 and hu[0, 0, 0] == 1000
    body = body_mask(hu.astype(np.float32))
    assert body[3, 3, 3] and not body[7, 7, 7] and not body[0, 0, 0]  # the stray bright voxel is not the body
    assert np.all(to_hu(vol, body)[~body] == -1000)
    assert json.loads(SETTINGS.to_json())["decoder"]["method"] == "tsp"
    assert GenerateSettings.from_json(SETTINGS.to_json()) == SETTINGS


def _reference(path, liver_range):
    """A QC reference (maisi.evaluate.qc's format) whose liver range is ``liver_range``."""
    from maisi.core.io import write_json
    from maisi.evaluate.qc import REFERENCE_VERSION

    low, high = liver_range
    rng = {"organ": "liver", "labels": [1], "n": 5, "mean": (low + high) / 2, "sd": 1.0, "p005": low, "p995": high, "low": low, "high": high}
    write_json(path, {"version": REFERENCE_VERSION, "ranges": {"liver": rng}, "n_cases": 5, "too_few_cases": [], "medians": {}})
    return path


def test_case_failing_qc_is_generated_again_with_new_seeds(tmp_path, checkpoints, mask_db):
    from maisi.evaluate.qc import QCSettings
    from maisi.evaluate.qc_check import attempt_root, check_shard

    req = request(anatomy=["liver"], allow_tumour=True, n_cases=1)
    case = req.cases()[0]
    qc = QCSettings(max_attempts=3, min_inside_body=0.0)
    generate_shard(req, req.cases(), checkpoints, mask_db, SETTINGS, tmp_path / "gen", tmp_path / "gen.tsv", progress=False)
    first = case_paths(tmp_path / "gen", "r", case.case_id)["image"]
    first_mtime = first.stat().st_mtime_ns
    impossible = _reference(tmp_path / "impossible.json", (5000.0, 6000.0))

    def check(reference, root, table, models=checkpoints):
        check_shard(req, req.cases(), tmp_path / "gen.tsv", models, mask_db, SETTINGS, qc, reference, tmp_path / root, tmp_path / table,
                    progress=False)  # fmt: skip
        return read_table(tmp_path / table).iloc[0]

    row = check(impossible, "re", "a.tsv")
    assert row.qc_status == "fail" and row.attempt == "2" and "liver: median" in row.qc_reasons and json.loads(row.medians)["liver"] < 5000
    last = case_paths(attempt_root(tmp_path / "re", 2), "r", case.case_id)["image"]
    assert row.image == str(last) and row.seed == str(case.attempt_seed(2))
    record = read_json(sidecar_path(last))
    assert record["attempt"] == 2 and record["seed"] == case.attempt_seed(2) != case.seed != case.attempt_seed(1)
    assert case_paths(attempt_root(tmp_path / "re", 1), "r", case.case_id)["image"].is_file()  # every attempt is kept
    assert first.stat().st_mtime_ns == first_mtime  # generation's own outputs are never written over
    # a rerun (say after another QC setting) finds every attempt where it left it: nothing is generated again
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "re").rglob("*.nii.gz")}
    assert len(made) == 4 and check(impossible, "re", "a2.tsv").attempt == "2"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "re").rglob("*.nii.gz")} == made
    # a range every case meets: the first attempt passes, and the models are never loaded
    wide = _reference(tmp_path / "wide.json", (-1100.0, 1100.0))
    row = check(wide, "re2", "b.tsv", models={"autoencoder": "missing.pt", "diffusion": "missing.pt", "controlnet": "missing.pt"})
    assert row.qc_status == "pass" and row.attempt == "0" and row.qc_reasons == "" and row.image == str(first)
    assert not (tmp_path / "re2").exists()


def test_image_only_case_is_checked_on_totalsegmentators_masks(tmp_path, checkpoints, monkeypatch):
    """Where TotalSegmentator's weights are configured, a case without a checkable organ in its label map is
    segmented (tiny real model) and the organs found are checked; the masks go under attempt-<k>/<request>/."""
    import requests
    from helpers.tiny_totalseg import write_tiny_model

    from maisi.evaluate.qc import QCSettings
    from maisi.evaluate.qc_check import attempt_root, check_shard
    from maisi.prepare.totalsegmentator import TotalSegSettings

    monkeypatch.setattr(requests.Session, "request", lambda *a, **k: None)  # no usage-statistics request leaves the test
    write_tiny_model(tmp_path / "weights", 297)
    segmenter = TotalSegSettings(weights=str(tmp_path / "weights"), home=str(tmp_path / "home"), device="cpu", keep_labels=False)
    req = request(n_cases=1, size=[64, 64, 64], spacing=[4.0, 4.0, 4.0], masks=False)
    generate_shard(req, req.cases(), checkpoints, None, SETTINGS, tmp_path / "gen", tmp_path / "gen.tsv", progress=False)
    reference = _reference(tmp_path / "ref.json", (-1100.0, 1100.0))
    qc = QCSettings(max_attempts=1)
    check_shard(req, req.cases(), tmp_path / "gen.tsv", checkpoints, None, SETTINGS, qc, reference, tmp_path / "re", tmp_path / "q.tsv",
                progress=False, segmenter=segmenter, segmented=tmp_path / "ts")  # fmt: skip
    row = read_table(tmp_path / "q.tsv").iloc[0]
    assert row.checks == "structure,TotalSegmentator organs", row  # the reference has no intensity ranges
    assert (attempt_root(tmp_path / "ts", 0) / "r" / f"{row.case_id}.nii.gz").is_file()
    assert json.loads(row.medians) or "TotalSegmentator" in row.qc_reasons  # organs measured on its masks
    check_shard(req, req.cases(), tmp_path / "gen.tsv", checkpoints, None, SETTINGS, qc, reference, tmp_path / "re", tmp_path / "q2.tsv",
                progress=False)  # fmt: skip
    assert read_table(tmp_path / "q2.tsv").iloc[0].checks == "structure"  # without weights: no segmentation


def test_qc_shard_keeps_cases_generation_could_not_make(tmp_path, checkpoints):
    from maisi.evaluate.qc import QCSettings
    from maisi.evaluate.qc_check import check_shard

    req = request(n_cases=1)
    pd.DataFrame([{"request": "r", "case_id": req.cases()[0].case_id, "index": 0, "status": "failed", "reason": "no mask fits"}]).to_csv(
        tmp_path / "gen.tsv", sep="\t", index=False)  # fmt: skip
    reference = _reference(tmp_path / "ref.json", (-1100.0, 1100.0))
    check_shard(req, req.cases(), tmp_path / "gen.tsv", checkpoints, None, SETTINGS, QCSettings(), reference, tmp_path, tmp_path / "q.tsv",
                progress=False)  # fmt: skip
    row = read_table(tmp_path / "q.tsv").iloc[0]
    assert row.status == "failed" and row.qc_status == "fail" and row.qc_reasons == "no mask fits"
    with pytest.raises(ValueError, match="not in this shard"):
        check_shard(req, [], tmp_path / "gen.tsv", checkpoints, None, SETTINGS, QCSettings(), reference, tmp_path, tmp_path / "x.tsv")
