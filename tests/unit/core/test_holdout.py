"""The dataset-level held-out split: chosen once, recorded in the case table and datalist, refused everywhere it
would train a model (maisi.core.holdout and the stages that check it)."""

from __future__ import annotations

import json
import re
import runpy

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers.masks import COLUMNS, mask_row, phantom
from helpers.paths import ROOT

from maisi.core.checks import InputError
from maisi.core.holdout import (
    HELD_OUT,
    TRAIN,
    HeldOutLeak,
    case_files,
    case_key,
    check_not_held_out,
    choose_held_out,
    held_out_count,
    held_out_keys,
    held_out_rows,
    require_held_out,
    training_rows,
)
from maisi.core.io import save_nifti
from maisi.generate.mask_database import build_mask_database, check_held_out_masks


def test_held_out_count_known_answers():
    assert [held_out_count(n, 0.2) for n in (1, 2, 3, 7, 8, 10, 100)] == [0, 1, 1, 1, 2, 2, 20]
    assert held_out_count(8, 0.0) == 0 and held_out_count(2, 0.9) == 1  # never every case
    with pytest.raises(ValueError, match="dataset.held_out"):
        held_out_count(8, 1.0)


def test_choice_is_per_source_seeded_and_independent_of_order():
    keys = [("a", f"c{i}") for i in range(10)] + [("b", f"c{i}") for i in range(5)]
    chosen = choose_held_out(keys, 0.2, seed=0)
    assert sum(k.startswith("a/") for k in chosen) == 2 and sum(k.startswith("b/") for k in chosen) == 1
    assert choose_held_out(list(reversed(keys)), 0.2, seed=0) == chosen
    assert any(choose_held_out(keys, 0.2, seed=s) != chosen for s in (1, 2, 3))  # the seed decides
    # adding cases to one source leaves the other's choice alone
    assert {k for k in choose_held_out([*keys, ("a", "c99")], 0.2, 0) if k.startswith("b/")} == {k for k in chosen if k.startswith("b/")}


def test_strata_keep_every_field_of_view_in_training():
    """With the body-region pair as stratum, cases are held out of the largest strata first: the ten phantom cases
    (region pairs repeating every 8) lose one of each repeated pair, and all eight pairs stay in training."""
    pairs = ["hn-hn", "hn-chest", "chest-abd", "abd-lower", "lower-lower", "chest-chest", "hn-lower", "abd-abd"]
    keys = [("phantom", f"p{i}") for i in range(10)]
    strata = {f"phantom/p{i}": pairs[i % 8] for i in range(10)}
    held = choose_held_out(keys, 0.2, seed=0, strata=strata)
    assert len(held) == 2 and {strata[k] for k in held} == {"hn-hn", "hn-chest"}
    assert {strata[f"phantom/p{i}"] for i in range(10) if f"phantom/p{i}" not in held} == set(pairs)
    assert choose_held_out(keys, 0.2, seed=0) != held  # unstratified, the hash alone decides


def test_split_rows_and_the_refusal_names_the_case():
    cases = pd.DataFrame({"source": ["s"] * 3, "case_id": ["x", "y", "z"], "split": [TRAIN, HELD_OUT, TRAIN]})
    assert list(training_rows(cases).case_id) == ["x", "z"] and list(held_out_rows(cases).case_id) == ["y"]
    assert held_out_keys(cases) == {"s/y"}
    assert list(training_rows(cases.drop(columns="split")).case_id) == ["x", "y", "z"]  # tables from before the split
    check_not_held_out({"s/x": "x.nii.gz"}, {"s/y"}, "stage")
    with pytest.raises(HeldOutLeak, match=r"stage: held-out real case\(s\) s/y \(y.nii.gz\)"):
        check_not_held_out({"s/x": "x.nii.gz", "s/y": "y.nii.gz"}, {"s/y"}, "stage")
    with pytest.raises(ValueError, match="unknown split"):
        training_rows(cases.assign(split=["train", "test", "train"]))
    assert list(require_held_out(cases, "privacy").case_id) == ["y"]
    files = cases.assign(image=["x.nii.gz", "y.nii.gz", "z.nii.gz"], image_hu=["", "y_hu.nii.gz", ""], label=["xl", "yl", ""])
    assert case_files(files) == {"s/x": "x.nii.gz", "s/y": "y_hu.nii.gz", "s/z": "z.nii.gz"}  # the HU image where there is one
    assert case_files(files, labels=True) == {"s/x": ("x.nii.gz", "xl"), "s/y": ("y_hu.nii.gz", "yl")}
    with pytest.raises(InputError, match="utility needs held-out real cases.*no held-out case with a label map.*utility.enabled: false"):
        require_held_out(cases.assign(label=["a", "", "c"]), "utility", need_labels=True)
    with pytest.raises(InputError, match="set dataset.held_out above 0"):
        require_held_out(cases.assign(split=TRAIN), "privacy")


def test_dataset_records_the_split_in_the_case_table_and_datalist(tmp_path):
    from maisi.prepare.dataset import write_dataset

    prep, regs = tmp_path / "prep.tsv", tmp_path / "regs.tsv"
    rows = [{"source": "s", "case_id": f"c{i}", "status": "ok", "reason": "", "image": f"/d/c{i}.nii.gz", "image_hu": "", "label": "",
             "dim": "[8, 8, 8]", "spacing": "[1.0, 1.0, 1.0]", "labels_present": "[]"} for i in range(10)]  # fmt: skip
    pd.DataFrame(rows).to_csv(prep, sep="\t", index=False)
    pd.DataFrame([{"source": "s", "case_id": f"c{i}", "status": "ok", "top_region": "chest", "bottom_region": "abdomen",
                   "region_backend": "manual", "label": "", "label_source": "", "labels_present": ""} for i in range(10)]
                 ).to_csv(regs, sep="\t", index=False)  # fmt: skip
    out = {k: tmp_path / f"{k}.out" for k in ("datalist", "cases", "rejected")}
    cases = write_dataset([prep], [regs], 5, out["datalist"], out["cases"], out["rejected"], run_name="r", held_out=0.2, seed=3)
    held = set(cases.case_id[cases.split == HELD_OUT])
    assert len(held) == 2 and {case_key("s", c) for c in held} == choose_held_out([("s", f"c{i}") for i in range(10)], 0.2, 3)
    datalist = json.loads(out["datalist"].read_text())
    assert {e["case_id"] for e in datalist["testing"]} == held
    assert {e["case_id"] for e in datalist["training"]} == set(cases.case_id) - held
    assert all("fold" in e for e in datalist["testing"])


def test_autoencoder_refuses_a_datalist_whose_training_holds_a_held_out_case(tmp_path):
    from maisi.train.vae import read_training_images

    image = tmp_path / "a.nii.gz"
    save_nifti(np.zeros((8, 8, 8), np.int16), np.eye(4), image, np.int16)
    entry = {"image": "a.nii.gz", "source": "s", "case_id": "a"}
    (tmp_path / "ok.json").write_text(json.dumps({"training": [entry], "testing": [{**entry, "case_id": "b", "image": "b.nii.gz"}]}))
    assert read_training_images(tmp_path / "ok.json") == [image]
    (tmp_path / "bad.json").write_text(json.dumps({"training": [entry], "testing": [entry]}))
    with pytest.raises(HeldOutLeak, match="train_vae: held-out real case"):
        read_training_images(tmp_path / "bad.json")


def test_diffusion_and_controlnet_records_refuse_a_held_out_latent(tmp_path):
    from maisi.train.batches import latent_records

    latents, cases = tmp_path / "latents.tsv", tmp_path / "cases.tsv"
    pd.DataFrame({"source": ["s", "s"], "case_id": ["a", "b"], "latent": ["a.npz", "b.npz"]}).to_csv(latents, sep="\t", index=False)
    table = pd.DataFrame({"source": ["s", "s"], "case_id": ["a", "b"], "label": ["", ""], "fold": ["0", "1"], "split": [TRAIN, TRAIN]})
    table.to_csv(cases, sep="\t", index=False)
    assert list(latent_records(latents, cases).case_id) == ["a", "b"]
    table.assign(split=[TRAIN, HELD_OUT]).to_csv(cases, sep="\t", index=False)
    with pytest.raises(HeldOutLeak, match=r"diffusion / ControlNet training .* s/b \(b.npz\)"):
        latent_records(latents, cases)


def test_qc_reference_refuses_a_held_out_case():
    from maisi.evaluate.qc import QCSettings, build_reference

    with pytest.raises(HeldOutLeak, match="QC reference: held-out real case.*s/b"):
        build_reference([{"source": "s", "case_id": "b", "label": "b.nii.gz", "image": "b.nii.gz", "split": HELD_OUT}], QCSettings(), progress=False)


@pytest.fixture()
def prepared(tmp_path) -> pd.DataFrame:
    """Four labelled cases, ``d`` held out."""
    rows = [mask_row(tmp_path, c, np.roll(phantom(24, tumour=False, lesion=False), k, axis=2), (2.0, 2.0, 2.0), "chest", "abdomen")
            for k, c in enumerate("abcd")]  # fmt: skip
    cases = pd.DataFrame(rows, columns=list(COLUMNS)).astype(str)
    cases["split"] = [TRAIN, TRAIN, TRAIN, HELD_OUT]
    return cases


def _nvidia_database(tmp_path, maps: dict[str, np.ndarray]) -> tuple:
    """NVIDIA's candidate-list format: the given label maps (file name -> array) under one folder."""
    folder = tmp_path / "nvidia_masks"
    items = []
    for name, label in maps.items():
        save_nifti(label, np.diag([2.0, 2.0, 2.0, 1.0]), folder / name, np.uint8)
        items.append({"pseudo_label_filename": name, "label_list": sorted(int(v) for v in np.unique(label) if v), "dim": list(label.shape),
                      "spacing": [2.0, 2.0, 2.0], "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]})  # fmt: skip
    (tmp_path / "candidates.json").write_text(json.dumps(items))
    return tmp_path / "candidates.json", folder


def _run_mask_database_rule(tmp_path, cases: pd.DataFrame, source: str, **inputs) -> None:
    """The mask_database rule's script, run as Snakemake runs it (its ``snakemake`` object)."""
    from snakemake.iocontainers import Namedlist

    cases.to_csv(tmp_path / "cases.tsv", sep="\t", index=False)
    smk = type("Job", (), {})()
    smk.input = Namedlist(fromdict={"cases": str(tmp_path / "cases.tsv"), **{k: str(v) for k, v in inputs.items()}})
    smk.output = Namedlist(fromdict={"database": str(tmp_path / "database.json")})
    smk.params = Namedlist(fromdict={"source": source})
    smk.log = Namedlist()
    runpy.run_path(str(ROOT / "workflow_scripts/mask_database.py"), init_globals={"snakemake": smk})


def test_a_held_out_mask_in_the_database_stops_the_run(tmp_path, prepared):
    """The prepared database holds the training split only; a database given from elsewhere (NVIDIA's format) that
    holds a held-out case's label map, renamed and saved again, is refused, as is a held-out row by case id."""
    _run_mask_database_rule(tmp_path, prepared, "prepared")
    built = json.loads((tmp_path / "database.json").read_text())["masks"]
    assert sorted(m["case_id"] for m in built) == ["src/a", "src/b", "src/c"]

    held_label = np.asarray(nib.load(prepared.label[3]).dataobj)
    other = np.roll(held_label, 1, axis=0)  # a different map on the same grid passes
    candidates, folder = _nvidia_database(tmp_path, {"mask_0.nii.gz": other})
    (tmp_path / "database.json").unlink()
    _run_mask_database_rule(tmp_path, prepared, "nvidia", candidates=candidates, masks=folder)
    assert (tmp_path / "database.json").is_file()

    candidates, folder = _nvidia_database(tmp_path, {"mask_0.nii.gz": other, "mask_1.nii.gz": held_label.copy()})
    (tmp_path / "database.json").unlink()
    with pytest.raises(HeldOutLeak, match=r"mask database: held-out real case\(s\) src/d \(mask database entry nvidia/mask_1.nii.gz"):
        _run_mask_database_rule(tmp_path, prepared, "nvidia", candidates=candidates, masks=folder)
    assert not (tmp_path / "database.json").exists()  # nothing written

    with pytest.raises(HeldOutLeak, match="src/d"):  # every row, the held-out one included
        check_held_out_masks(build_mask_database(prepared), held_out_rows(prepared))


# ------------------------------------------------------------------- every route a label map takes into generation


def _prepared_from_sources(tmp_path) -> pd.DataFrame:
    """Three cases prepared as the workflow prepares them (source files, per-case records, MAISI's grid) and joined into the
    dataset's case table as the dataset rule joins them, ``p2`` held out. The sources are stored left-posterior first on
    their own grid (40 x 36 x 30 voxels, 1.5 x 1.5 x 2 mm)."""
    from helpers.volumes import organ_body, write_nifti

    from maisi.prepare.dataset import assemble
    from maisi.prepare.preprocess import PreprocessSettings, preprocess_case
    from maisi.sources.cases import CaseInput

    prepared, regions = [], []
    for i in range(3):
        hu, label = organ_body(i, shape=(40, 36, 30))
        affine = np.diag([-1.5, -1.5, 2.0, 1.0])
        image = write_nifti(tmp_path / "sources" / "images" / f"p{i}.nii.gz", hu.astype(np.int16), affine=affine)
        source_label = write_nifti(tmp_path / "sources" / "labels" / f"p{i}.nii.gz", label, affine=affine)
        row = preprocess_case(CaseInput("src", f"p{i}", str(image), str(source_label)), tmp_path / "prepared", PreprocessSettings(divisor=32))
        prepared.append({**row, "case_id": f"p{i}", "status": "ok", "reason": ""})
        regions.append({"source": "src", "case_id": f"p{i}", "status": "ok", "reason": "", "top_region": "chest", "bottom_region": "abdomen",
                        "region_backend": "labels", "label": "", "label_source": "source", "labels_present": ""})  # fmt: skip
    pd.DataFrame(prepared).to_csv(tmp_path / "prepared.tsv", sep="\t", index=False)
    pd.DataFrame(regions).to_csv(tmp_path / "regions.tsv", sep="\t", index=False)
    cases, _ = assemble([tmp_path / "prepared.tsv"], [tmp_path / "regions.tsv"], folds=1)
    cases = cases.fillna("").astype(str)
    cases["split"] = [TRAIN, TRAIN, HELD_OUT]
    return cases


def _resampled_by_the_user(source, dest, spacing=(2.0, 2.0, 2.5)):
    """``source`` resampled to another grid (nearest neighbour) with nibabel, as a user might before adding it to a database."""
    from nibabel.processing import resample_to_output

    img = resample_to_output(nib.load(str(source)), voxel_sizes=spacing, order=0)
    save_nifti(np.asarray(img.dataobj), img.affine, dest, np.uint8)
    return np.asarray(img.dataobj)


def _source_label(tmp_path, case: str):
    return tmp_path / "sources" / "labels" / f"{case}.nii.gz"


def test_a_nvidia_database_holding_a_held_out_source_label_stops_the_run(tmp_path):
    """NVIDIA's candidate list holding the held-out case's *source* label map (the one its record names), a byte-identical
    copy under another name, is refused, naming the case and the file; so is that map resampled by the user to another
    grid. Another case's map (the training split's, resampled the same way) passes."""
    import shutil

    cases = _prepared_from_sources(tmp_path)
    folder = tmp_path / "nvidia_masks"
    folder.mkdir()
    shutil.copy(_source_label(tmp_path, "p2"), folder / "mask_1.nii.gz")
    _resampled_by_the_user(_source_label(tmp_path, "p0"), folder / "mask_0.nii.gz")  # a training case: allowed here
    _resampled_by_the_user(_source_label(tmp_path, "p2"), folder / "mask_2.nii.gz")

    def nvidia_list(names):
        items = []
        for name in names:
            img = nib.load(str(folder / name))
            items.append({"pseudo_label_filename": name, "label_list": sorted(int(v) for v in np.unique(np.asarray(img.dataobj)) if v),
                          "dim": list(img.shape), "spacing": [float(s) for s in img.header.get_zooms()],
                          "top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]})  # fmt: skip
        (tmp_path / "candidates.json").write_text(json.dumps(items))
        return tmp_path / "candidates.json"

    _run_mask_database_rule(tmp_path, cases, "nvidia", candidates=nvidia_list(["mask_0.nii.gz"]), masks=folder)
    assert (tmp_path / "database.json").is_file()
    (tmp_path / "database.json").unlink()
    for name in ("mask_1.nii.gz", "mask_2.nii.gz"):
        with pytest.raises(HeldOutLeak, match=rf"mask database: held-out real case\(s\) src/p2 \(mask database entry nvidia/{name}, "
                                              rf"{folder / name}: .*src/p2's source label map .*p2.nii.gz"):  # fmt: skip
            _run_mask_database_rule(tmp_path, cases, "nvidia", candidates=nvidia_list(["mask_0.nii.gz", name]), masks=folder)
        assert not (tmp_path / "database.json").exists()


def test_the_held_out_source_map_is_found_through_the_record_the_case_table_names(tmp_path, caplog):
    """The per-case record of a held-out case (and through it its source label map) is the one the case table's ``meta``
    column names, wherever it lies; a case table without it checks the prepared map only, and says so."""
    import shutil

    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    cases = _prepared_from_sources(tmp_path)
    assert all(cases.meta.str.endswith(("p0.json", "p1.json", "p2.json")))
    copy = tmp_path / "user" / "p2_resampled.nii.gz"
    _resampled_by_the_user(_source_label(tmp_path, "p2"), copy)
    moved = tmp_path / "records" / "p2.json"
    moved.parent.mkdir()
    shutil.move(cases.meta[2], moved)
    cases.loc[2, "meta"] = str(moved)
    with pytest.raises(HeldOutLeak, match=r"src/p2 \(copy, .*src/p2's source label map"):
        check_held_out_label_maps([LabelMapRef("copy", str(copy))], held_out_rows(cases), "test")
    check_held_out_label_maps([LabelMapRef("copy", str(copy))], held_out_rows(cases.drop(columns="meta")), "test")  # prepared map only
    assert "held-out case src/p2: no per-case record" in caplog.text


def test_a_different_patient_on_the_held_out_grid_is_no_leak(tmp_path):
    """The voxel comparison does not take another patient's map on the same field of view for a copy."""
    from helpers.volumes import organ_body

    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    cases = _prepared_from_sources(tmp_path)
    for seed in range(3, 9):
        _, label = organ_body(seed, shape=(40, 36, 30))
        other = tmp_path / "other" / f"o{seed}.nii.gz"
        save_nifti(label, np.diag([-1.5, -1.5, 2.0, 1.0]), other, np.uint8)
        resampled = tmp_path / "other" / f"r{seed}.nii.gz"
        _resampled_by_the_user(other, resampled)
        check_held_out_label_maps([LabelMapRef(f"o{seed}", str(other)), LabelMapRef(f"r{seed}", str(resampled))], held_out_rows(cases), "test")


#: Organs of :func:`_patient` (MAISI id: centre and radii, in the volume's [-1, 1] coordinates).
_ORGANS = {1: (0.3, 0.0, -0.4, 0.35, 0.3, 0.3), 3: (-0.45, 0.1, -0.4, 0.15, 0.15, 0.2), 5: (0.3, -0.3, -0.7, 0.12, 0.12, 0.2),
           14: (-0.3, -0.3, -0.7, 0.12, 0.12, 0.2), 12: (-0.2, 0.2, -0.3, 0.2, 0.15, 0.15), 28: (0.4, 0.0, 0.4, 0.28, 0.3, 0.5),
           29: (-0.4, 0.0, 0.4, 0.28, 0.3, 0.5), 33: (0.0, -0.4, 0.0, 0.12, 0.12, 1.2)}  # fmt: skip


def _patient(seed: int, shape=(40, 36, 30)) -> np.ndarray:
    """A label map of one patient: body and eight organs, each organ's size (up to 25 % along each axis) and place its own."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    body = (x / rng.uniform(0.75, 0.9)) ** 2 + (y / rng.uniform(0.55, 0.7)) ** 2 < 1
    label[body] = 200
    for organ, (cx, cy, cz, rx, ry, rz) in _ORGANS.items():
        c = np.array([cx, cy, cz]) + rng.uniform(-0.06, 0.06, 3)
        r = np.array([rx, ry, rz]) * rng.uniform(0.8, 1.25, 3)
        label[body & (((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 < 1)] = organ
    return label


def test_the_voxel_comparison_resamples_only_maps_that_could_be_copies(tmp_path, monkeypatch):
    """50 maps of other patients on the held-out maps' field of view (half on their grid, half resampled to another), and a
    resampled copy of one held-out map, against 5 held-out maps: each held-out map is read once, nearly no pair is resampled
    for the voxel comparison (what each map holds where tells them apart first), and the copy is still caught."""
    from collections import Counter

    from nibabel.arrayproxy import ArrayProxy

    from maisi.core import holdout
    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    rows = []
    for i in range(5):
        path = save_nifti(_patient(i), affine, tmp_path / "held_out" / f"h{i}.nii.gz", np.uint8)
        rows.append({"source": "src", "case_id": f"h{i}", "image": "", "label": str(path), "meta": "", "split": HELD_OUT})
    maps = []
    for seed in range(100, 150):
        path = save_nifti(_patient(seed), affine, tmp_path / "others" / f"o{seed}.nii.gz", np.uint8)
        if seed % 2:
            _resampled_by_the_user(path, path)
        maps.append(LabelMapRef(f"other patient {seed}", str(path)))
    copy = tmp_path / "others" / "copy.nii.gz"
    _resampled_by_the_user(tmp_path / "held_out" / "h3.nii.gz", copy)
    maps.insert(25, LabelMapRef("copy", str(copy)))

    work: Counter = Counter()
    resampled, read = holdout._resampled, ArrayProxy.__array__

    def counting_resampled(*args, **kwargs):
        work["pairs resampled"] += 1
        for sample in resampled(*args, **kwargs):
            work["arrays resampled"] += 1
            yield sample

    def counting_read(proxy, *args, **kwargs):
        if "held_out" in str(proxy.file_like):
            work["held-out maps read"] += 1
        return read(proxy, *args, **kwargs)

    monkeypatch.setattr(holdout, "_resampled", counting_resampled)
    monkeypatch.setattr(ArrayProxy, "__array__", counting_read)
    with pytest.raises(HeldOutLeak, match=r"held-out real case\(s\) src/h3 \(copy, .*copy.nii.gz: .*src/h3's prepared label map"):
        check_held_out_label_maps(maps, pd.DataFrame(rows), "test")
    assert work["pairs resampled"] <= 5, dict(work)  # of 255 pairs on one field of view, the copy's among them
    assert work["held-out maps read"] <= 5 + work["pairs resampled"], dict(work)


def _resampled_by_monai(source, dest, spacing):
    from monai.transforms import LoadImage, Spacing

    img = Spacing(pixdim=spacing, mode="nearest")(LoadImage(image_only=True, ensure_channel_first=True)(str(source)))
    save_nifti(np.asarray(img[0]), np.asarray(img.affine), dest, np.uint8)


def _resampled_by_simpleitk(source, dest, spacing):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(source))
    size = [int(np.ceil(n * s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), spacing, strict=True)]
    out = sitk.Resample(img, size, sitk.Transform(), sitk.sitkNearestNeighbor, img.GetOrigin(), spacing, img.GetDirection(), 0, img.GetPixelID())
    sitk.WriteImage(out, str(dest))


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.5), (0.75, 0.75, 1.0)], ids=["coarser", "half"])
def test_copies_resampled_by_any_tool_are_caught(tmp_path, spacing):
    """A held-out map resampled (nearest neighbour) by nibabel, MONAI or SimpleITK is caught: to a coarser grid, and to
    half its spacing, where every other sampling point is a tie that each tool breaks its own way. The held-out map
    shifted by one voxel is not."""
    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    held = save_nifti(_patient(0), affine, tmp_path / "h0.nii.gz", np.uint8)
    held_out = pd.DataFrame([{"source": "src", "case_id": "h0", "image": "", "label": str(held), "meta": "", "split": HELD_OUT}])
    for tool, resample in (("nibabel", _resampled_by_the_user), ("monai", _resampled_by_monai), ("simpleitk", _resampled_by_simpleitk)):
        copy = tmp_path / f"{tool}.nii.gz"
        resample(held, copy, spacing)
        with pytest.raises(HeldOutLeak, match=rf"src/h0 \(copy by {tool}, .*src/h0's prepared label map"):
            check_held_out_label_maps([LabelMapRef(f"copy by {tool}", str(copy))], held_out, "test")
    shifted = save_nifti(np.roll(_patient(0), 1, axis=2), affine, tmp_path / "shifted.nii.gz", np.uint8)
    resampled = tmp_path / "shifted_resampled.nii.gz"
    _resampled_by_the_user(shifted, resampled, spacing)
    check_held_out_label_maps([LabelMapRef("shifted", str(shifted)), LabelMapRef("resampled", str(resampled))], held_out, "test")


def test_a_copy_in_maisi_ids_of_a_source_map_in_its_own_ids_is_caught(tmp_path):
    """A held-out case whose source labels its classes in its own ids (the source's ``label_map``, in the case's record):
    its map converted to MAISI ids and resampled is caught as that source map's."""
    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    maisi_ids = _patient(0)
    own_ids = {int(v): 1000 + i for i, v in enumerate(np.unique(maisi_ids)) if v}  # MAISI id -> the source's id
    source = np.zeros(maisi_ids.shape, np.int16)
    for maisi_id, own in own_ids.items():
        source[maisi_ids == maisi_id] = own
    source_path = save_nifti(source, affine, tmp_path / "source" / "h0.nii.gz", np.int16)
    record = tmp_path / "prepared" / "cases" / "h0.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"input": {"label": str(source_path), "label_map": {str(o): m for m, o in own_ids.items()}}}))
    held_out = pd.DataFrame([{"source": "src", "case_id": "h0", "image": "", "label": "", "meta": str(record), "split": HELD_OUT}])
    copy = save_nifti(maisi_ids, affine, tmp_path / "copy.nii.gz", np.uint8)
    _resampled_by_the_user(copy, copy)
    with pytest.raises(HeldOutLeak, match=r"src/h0 \(copy, .*src/h0's source label map"):
        check_held_out_label_maps([LabelMapRef("copy", str(copy))], held_out, "test")


def test_an_unreadable_held_out_map_stops_the_check(tmp_path, prepared):
    """A held-out map the check cannot read (corrupt, or gone since the dataset was prepared) is an error naming the case and
    the file: a map on its way into generation is never let through unchecked."""
    from pathlib import Path

    from maisi.core.holdout import LabelMapRef, check_held_out_label_maps

    held_label = Path(prepared.label[3])
    candidate = tmp_path / "candidate.nii.gz"
    save_nifti(np.roll(np.asarray(nib.load(held_label).dataobj), 1, axis=0), np.diag([2.0, 2.0, 2.0, 1.0]), candidate, np.uint8)
    check_held_out_label_maps([LabelMapRef("candidate", str(candidate))], held_out_rows(prepared), "test")  # readable: no leak
    held_label.write_bytes(b"not a NIfTI file")
    with pytest.raises(InputError, match=rf"{held_label}: .*held-out case src/d"):
        check_held_out_label_maps([LabelMapRef("candidate", str(candidate))], held_out_rows(prepared), "test")
    held_label.unlink()
    with pytest.raises(InputError, match=rf"{held_label}: .*held-out case src/d"):
        check_held_out_label_maps([LabelMapRef("candidate", str(candidate))], held_out_rows(prepared), "test")


def test_own_mask_folder_holding_a_held_out_label_map_stops_the_request(tmp_path):
    """A ``masks: folder`` request whose folder holds the held-out case's prepared label map (copied under another name) or its
    source map resampled is refused before anything is generated, naming the case and the file; the generate job is given
    the prepared case table for it."""
    import shutil

    from snakemake.iocontainers import Namedlist

    from maisi.generate.requests import parse_requests

    cases = _prepared_from_sources(tmp_path)
    own = tmp_path / "own"
    (own / "labels").mkdir(parents=True)
    shutil.copy(cases.label[0], own / "labels" / "mine0.nii.gz")  # a training case's map: allowed
    block = {"requests": {"own": {"n_cases": 2, "size": [32, 32, 32], "spacing": [2.0, 2.0, 2.0], "top_region": "chest", "bottom_region": "abdomen",
                                  "masks": "folder", "mask_folder": {"path": str(own), "labels": "labels/{case}.nii.gz"}}},
             "user_masks": {"out_of_range": "warn"}}  # fmt: skip
    request = parse_requests(block, "tiny", "rflow")[0]
    cases.to_csv(tmp_path / "cases.tsv", sep="\t", index=False)

    def run_generate_job():
        smk = type("Job", (), {})()
        smk.input = Namedlist(fromdict={"cases": str(tmp_path / "cases.tsv")})
        smk.output = Namedlist(fromdict={"table": str(tmp_path / "shard.tsv")})
        smk.params = Namedlist(fromdict={"request": json.dumps(request.to_json()), "cases": "[]", "settings": "{}", "out_root": str(tmp_path / "gen")})
        smk.log, smk.threads = Namedlist(), 1
        runpy.run_path(str(ROOT / "workflow_scripts/generate.py"), init_globals={"snakemake": smk})

    from maisi.generate.user_masks import check_own_masks_held_out, find_user_masks

    check_own_masks_held_out(find_user_masks(request.mask_folder, "mask_folder"), held_out_rows(cases), "generate.requests.own.mask_folder")
    shutil.copy(cases.label[2], own / "labels" / "mine1.nii.gz")
    with pytest.raises(HeldOutLeak, match=r"generate.requests.own.mask_folder: held-out real case\(s\) src/p2 \(own label map mine1, "
                                          r".*mine1.nii.gz: .*src/p2's prepared label map"):  # fmt: skip
        run_generate_job()
    (own / "labels" / "mine1.nii.gz").unlink()
    _resampled_by_the_user(_source_label(tmp_path, "p2"), own / "labels" / "mine2.nii.gz")
    with pytest.raises(HeldOutLeak, match=r"held-out real case\(s\) src/p2 \(own label map mine2, .*mine2.nii.gz: .*src/p2's source label map"):
        check_own_masks_held_out(find_user_masks(request.mask_folder, "mask_folder"), held_out_rows(cases), "generate.requests.own.mask_folder")
    assert not (tmp_path / "shard.tsv").exists()


def _planned_generate_inputs(work, snakefile=ROOT / "Snakefile") -> tuple[list[str], dict[str, int]]:
    """A dry run of the first shard of request ``chest`` in ``work``: the inputs of its generate job, and the jobs by rule."""
    from helpers.workflow_runner import snakemake

    from maisi.dryrun import jobs_by_rule

    proc = snakemake(work, "--dry-run", "results/generated/chest/shards/0000.tsv", snakefile=snakefile, timeout=300)
    block = re.search(r"^rule generate:\n\s+input: (.*)$", proc.stdout, flags=re.M)
    assert block, proc.stdout[-3000:]
    return [p.strip() for p in block.group(1).split(",")], jobs_by_rule(proc.stdout + proc.stderr)


def _own_masks_workdir(tmp_path):
    """A working directory planning the image-only example with its request ``chest`` on the user's own maps (two small CTs
    and their maps as the only source, the weights as placeholders)."""
    import yaml
    from helpers.examples import example_workdir

    _, cfg = example_workdir(tmp_path, ROOT / "config" / "examples" / "rflow-ct-image-only.yaml")
    src = cfg["sources"]["my_ct"]
    cfg["generate"]["requests"]["chest"].update(n_cases=2, masks="folder", mask_folder={"path": src["path"], "labels": src["labels"]})
    cfg["generate"]["user_masks"] = {"out_of_range": "warn"}  # the test's maps are far smaller than a chest CT
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return tmp_path


def test_folder_request_generate_job_is_given_the_prepared_cases(tmp_path):
    """The generate job of a ``masks: folder`` request has the prepared case table among its inputs (its script reads
    ``input.cases`` to check the folder against the held-out split), so the dataset is prepared before it runs."""
    inputs, jobs = _planned_generate_inputs(_own_masks_workdir(tmp_path))
    assert "results/prepared/cases.tsv" in inputs
    assert {"data/my_ct/labelsTr/ct0.nii.gz", "data/my_ct/labelsTr/ct1.nii.gz"} <= set(inputs)  # and the maps themselves
    assert jobs["dataset"] == 1 and jobs["generate"] == 1
