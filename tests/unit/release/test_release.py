"""Versioned synthetic dataset releases: layout, manifest, provenance, data card, immutability, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.paths import ROOT

from maisi.core.io import read_json, save_nifti, sha256_file, sidecar_path, write_json
from maisi.release import build as release_build
from maisi.release import inspect
from maisi.release.build import ReleaseConflict, build_release
from maisi.release.card import datacard_body
from maisi.release.inspect import diff_releases, list_releases, verify_release

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
CONDITIONS = {"size": [8, 8, 8], "spacing": [4.0, 4.0, 4.0], "top_region": "chest", "bottom_region": "abdomen",
              "anatomy": [1], "sampler": "rflow", "steps": 3}  # fmt: skip


def write_case(gen: Path, request: str, case_id: str, seed: int, checkpoints: dict[str, str]) -> dict[str, str]:
    """A generated case as generate.py leaves it: image, label map and the image sidecar."""
    rng = np.random.default_rng(seed)
    image = gen / request / "imagesTr" / f"{case_id}.nii.gz"
    label = gen / request / "labelsTr" / f"{case_id}.nii.gz"
    save_nifti(rng.integers(-1000, 1000, (8, 8, 8)), AFFINE, image, np.int16)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:6, 2:6, 2:6] = 1
    lab[6:, 6:, 6:] = 3
    save_nifti(lab, AFFINE, label, np.uint8)
    write_json(sidecar_path(image), {
        "file": image.name, "sha256": sha256_file(image), "case_id": case_id, "request": request, "seed": seed, "attempt": 0,
        "conditions": CONDITIONS, "label_source": "mask", "checkpoints": {k: sha256_file(v) for k, v in checkpoints.items()},
        "mask": {"case_id": f"src_{seed}", "path": str(gen / "somewhere" / "mask.nii.gz"), "resampled": False},
        "provenance": {"created_utc": f"2025-01-0{1 + seed % 8}T00:00:00+00:00"},
    })  # fmt: skip
    return {"case_id": case_id, "request": request, "image": str(image), "label": str(label)}


@pytest.fixture
def gen(tmp_path):
    """A tiny generated set (3 cases kept, 1 excluded by QC), checkpoints and QC/FID tables."""
    root = tmp_path / "generated"
    models = tmp_path / "models"
    models.mkdir()
    checkpoints = {}
    for name in ("autoencoder", "diffusion", "controlnet"):
        (models / f"{name}.pt").write_bytes(name.encode() * 10)
        checkpoints[name] = str(models / f"{name}.pt")
    rows = [write_case(root, "r1", f"r1_c{i}", i, checkpoints) for i in range(3)]
    rows[0].update(qc_status="pass", qc_reasons="")
    rows[1].update(qc_status="pass", qc_reasons="")
    rows[2].update(qc_status="flagged", qc_reasons="spleen volume 3 ml below 40 ml")
    qc = tmp_path / "qc.tsv"
    pd.DataFrame([  # maisi.evaluate.qc_report.assess_generated's layouts
        {"case_id": "r1_c0", "qc_status": "pass", "release": "include", "qc_reasons": ""},
        {"case_id": "r1_c1", "qc_status": "pass", "release": "include", "qc_reasons": ""},
        {"case_id": "r1_c2", "qc_status": "fail", "release": "flagged", "qc_reasons": "spleen volume 3 ml below 40 ml"},
        {"case_id": "r1_c9", "qc_status": "fail", "release": "excluded", "qc_reasons": "liver missing"},
    ]).to_csv(qc, sep="\t", index=False)  # fmt: skip
    organs = tmp_path / "qc_organs.tsv"
    pd.DataFrame([
        {"organ": "liver", "low": -20, "high": 160, "n_reference": 5, "n_cases": 4, "n_pass": 3, "pass_rate": 0.75},
        {"organ": "spleen", "low": -40, "high": 180, "n_reference": 5, "n_cases": 4, "n_pass": 3, "pass_rate": 0.75},
        {"organ": "brain", "low": -40, "high": 180, "n_reference": 5, "n_cases": 0, "n_pass": 0, "pass_rate": ""},
    ]).to_csv(organs, sep="\t", index=False)  # fmt: skip
    fid = tmp_path / "fid.tsv"
    pd.DataFrame([  # maisi.evaluate.fid.write_fid's layout
        {"plane": p, "fid": v, "real_floor": f, "n_generated_slices": 9, "n_real_slices": 9, "extractor": "autoencoder"}
        for p, v, f in (("axial", 12.34, 1.5), ("coronal", 23.45, 2.5), ("sagittal", 34.56, 3.5), ("average", 23.45, 2.5))
    ]).to_csv(fid, sep="\t", index=False)  # fmt: skip
    kwargs = {
        "config": {"release": {"name": "synth", "version": "0.1.0"}, "generate": {"decoder": {"method": "tsp"}, "requests": {"r1": {"n_cases": 2}}}},
        "checkpoints": checkpoints, "labels": [0, 1, 3],
        "sources": [{"source": "MSD Task09 Spleen", "licence": "CC-BY-SA 4.0", "citation": "Antonelli et al., Nat Commun 2022"},
                    {"source": "TotalSegmentator", "licence": "CC-BY 4.0", "citation": "Wasserthal et al., Radiol AI 2023"}],
        "qc_table": str(qc), "qc_organs_table": str(organs), "fid_table": str(fid), "repo_dir": str(tmp_path),
    }  # fmt: skip
    return {"root": tmp_path / "releases", "generated": root, "cases": pd.DataFrame(rows), "kwargs": kwargs, "tmp": tmp_path}


def build(gen, version="0.1.0", name="synth", root=None, cases=None, **changes):
    return build_release(root or gen["root"], name, version, gen["cases"] if cases is None else cases, **{**gen["kwargs"], **changes})


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def temp_folders(gen, name="synth") -> list[Path]:
    return list((gen["root"] / name).glob(".building-*"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maisi.release", *args], capture_output=True, encoding="utf-8", cwd=ROOT, timeout=120)


# --------------------------------------------------------------------------- layout and contents


def test_layout_and_dataset_json(gen):
    result = build(gen)
    path = gen["root"] / "synth" / "0.1.0"
    assert result.path == path and result.created and result.n_cases == 3 and len(result.content_digest) == 64
    ids = ["r1_c0", "r1_c1", "r1_c2"]
    expected = {f"{d}/{c}.nii.gz" for d in ("imagesTr", "labelsTr") for c in ids}
    expected |= {"dataset.json", "provenance.json", "DATACARD.md", "qc.tsv", "qc_organs.tsv", "fid.tsv", "manifest.json"}
    assert {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} == expected
    assert not temp_folders(gen)
    ds = read_json(path / "dataset.json")
    assert ds["name"] == "synth" and ds["release"] == "0.1.0" and ds["tensorImageSize"] == "3D" and ds["modality"] == {"0": "CT"}
    assert ds["labels"] == {"0": "background", "1": "liver", "3": "spleen"}
    assert ds["numTraining"] == 3 and ds["numTest"] == 0 and ds["test"] == []
    assert ds["training"][0] == {"image": "./imagesTr/r1_c0.nii.gz", "label": "./labelsTr/r1_c0.nii.gz"}
    assert "CC-BY-SA 4.0" in ds["licence"] and "CC-BY 4.0" in ds["licence"] and ds["reference"] and ds["description"]
    # same filesystem: hard links to the generated files; released files are read-only
    src = Path(gen["cases"].image[0])
    assert (path / "imagesTr/r1_c0.nii.gz").stat().st_ino == src.stat().st_ino
    assert all(p.stat().st_mode & 0o222 == 0 for p in path.rglob("*") if p.is_file())
    assert (path / "qc.tsv").read_bytes() == Path(gen["kwargs"]["qc_table"]).read_bytes()
    assert (path / "fid.tsv").read_bytes() == Path(gen["kwargs"]["fid_table"]).read_bytes()


def test_copies_when_hard_links_fail(gen, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(release_build.os, "link", no_link)
    path = build(gen).path
    src = Path(gen["cases"].label[1])
    copy = path / "labelsTr/r1_c1.nii.gz"
    assert copy.stat().st_ino != src.stat().st_ino and copy.read_bytes() == src.read_bytes()
    assert src.stat().st_mode & 0o200  # the generated file was not made read-only


def test_manifest_hashes_every_file(gen):
    path = build(gen).path
    manifest = read_json(path / "manifest.json")
    files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == set(files)
    for rel, p in files.items():
        assert manifest["files"][rel] == {"sha256": sha256_file(p), "size": p.stat().st_size}
    assert manifest["n_cases"] == 3 and manifest["name"] == "synth" and manifest["version"] == "0.1.0"
    content = read_json(path / "provenance.json")["content"]
    assert inspect.content_digest(manifest["identity"], content) == manifest["content_digest"]
    assert manifest["identity"]["imagesTr/r1_c2.nii.gz"] == sha256_file(gen["cases"].image[2])
    assert "provenance.json" not in manifest["identity"] and "manifest.json" not in manifest["identity"]
    assert verify_release(path) == []


def test_provenance_content_and_build(gen):
    path = build(gen).path
    prov = read_json(path / "provenance.json")
    assert set(prov) == {"content", "build"}
    content, build_info = prov["content"], prov["build"]
    assert content["config"] == gen["kwargs"]["config"]
    assert content["checkpoints"] == {k: sha256_file(v) for k, v in gen["kwargs"]["checkpoints"].items()}
    case = content["cases"]["r1_c1"]
    assert case["seed"] == 1 and case["attempt"] == 0 and case["request"] == "r1" and case["conditions"] == CONDITIONS
    assert case["mask_source"] == "src_1" and "path" not in case["mask"] and case["qc_status"] == "pass"
    assert content["cases"]["r1_c2"]["qc_status"] == "flagged" and "spleen volume" in content["cases"]["r1_c2"]["qc_reasons"]
    assert not {"created_utc", "packages", "git"} & set(content)
    assert build_info["git"] == {"commit": "unknown", "dirty": "unknown"}  # tmp_path is not a git checkout
    assert build_info["packages"]["pandas"] == pd.__version__ and build_info["python"] and build_info["platform"]
    assert build_info["created_utc"].endswith("+00:00")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_build_records_git_commit_but_digest_ignores_build(gen):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, encoding="utf-8")
    if head.returncode != 0:
        pytest.skip("the checkout is not a git repository")
    a = build(gen)
    b = build(gen, root=gen["tmp"] / "elsewhere", repo_dir=str(ROOT))
    git = read_json(b.path / "provenance.json")["build"]["git"]
    assert git["commit"] == head.stdout.strip() and isinstance(git["dirty"], bool)
    assert git["commit"] in (b.path / "DATACARD.md").read_text(encoding="utf-8")
    assert a.content_digest == b.content_digest  # build info is not part of the identity


def test_datacard(gen):
    result = build(gen)
    card = (result.path / "DATACARD.md").read_text(encoding="utf-8")
    head = "\n".join(card.splitlines()[:5])
    assert "NOT FOR CLINICAL USE" in head
    assert "not for clinical use or diagnosis" in card.lower()
    assert "| r1 | 3 | [8, 8, 8] | [4.0, 4.0, 4.0] | chest -> abdomen | liver | yes |" in card
    assert "1 liver" in card and "3 spleen" in card
    assert sha256_file(gen["kwargs"]["checkpoints"]["diffusion"]) in card and "r1: sampler rflow, 3 steps" in card and "tsp" in card
    assert "QC pass rate: 50.0% (2 of 4 checked cases); 1 excluded, 1 released but flagged." in card
    assert "| liver | 75.0% | 3/4 |" in card and "| spleen | 75.0% | 3/4 |" in card
    assert "- r1_c9: liver missing" in card and "- r1_c2: spleen volume 3 ml below 40 ml" in card
    assert "| axial | 12.34 | 1.50 |" in card and "| average | 23.45 | 2.50 |" in card
    assert "Feature extractor: autoencoder." in card and "NOT comparable" in card
    assert "CC-BY-SA 4.0" in card and "Wasserthal et al., Radiol AI 2023" in card and "MAISI" in card
    assert result.content_digest in card
    body = datacard_body(card)
    assert result.content_digest not in body and "created" not in body.lower()


def test_datacard_fid_comparable_and_missing(gen):
    fid = gen["tmp"] / "fid_paper.tsv"
    pd.DataFrame([{"plane": p, "fid": v, "real_vs_real": 0.5, "feature_extractor": "radimagenet_resnet50"}
                  for p, v in (("axial", 1.0), ("coronal", 2.0), ("sagittal", 6.0))]).to_csv(fid, sep="\t", index=False)  # fmt: skip
    card = (build(gen, fid_table=str(fid)).path / "DATACARD.md").read_text(encoding="utf-8")
    assert "Feature extractor: radimagenet_resnet50." in card and "NOT comparable" not in card and "paper's feature extractor" in card
    assert "| average | 3.00 | 0.50 |" in card  # computed when the table has no average row
    other = gen["tmp"] / "fid_other.tsv"
    pd.DataFrame([{"plane": "axial", "fid": 1.0, "extractor": "radimagenet_resnet50", "comparable": "false",
                   "warning": "Resampled to 2 mm."}]).to_csv(other, sep="\t", index=False)  # fmt: skip
    card = (build(gen, version="0.3.0", fid_table=str(other)).path / "DATACARD.md").read_text(encoding="utf-8")
    assert "NOT comparable" in card and "Resampled to 2 mm." in card
    empty = gen["tmp"] / "fid_empty.tsv"
    empty.write_text("plane\tfid\n", encoding="utf-8")
    card = (build(gen, version="0.2.0", fid_table=str(empty)).path / "DATACARD.md").read_text(encoding="utf-8")
    assert "FID was not computed" in card


def test_datacard_fid_of_each_extractor(gen):
    fid = gen["tmp"] / "fid_both.tsv"
    planes = ("axial", "coronal", "sagittal", "average")
    pd.DataFrame([{"plane": p, "fid": v + k, "real_floor": 1.0, "extractor": name}
                  for k, name in ((0.0, "fid-segmenter"), (100.0, "maisi-autoencoder-encoder"))
                  for p, v in zip(planes, (1.0, 2.0, 3.0, 2.0), strict=True)]).to_csv(fid, sep="\t", index=False)  # fmt: skip
    card = (build(gen, fid_table=str(fid)).path / "DATACARD.md").read_text(encoding="utf-8")
    section = card[card.index("## FID") : card.index("## Sources")]
    # one table per extractor, in the table's order, each saying what its features are
    assert section.index("### fid-segmenter") < section.index("| average | 2.00 | 1.00 |") < section.index("### maisi-autoencoder-encoder")
    assert "| average | 102.00 | 1.00 |" in section and section.count("NOT comparable") == 2
    assert "trained on the real cases only" in section and "weak referee" in section


# --------------------------------------------------------------------------- immutability


def test_rebuild_identical_changes_nothing(gen):
    first = build(gen)
    before = snapshot(first.path)
    again = build(gen)
    assert again.created is False and again.content_digest == first.content_digest and again.path == first.path
    assert snapshot(first.path) == before
    assert not temp_folders(gen)


def test_rebuild_with_changed_case_conflicts(gen):
    first = build(gen)
    before = snapshot(first.path)
    write_case(gen["generated"], "r1", "r1_c1", 7, gen["kwargs"]["checkpoints"])  # regenerated with another seed
    with pytest.raises(ReleaseConflict) as err:
        build(gen)
    msg = str(err.value)
    assert str(first.path) in msg and "release.version" in msg
    assert "imagesTr/r1_c1.nii.gz" in msg and "files changed" in msg
    assert "cases.r1_c1.seed: 1 -> 7" in msg
    assert "imagesTr/r1_c0.nii.gz" not in msg
    assert isinstance(err.value, ValueError)
    assert snapshot(first.path) == before and not temp_folders(gen)


def test_rebuild_with_changed_config_or_cases_conflicts(gen):
    build(gen)
    config = json.loads(json.dumps(gen["kwargs"]["config"]))
    config["generate"]["requests"]["r1"]["n_cases"] = 3
    with pytest.raises(ReleaseConflict, match=r"config\.generate\.requests\.r1\.n_cases: 2 -> 3"):
        build(gen, config=config)
    with pytest.raises(ReleaseConflict, match=r"files removed \(2\)[\s\S]*imagesTr/r1_c2\.nii\.gz"):
        build(gen, cases=gen["cases"].iloc[:2])
    assert not temp_folders(gen)


def test_exception_mid_build_leaves_nothing(gen, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(release_build, "_write_manifest", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build(gen)
    assert not (gen["root"] / "synth" / "0.1.0").exists() and not temp_folders(gen)
    monkeypatch.undo()
    assert build(gen).created


CRASH = """
import json, os, sys
import pandas as pd
from maisi.release import build as release
args = json.load(open(sys.argv[1]))
release._write_manifest = lambda *a, **k: os._exit(3)
release.build_release(args["root"], "synth", "0.1.0", pd.DataFrame(args["cases"]), **args["kwargs"])
"""


def test_hard_crash_mid_build_is_cleaned_by_next_build(gen):
    spec = gen["tmp"] / "args.json"
    spec.write_text(json.dumps({"root": str(gen["root"]), "cases": gen["cases"].to_dict("records"), "kwargs": gen["kwargs"]}), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", CRASH, str(spec)], cwd=ROOT, capture_output=True, encoding="utf-8", timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert not (gen["root"] / "synth" / "0.1.0").exists()
    stale = temp_folders(gen)
    assert len(stale) == 1 and (stale[0] / "dataset.json").is_file()  # the crash left only the hidden folder
    assert list_releases(gen["root"]) == []
    result = build(gen)
    assert result.created and verify_release(result.path) == [] and not temp_folders(gen)


# --------------------------------------------------------------------------- validation


def test_invalid_inputs(gen):
    for bad in (".hidden", "a/b", "", "1 0"):
        with pytest.raises(ValueError, match="invalid release version"):
            build(gen, version=bad)
    with pytest.raises(ValueError, match="invalid release name"):
        build(gen, name="../up")
    with pytest.raises(ValueError, match="case table is empty"):
        build(gen, cases=gen["cases"].iloc[:0])
    cases = gen["cases"].copy()
    missing = Path(cases.label[1])
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build(gen, cases=cases)
    cases = gen["cases"].copy()
    cases.loc[0, "qc_status"] = "fail"
    with pytest.raises(ValueError, match="qc_status 'fail'"):
        build(gen, cases=cases.iloc[[0]])
    sidecar_path(gen["cases"].image[0]).unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        build(gen, cases=gen["cases"].iloc[[0]])
    assert list_releases(gen["root"]) == []


def test_stale_sidecar_or_other_checkpoint_is_refused(gen):
    cases = gen["cases"].iloc[[0]]
    side = sidecar_path(cases.image.iloc[0])
    record = read_json(side)
    write_json(side, {**record, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="does not match its sidecar"):
        build(gen, cases=cases)
    write_json(side, {**record, "checkpoints": {**record["checkpoints"], "diffusion": "f" * 64}})
    with pytest.raises(ValueError, match="diffusion checkpoint"):
        build(gen, cases=cases)


# --------------------------------------------------------------------------- listing, diffs, CLI


def test_list_and_diff(gen):
    build(gen, version="0.10.0")
    a = build(gen, version="0.2.0", cases=gen["cases"].iloc[:2])
    build(gen, version="0.1.0")
    build(gen, name="alpha", version="nightly")
    rows = list_releases(gen["root"])
    assert [(r["name"], r["version"]) for r in rows] == [("alpha", "nightly"), ("synth", "0.1.0"), ("synth", "0.2.0"), ("synth", "0.10.0")]
    assert rows[2]["n_cases"] == 2 and rows[2]["content_digest"] == a.content_digest and rows[2]["created_utc"]
    b_path = gen["root"] / "synth" / "0.10.0"
    diff = diff_releases(a.path, b_path)
    assert not diff["identical"]
    assert diff["files"]["added"] == ["imagesTr/r1_c2.nii.gz", "labelsTr/r1_c2.nii.gz"] and diff["files"]["removed"] == []
    assert "dataset.json" in diff["files"]["changed"]
    assert diff["content"]["version"] == {"a": "0.2.0", "b": "0.10.0"}
    assert diff["content"]["cases.r1_c2.seed"] == {"b": 2}
    assert diff["cases"]["a"] == 2 and diff["cases"]["b"] == 3 and diff["cases"]["added"] == ["r1_c2"]
    text = inspect.format_diff(diff)
    assert "cases: 2 -> 3" in text and "imagesTr/r1_c2.nii.gz" in text and 'version: "0.2.0" -> "0.10.0"' in text
    assert "cases.r1_c2.seed: (absent) -> 2" in text
    same = diff_releases(gen["root"] / "synth" / "0.1.0", build(gen, root=gen["tmp"] / "copy").path)
    assert same["identical"] and same["files"] == {"added": [], "removed": [], "changed": []} and same["content"] == {}


def test_cli_list_diff_verify(gen):
    a = build(gen)
    b = build(gen, root=gen["tmp"] / "copy")
    c = build(gen, version="0.2.0")
    out = cli("list", "--root", str(gen["root"]))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["name", "version", "n_cases", "created_utc", "content_digest"]
    assert lines[1].split()[:3] == ["synth", "0.1.0", "3"] and lines[2].split()[:2] == ["synth", "0.2.0"]
    assert a.content_digest[:16] in lines[1]
    assert "no releases" in cli("list", "--root", str(gen["tmp"] / "none")).stdout
    same = cli("diff", str(a.path), str(b.path))
    assert same.returncode == 0 and "identical" in same.stdout
    differ = cli("diff", str(a.path), str(c.path))
    assert differ.returncode == 1 and "dataset.json" in differ.stdout and "version" in differ.stdout
    ok = cli("verify", str(a.path))
    assert ok.returncode == 0 and "all files match" in ok.stdout
    tampered = a.path / "labelsTr" / "r1_c1.nii.gz"
    tampered.unlink()  # the release file is a hard link of the generated label: replace it, don't edit the source
    shutil.copyfile(gen["cases"].image[0], tampered)  # other bytes (all label maps are alike)
    os.chmod(a.path / "qc.tsv", 0o644)
    with open(a.path / "qc.tsv", "a", encoding="utf-8") as fh:
        fh.write("r1_c5\tpass\t\ttrue\ttrue\n")
    bad = cli("verify", str(a.path))
    assert bad.returncode == 1
    assert "changed: labelsTr/r1_c1.nii.gz" in bad.stdout and "changed: qc.tsv" in bad.stdout and "content digest" in bad.stdout
    assert "r1_c0" not in bad.stdout
    (a.path / "extra.txt").write_text("x", encoding="utf-8")
    (a.path / "fid.tsv").unlink()
    problems = verify_release(a.path)
    assert "unexpected: extra.txt (not in the manifest)" in problems and "missing: fid.tsv" in problems
    assert cli("verify", str(gen["tmp"])).returncode == 2


def _evaluation(gen) -> dict[str, str]:
    """The privacy, label-fidelity and utility reports in the workflow's layouts; r1_c1 is flagged as a copy."""
    tmp = gen["tmp"]
    tables = {
        "privacy": [{"case_id": f"r1_c{i}", "nearest_training": "phantom/case_0002", "distance": d, "threshold": 1.5, "held_out_rank": r,
                     "image_similarity": s, "similarity_threshold": 0.8, "flagged": str(d < 1.5), "extractor": "fid-segmenter",
                     "mask_source": m}
                    for i, d, r, s, m in ((0, 4.0, 0.5, 0.41, "phantom/case_0002"), (1, 0.2, 0.0, 0.998, ""),
                                          (2, 6.0, 1.0, 0.3, "phantom/case_0004"))],
        "privacy_held_out": [{"case_id": "phantom/case_0001", "nearest_training": "phantom/case_0003", "distance": 3.0},
                             {"case_id": "phantom/case_0005", "nearest_training": "phantom/case_0002", "distance": 5.0}],
        "fidelity_summary": [{"class": "liver", "n_cases": 3, "dice_mean": 0.61, "dice_median": 0.6, "dice_min": 0.52,
                              "held_out_dice_real": 0.8, "segmenter": "utility"}],
        "fidelity": [{"case_id": "r1_c0", "request": "r1", "class": "liver", "dice": 0.52}],
        "utility": [{"class": "liver", "n_cases": 2, "dice_real": 0.8, "dice_real+synthetic": 0.84, "dice_synthetic": 0.5,
                     "b_minus_a": 0.04, "b_minus_a_lo": -0.01, "b_minus_a_hi": 0.09, "c_minus_a": -0.3, "c_minus_a_lo": -0.4,
                     "c_minus_a_hi": -0.2}],
        "utility_dice": [{"arm": "real", "case_id": "phantom/case_0001", "class": "liver", "dice": 0.8}],
    }  # fmt: skip
    files = {}
    for key, rows in tables.items():
        files[key] = str(tmp / f"{key}.tsv")
        pd.DataFrame(rows).to_csv(files[key], sep="\t", index=False)
    files["utility_figure"] = str(tmp / "utility.png")
    Path(files["utility_figure"]).write_bytes(b"\x89PNG not really")
    return files


def test_evaluation_reports_in_the_release_and_its_data_card(gen):
    """The three reports are copied under evaluation/, the audit's columns join qc.tsv, a possible copy is flagged
    (or dropped) with its reason, and the data card states each finding with its limits."""
    from maisi.evaluate.privacy import apply_audit

    files = _evaluation(gen)
    audit = pd.read_csv(files["privacy"], sep="\t", dtype=str, keep_default_na=False)
    cases = apply_audit(gen["cases"], audit, "flag")
    flagged = cases.set_index("case_id").loc["r1_c1"]
    assert flagged.qc_status == "flagged" and "privacy: nearest training case phantom/case_0002 at distance 0.2 < 1.5" in flagged.qc_reasons
    assert list(apply_audit(gen["cases"], audit, "drop").case_id) == ["r1_c0", "r1_c2"]
    config = {**gen["kwargs"]["config"], "dataset": {"held_out": 0.2}, "privacy": {"percentile": 5, "on_copy": "flag"},
              "utility": {"steps": 60, "crop": [32, 32, 32]}}  # fmt: skip
    result = build(gen, cases=cases, evaluation=files, config=config)
    listed = sorted(p.name for p in (result.path / "evaluation").iterdir())
    assert listed == ["label_fidelity.tsv", "label_fidelity_cases.tsv", "privacy_audit.tsv", "privacy_held_out.tsv", "utility.png",
                      "utility.tsv", "utility_dice.tsv"]  # fmt: skip
    qc = pd.read_csv(result.path / "qc.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("case_id")
    assert qc.loc["r1_c1", "privacy_flagged"] == "True" and qc.loc["r1_c1", "privacy_nearest_training"] == "phantom/case_0002"
    assert qc.loc["r1_c9", "privacy_flagged"] == ""  # excluded by QC, never audited
    card = (result.path / "DATACARD.md").read_text(encoding="utf-8")
    assert "## Privacy audit (memorisation)" in card and "the 2 held-out real case(s)" in card and "threshold 1.5" in card
    assert "(correlation threshold 0.8)" in card
    assert "1 of the 2 mask-conditioned case(s) lie nearest the training case their mask came from" in card
    assert "their image correlation with it, 0.41 to 0.41, says" in card
    assert "| generated | 3 | 0.2 | 4 | 6 |" in card and "| held-out real | 2 | 3 | 4 | 5 |" in card
    assert "1 case(s) flagged:" in card and "- r1_c1: nearest phantom/case_0002, distance 0.2, image correlation 0.998" in card
    assert "| liver | 3 | 0.61 | 0.6 | 0.52 | 0.8 |" in card
    assert "| liver | 2 | 0.8 | 0.84 | 0.5 | 0.04 [-0.01, 0.09] | -0.3 [-0.4, -0.2] |" in card
    assert card.count("**Limits.**") == 3
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert "evaluation/utility.tsv" in manifest["identity"] and "evaluation/utility.png" in manifest["files"]


def test_data_card_says_why_an_evaluation_did_not_run(gen):
    config = {**gen["kwargs"]["config"], "dataset": {"held_out": 0}}
    card = (build(gen, config=config).path / "DATACARD.md").read_text(encoding="utf-8")
    assert card.count("Not run: dataset.held_out is 0") == 2 and "## Label fidelity\n\nNot run: no mask-conditioned request" in card
