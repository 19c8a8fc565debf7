"""The memorisation audit: planted copies of training cases are flagged, new cases are not."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from maisi.core.tables import write_table
from maisi.evaluate.features import PLANES, FeatureExtractor
from maisi.evaluate.privacy import (
    AUDIT_COLUMNS,
    audit_memorisation,
    audited_release,
    image_similarity,
    nearest_training,
    pooled_features,
)

SHAPE = (32, 32, 24)


def body(seed: int) -> np.ndarray:
    """A CT-like volume whose anatomy varies with the seed: an ellipsoid body of random size and position, an
    organ (60 HU) and a bone (700 HU) at random places, texture noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    vol = np.full(SHAPE, -1000.0)
    a, b, cx, cy = rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.8), rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)
    inside = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 < 1
    vol[inside] = 0.0
    ox, oy, oz = rng.uniform(-0.4, 0.4, 3)
    vol[inside & ((x - ox) ** 2 + (y - oy) ** 2 + (z - oz) ** 2 < rng.uniform(0.04, 0.12))] = 60.0
    bx, by = rng.uniform(-0.3, 0.3, 2)
    vol[inside & ((x - bx) ** 2 + (y - by) ** 2 < 0.01)] = 700.0
    return vol + rng.normal(0, 10, SHAPE)


class PooledSlices(FeatureExtractor):
    """Each slice average-pooled to 4x4 (a stand-in for FID's networks, with the same protocol)."""

    name = "pooled_slices"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def plane_features(self, volume: np.ndarray) -> dict[str, np.ndarray]:
        v = torch.from_numpy(np.clip(volume, -1000, 1000) / 1000.0).float()
        out = {}
        for plane, axis in PLANES.items():
            slices = v.movedim(axis, 0)[:, None]
            out[plane] = F.adaptive_avg_pool2d(slices, 4).flatten(1).double().numpy()
        return out


@pytest.fixture(scope="module")
def cases():
    ex = PooledSlices()
    vols = {f"train{i}": body(i) for i in range(8)}
    vols |= {f"held{i}": body(100 + i) for i in range(12)}
    vols |= {f"new{i}": body(500 + i) for i in range(10)}
    rng = np.random.default_rng(7)
    vols["copy"] = vols["train2"].copy()
    vols["noisy_copy"] = vols["train5"] + rng.normal(0, 30, SHAPE)  # a near-copy: 30 HU of noise on top
    feats = {k: pooled_features(ex, v) for k, v in vols.items()}
    return vols, feats


def _split(feats, prefix):
    return {k: v for k, v in feats.items() if k.startswith(prefix)}


def test_planted_copies_are_flagged_and_new_cases_stand_apart(cases):
    vols, feats = cases
    generated = _split(feats, "new") | {"copy": feats["copy"], "noisy_copy": feats["noisy_copy"]}
    audit, held = audit_memorisation(generated, _split(feats, "train"), _split(feats, "held"), percentile=5.0, volumes=vols.get)
    assert list(audit.columns) == list(AUDIT_COLUMNS) and len(held) == 12
    rows = audit.set_index("case_id")
    assert rows.loc["copy", "flagged"] and rows.loc["copy", "nearest_training"] == "train2"
    assert rows.loc["copy", "distance"] == pytest.approx(0.0, abs=1e-5) and rows.loc["copy", "image_similarity"] == pytest.approx(
        1.0
    )
    assert rows.loc["noisy_copy", "flagged"] and rows.loc["noisy_copy", "nearest_training"] == "train5"
    assert rows.loc["noisy_copy", "held_out_rank"] == 0.0 and rows.loc["noisy_copy", "image_similarity"] > 0.9
    new = rows.loc[[f"new{i}" for i in range(10)]]
    # New bodies lie among the held-out ones (measured: 2.3-5.6 against 2.2-6.0, the noisy copy 0.3) and their
    # image similarity to the nearest training case is near 0: the copies stand apart in both measures, and no new
    # body is flagged.
    assert new["distance"].min() > 5 * rows.loc["noisy_copy", "distance"]
    assert new["image_similarity"].abs().max() < 0.3
    assert not new["flagged"].any()
    assert (audit["similarity_threshold"] >= 0.8).all()  # privacy.min_similarity's default floor


def test_the_similarity_floor_decides_between_near_and_alike(cases):
    """A case near a training case in features is flagged only when it is also at least ``min_similarity`` alike
    it in the image: a floor above the noisy copy's correlation leaves it unflagged, the exact copy still flagged;
    one at -1 leaves the held-out cases' percentile as the only image yardstick."""
    vols, feats = cases
    generated = {"copy": feats["copy"], "noisy_copy": feats["noisy_copy"]}
    train, held = _split(feats, "train"), _split(feats, "held")
    strict, _ = audit_memorisation(generated, train, held, volumes=vols.get, min_similarity=0.999)
    rows = strict.set_index("case_id")
    assert rows.loc["copy", "flagged"] and not rows.loc["noisy_copy", "flagged"]
    assert 0.9 < rows.loc["noisy_copy", "image_similarity"] < 0.999 and rows.loc["copy", "similarity_threshold"] == 0.999
    loose, held_rows = audit_memorisation(generated, train, held, volumes=vols.get, min_similarity=-1.0)
    assert loose["similarity_threshold"].iloc[0] == pytest.approx(np.percentile(held_rows["image_similarity"], 95.0))


def test_the_threshold_is_the_held_out_percentile():
    """With a known yardstick: a case as near as the median held-out case is not flagged, one nearer than the
    chosen percentile is; the threshold moves with the percentile."""
    rng = np.random.default_rng(0)
    training = {f"t{i}": v for i, v in enumerate(rng.normal(size=(20, 5)))}
    held_out = {f"h{i}": v for i, v in enumerate(rng.normal(size=(40, 5)))}
    _, held = audit_memorisation({}, training, held_out)
    median_case = held_out[held.sort_values("distance").iloc[20]["case_id"]]
    near = training["t3"] + 1e-3
    audit, _ = audit_memorisation({"median": median_case, "near": near}, training, held_out, percentile=5.0)
    rows = audit.set_index("case_id")
    assert not rows.loc["median", "flagged"] and rows.loc["near", "flagged"]
    assert rows.loc["median", "held_out_rank"] == pytest.approx(0.5, abs=0.03)
    loose, _ = audit_memorisation({"median": median_case}, training, held_out, percentile=60.0)
    assert loose.loc[0, "flagged"] and loose.loc[0, "threshold"] > rows.loc["median", "threshold"]


def test_nearest_training_and_similarity_by_hand():
    train = np.array([[0.0, 0.0], [3.0, 4.0]])
    index, dist = nearest_training(np.array([[2.9, 4.1], [0.1, 0.0]]), train)
    assert index.tolist() == [1, 0] and np.allclose(dist, [np.hypot(0.1, 0.1), 0.1])
    a = body(3)
    assert image_similarity(a, a) == pytest.approx(1.0)
    assert image_similarity(a, a + 50.0) == pytest.approx(1.0)  # a shift of every HU is no difference
    with pytest.raises(ValueError, match="one grid"):
        image_similarity(a, a[:-1])


def test_errors_name_what_is_missing(cases):
    _, feats = cases
    with pytest.raises(ValueError, match="held-out"):
        audit_memorisation({"copy": feats["copy"]}, _split(feats, "train"), {})
    with pytest.raises(ValueError, match="percentile"):
        audit_memorisation({}, _split(feats, "train"), _split(feats, "held"), percentile=100)


def test_the_evaluations_read_what_the_release_holds(tmp_path):
    """QC's verdict, a drop audit and the mask-conditioned requests decide which generated cases the label-fidelity
    and utility stages see."""
    qc = [{"request": q, "case_id": c, "release": r, "image": f"{c}.nii.gz", "label": f"{c}_label.nii.gz", "qc_reasons": ""}
          for q, c, r in (("masked", "a", "include"), ("masked", "b", "flagged"), ("masked", "c", "excluded"),
                          ("masked", "d", "include"), ("free", "e", "include"))]  # fmt: skip
    write_table(qc, tmp_path / "qc.tsv", "qc", list(qc[0]))
    audit = pd.DataFrame({c: [""] * 3 for c in AUDIT_COLUMNS}).assign(case_id=["a", "d", "e"], flagged=["False", "True", "False"])
    write_table(audit.to_dict("records"), tmp_path / "audit.tsv", "privacy", list(AUDIT_COLUMNS))
    assert list(audited_release(tmp_path / "qc.tsv").case_id) == ["a", "b", "d", "e"]
    assert list(audited_release(tmp_path / "qc.tsv", tmp_path / "audit.tsv").case_id) == ["a", "b", "e"]
    assert list(audited_release(tmp_path / "qc.tsv", tmp_path / "audit.tsv", ["masked"]).case_id) == ["a", "b"]
    assert list(audited_release(tmp_path / "qc.tsv", None, ["masked"]).qc_status) == ["pass", "flagged", "pass"]


def test_audit_of_files_on_fids_grid_flags_a_planted_copy(tmp_path, monkeypatch):
    """The workflow's path: NIfTI files read once onto FID's grid; an exact copy of a training file (another name)
    is flagged with image correlation 1, a new body is not; the figure is written."""
    import pandas as pd

    from maisi.core.io import save_nifti
    from maisi.evaluate.privacy import audit_files, plot_audit
    from maisi.evaluate.settings import FIDSettings

    def write(name: str, seed: int) -> str:
        path = tmp_path / f"{name}.nii.gz"
        save_nifti(body(seed), np.diag([2.0, 2.0, 2.0, 1.0]), path, np.int16)
        return str(path)

    training = {f"s/t{i}": write(f"t{i}", i) for i in range(5)}
    held = {f"s/h{i}": write(f"h{i}", 100 + i) for i in range(4)}
    generated = {"copy": write("copy", 3), "new": write("new", 500)}
    fid = FIDSettings(extractors=("autoencoder",), spacing=(2.0, 2.0, 2.0), size=SHAPE)
    audit, held_table = audit_files(generated, training, held, PooledSlices(), fid, percentile=5.0, progress=False)
    rows = audit.set_index("case_id")
    assert rows.loc["copy", "flagged"] and rows.loc["copy", "nearest_training"] == "s/t3"
    assert rows.loc["copy", "image_similarity"] == pytest.approx(1.0) and not rows.loc["new", "flagged"]
    assert sorted(held_table.case_id) == sorted(held)
    plot_audit(audit.astype({"flagged": str}), held_table, tmp_path / "audit.png")
    assert (tmp_path / "audit.png").stat().st_size > 1000
    import maisi.core.figures

    drawn = {}
    monkeypatch.setattr(maisi.core.figures, "save_figure", lambda fig, dest: drawn.update(fig=fig))
    plot_audit(audit.astype({"flagged": str}).assign(mask_source=["", "s/t1"]), held_table, tmp_path / "again.png")
    points = {c.get_label(): c.get_offsets().tolist() for c in drawn["fig"].axes[0].collections if c.get_label()[0] != "_"}
    assert points["generated, flagged"] == [[rows.loc["copy", "distance"], pytest.approx(1.0)]]  # in the shaded corner
    assert points["generated, from a training mask"] == [[rows.loc["new", "distance"], rows.loc["new", "image_similarity"]]]
    assert len(points["held-out real"]) == 4 and "possible copy" in points
    with pytest.raises(ValueError, match="more than one"):
        audit_files({"s/t0": training["s/t0"]}, training, held, PooledSlices(), fid, progress=False)
    assert isinstance(audit, pd.DataFrame)
