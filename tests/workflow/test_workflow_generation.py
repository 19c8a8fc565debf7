"""End-to-end: the default run's generated cases, QC, FID, release and report; what each kind of change reruns; refused requests."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.default_run import image_only_request
from helpers.workflow_runner import edit_config, planned_jobs, snakemake

pytestmark = pytest.mark.e2e

#: The default config's requests (config/config.yaml): a mask-conditioned one with the liver required, one without masks.
MASKED, FREE = "chest_abdomen_masked", "chest_abdomen_free"


def _requests(cfg):
    return cfg["generate"]["requests"]


def _n_generation_shards(work):
    return len(list((work / "results/generated").glob("*/shards/*.tsv")))


def test_all_generates_every_request(default_run):
    generated, cfg = default_run
    cases = pd.read_csv(generated / "results/generated/cases.tsv", sep="\t", keep_default_na=False)
    assert list(cases.case_id) == [f"{FREE}_00000", f"{FREE}_00001", f"{MASKED}_00000", f"{MASKED}_00001"]
    assert (cases.status == "ok").all()
    for r in cases.itertuples():
        img, lab = nib.load(generated / r.image), nib.load(generated / r.label)
        want = tuple(_requests(cfg)[r.request]["size"])
        assert img.shape == lab.shape == want and np.allclose(img.affine, lab.affine)
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        sidecar = json.loads((generated / f"{r.image}.json").read_text(encoding="utf-8"))
        assert sidecar["seed"] == r.seed and sidecar["decoder"]["method"] == "tsp"
        labels = np.asanyarray(lab.dataobj)
        if r.request == MASKED:
            assert r.mask_source.startswith("phantom/") and (labels == 1).any()  # the liver was required
        else:
            assert set(np.unique(labels)) <= {0, 200} and not r.mask_source
    assert (generated / "results/generated/montage.png").stat().st_size > 10_000
    assert json.loads((generated / "results/masks/database.json").read_text(encoding="utf-8"))["masks"]
    assert (generated / f"results/benchmarks/generate/{MASKED}/0000.tsv").is_file()
    assert planned_jobs(generated, "all") == {}


def test_all_ends_in_a_release_with_qc_and_fid(default_run):
    import subprocess
    import sys

    generated, cfg = default_run
    qc = pd.read_csv(generated / "results/qc/cases.tsv", sep="\t", keep_default_na=False)
    assert sorted(qc.case_id) == [f"{FREE}_00000", f"{FREE}_00001", f"{MASKED}_00000", f"{MASKED}_00001"]
    assert set(qc.release) <= {"include", "flagged"} and set(qc.qc_status) <= {"pass", "fail"}
    reference = json.loads((generated / "results/qc/reference.json").read_text(encoding="utf-8"))
    shares = {"body", "air", "fat", "soft tissue", "bone", "body_largest_share", "body_extent_z", "body_solidity"}
    assert reference["ranges"] and set(reference["intensity"]["ranges"]) == shares  # from the real phantoms
    # Every case had the intensity and one-body checks; only the mask-conditioned ones had organs to check.
    checks = {r.case_id: r.checks.split(",") for r in qc.itertuples()}
    assert all(c[:3] == ["structure", "intensity", "one body"] for c in checks.values())
    assert checks[f"{MASKED}_00000"][3:] == ["inside body", "organ HU"] and checks[f"{FREE}_00000"] == ["structure", "intensity", "one body"]
    fid = pd.read_csv(generated / "results/fid/fid.tsv", sep="\t")
    # both default extractors: the independent segmenter, then the run's own autoencoder
    assert list(fid.plane) == ["axial", "coronal", "sagittal", "average"] * 2
    assert list(fid.extractor) == ["fid-segmenter"] * 4 + ["maisi-autoencoder-encoder"] * 4
    assert np.isfinite(fid.fid).all() and (fid.real_floor >= 0).all()
    segmenter = json.loads((generated / "results/fid/segmenter/segmenter.pt.json").read_text(encoding="utf-8"))
    assert segmenter["target"] == "labels" and segmenter["dice_training_cases"]["body"] > 0.8 and segmenter["dice_training_cases"]["lung"] > 0.5
    release = generated / "results/releases/default/0.1.0"
    dataset = json.loads((release / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["numTraining"] == 4 and dataset["modality"] == {"0": "CT"} and dataset["labels"]["1"] == "liver"
    for entry in dataset["training"]:
        assert (release / entry["image"]).is_file() and (release / entry["label"]).is_file()
    card = (release / "DATACARD.md").read_text(encoding="utf-8")
    assert "NOT FOR CLINICAL USE" in card and "maisi-autoencoder-encoder" in card and "QC pass rate" in card
    provenance = json.loads((release / "provenance.json").read_text(encoding="utf-8"))
    # the released attempt of the case (QC may have generated it again with a new seed) and its sidecar
    released = qc.set_index("case_id").loc[f"{MASKED}_00000"]
    sidecar = json.loads((generated / f"{released.image}.json").read_text(encoding="utf-8"))
    assert provenance["content"]["cases"][f"{MASKED}_00000"]["seed"] == sidecar["seed"]
    assert sidecar["attempt"] == int(released.attempt)
    assert provenance["build"]["packages"]["monai"] and len(provenance["content"]["checkpoints"]) == 3
    proc = subprocess.run([sys.executable, "-m", "maisi.release", "verify", str(release)], capture_output=True, encoding="utf-8")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_report_renders_in_headless_chromium(default_run, tmp_path):
    """`snakemake --report` gives one HTML report; Chromium renders its navigation with every result
    category, and every figure embedded in it decodes as a picture."""
    import base64
    import io
    import os
    import re
    import shutil
    import subprocess

    from PIL import Image

    browser = shutil.which("chromium")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/install-browser installs it")
        pytest.skip("chromium is not installed (bash .ci/install-browser installs Debian's package)")
    generated, _ = default_run
    report = tmp_path / "report.html"
    snakemake(generated, "--report", str(report))
    html = report.read_text(encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report.as_uri()], capture_output=True, encoding="utf-8", timeout=120).stdout
    for category in ("Prepared dataset", "Training", "Generation", "Quality control", "FID"):
        assert f">{category}<" in dom, category  # rendered by the report's scripts, absent from the raw file
        assert f">{category}<" not in html
    figures = dict(re.findall(r"data:image/png;[^,]*?filename=([\w.-]+);base64,([A-Za-z0-9+/=]+)", html))
    assert {"dims_spacing.png", "montage.png", "diffusion_unet_loss.png", "hu_histograms.png", "generated_vs_real.png"} <= set(figures)
    for data in figures.values():
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.size[0] > 200 and im.size[1] > 100 and im.convert("L").getextrema()[1] > 0
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1400,900", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, cwd=tmp_path)  # fmt: skip
    with Image.open(shot) as im:
        assert len(set(im.convert("L").resize((140, 90)).getdata())) > 20  # not a blank page


def _planned_after(work, section, **values):
    """Jobs planned after changing ``section`` of the config (restored afterwards, then nothing is planned)."""
    path = work / "config" / "config.yaml"
    original = path.read_text(encoding="utf-8")
    assert planned_jobs(work, "all") == {}
    edit_config(work, section, **values)
    try:
        return planned_jobs(work, "all")
    finally:
        path.write_text(original, encoding="utf-8")
        assert planned_jobs(work, "all") == {}


def _after_qc(arms: int = 2) -> dict[str, int]:
    """What reads QC's verdicts: the FID, the privacy audit, the utility arms that learn from released cases (the
    real-only arm does not), the utility evaluation, label fidelity and the release."""
    return {"qc": 1, "fid": 1, "privacy": 1, "utility_arm": arms, "utility": 1, "label_fidelity": 1, "release": 1, "all": 1}


def _after_models(work, arms: int = 2):
    """After the models, what every change of a trained model reruns: all generation shards and what follows."""
    n = _n_generation_shards(work)
    return {"generate": n, "qc_check": n, "generated": 1, **_after_qc(arms)}


def _data_shards(work, stage):
    return len(list((work / "results" / stage / "phantom" / "shards").glob("*.tsv")))


def test_preprocessing_setting_reruns_everything_downstream(default_run):
    generated, _ = default_run
    shards = _data_shards(generated, "prepared")
    jobs = _planned_after(generated, "preprocess", hu_range=[-1000, 1500])
    assert jobs == {"preprocess": shards, "regions": shards, "dataset": 1, "dataset_summary": 1, "train_vae": 1,
                    "cache_latents": _data_shards(generated, "latents"), "train_diffusion": 1, "train_controlnet": 1,
                    "mask_database": 1, "qc_reference": 1, "fid_segmenter": 1, **_after_models(generated, arms=3)}  # fmt: skip


def test_diffusion_hyperparameter_reruns_from_diffusion_training_on(default_run):
    generated, _ = default_run
    jobs = _planned_after(generated, "train_diffusion", lr=2.0e-4)
    assert jobs == {"train_diffusion": 1, "train_controlnet": 1, **_after_models(generated)}  # not preprocessing, regions, VAE, latents


def test_qc_policy_reruns_qc_and_what_reads_its_verdicts(default_run):
    """Whether failing cases are excluded or flagged: QC, what reads the released cases and the release; no generation."""
    generated, _ = default_run
    assert _planned_after(generated, "qc", on_fail="exclude") == _after_qc()


def test_qc_threshold_reruns_qc_and_release_not_generation(default_run):
    """A QC threshold: every shard checked again (generating failing cases again is QC's part), the
    verdicts, the FID of the released cases and the release; no generation shard."""
    generated, _ = default_run
    jobs = _planned_after(generated, "qc", min_inside_body=0.9)
    assert jobs == {"qc_check": _n_generation_shards(generated), **_after_qc()}


def test_touched_script_reruns_its_stage_only(default_run, tmp_path):
    """Snakemake reruns a script rule whose script is newer than its outputs, and nothing unrelated.

    The workflow's code is copied (file times kept) and the copy's script touched, so the checkout
    that other tests run from is never changed."""
    import os
    import shutil

    from helpers.paths import ROOT

    generated, _ = default_run
    code = tmp_path / "code"
    code.mkdir()
    shutil.copy2(ROOT / "Snakefile", code / "Snakefile")
    for folder in ("rules", "workflow_scripts", "report", "config"):
        shutil.copytree(ROOT / folder, code / folder)  # copy2: file times kept
    snakefile = code / "Snakefile"
    assert planned_jobs(generated, "all", snakefile=snakefile) == {}
    os.utime(code / "workflow_scripts" / "dataset_summary.py")
    assert planned_jobs(generated, "all", snakefile=snakefile) == {"dataset_summary": 1, "all": 1}
    assert planned_jobs(generated, "all") == {}  # the checkout's own scripts are untouched


def test_more_cases_add_shards_only(default_run_record):
    """One more case of a request adds one generation shard (a copy of the default run, run again by the
    shared run's process: tests/helpers/default_run.py)."""
    run = default_run_record.derived["more_cases"]
    generated = run.work
    assert FREE == image_only_request(default_run_record.config)
    assert run.planned == {"generate": 1, "qc_check": 1, "generated": 1, **_after_qc()}
    for rel, before in run.before.items():
        assert (generated / rel).stat().st_mtime_ns == before  # the existing cases are untouched
    n = default_run_record.config["generate"]["requests"][FREE]["n_cases"]
    assert (generated / f"results/generated/{FREE}/imagesTr/{FREE}_{n:05d}.nii.gz").is_file()
    releases = generated / "results/releases/default"
    assert (releases / f"0.2.0/imagesTr/{FREE}_{n:05d}.nii.gz").is_file()
    assert not (releases / f"0.1.0/imagesTr/{FREE}_{n:05d}.nii.gz").exists()  # the earlier version is unchanged
    assert planned_jobs(generated, "all") == {}


def test_decoder_setting_reruns_generation_only(default_run):
    generated, _ = default_run
    jobs = _planned_after(generated, "generate", decoder={"method": "monai", "num_splits": 1})
    assert jobs.get("generate") == _n_generation_shards(generated) and not {"train_diffusion", "train_controlnet", "mask_database"} & set(jobs)


def test_impossible_request_stops_before_any_job(default_run):
    generated, _ = default_run
    path = generated / "config" / "config.yaml"
    original = path.read_text(encoding="utf-8")
    cfg = yaml.safe_load(original)
    cfg["generate"]["requests"][MASKED]["size"] = [64, 64, 40]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    try:
        proc = snakemake(generated, "--dry-run", "all", check=False)
        assert proc.returncode != 0
        assert f"generate.requests.{MASKED}.size" in proc.stdout + proc.stderr
        assert "latent factor 16" in proc.stdout + proc.stderr
    finally:
        path.write_text(original, encoding="utf-8")
