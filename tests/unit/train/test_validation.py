"""Tests of the validation loss on held-out cases (a fold of the prepared dataset) in the diffusion and ControlNet stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.latent_data import LATENT, latent_dataset, write_latent

import maisi.train.diffusion as td
import maisi.train.loop as loop
from maisi.models.checkpoints import load_diffusion
from maisi.models.networks import build_scheduler
from maisi.models.variants import variant
from maisi.train.batches import check_patch, conditions, l1_loss, latent_records, read_cases
from maisi.train.controlnet import train_controlnet
from maisi.train.diffusion import train_diffusion
from maisi.train.loop import step_generator
from maisi.train.settings import ControlNetSettings, DiffusionSettings
from maisi.train.validation import Validation, split_cases

#: Folds of the cases c0..c4: the highest, 2, holds c2 and c4.
FOLDS = [0, 1, 2, 0, 2]
HELD_OUT = ["c2", "c4"]
FAST = {"variant": "tiny", "device": "cpu", "steps": 4, "batch_size": 2, "latent_patch": (8, 8, 8), "checkpoint_every": 2,
        "min_cases": 0, "lr": 1e-3, "validation_every": 2, "validation_fold": -1}  # fmt: skip


def _records(folder: Path) -> list[dict]:
    records = latent_dataset(folder, [f"c{i}" for i in range(5)], tumours=["c1", "c2"])
    return [{**r, "fold": str(fold)} for r, fold in zip(records, FOLDS, strict=True)]


def _changed(records: list[dict], case_id: str, folder: Path) -> list[dict]:
    """The records with ``case_id``'s latent replaced by another one."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_latent(folder, case_id, rng.normal(0, 2.0, LATENT), rng.uniform(0.01, 0.1, LATENT))
    return [{**r, "latent": str(path)} if r["case_id"] == case_id else r for r in records]


def _diffusion(records, out: Path, **overrides) -> dict:
    settings = DiffusionSettings(**{**FAST, **overrides})
    result = train_diffusion(records, settings, out / "diffusion.pt", out / "diffusion.png", out / ".resume" / "diffusion.pt")
    return {**result, "sidecar": json.loads((out / "diffusion.pt.json").read_text(encoding="utf-8")), "settings": settings}


def _recomputed(records, checkpoint: Path, settings: DiffusionSettings) -> float:
    """The validation loss of a checkpoint's UNet on the held-out cases of ``records``, computed here."""
    unet, scale, _ = load_diffusion(checkpoint, "tiny")
    unet.eval()
    var = variant("tiny")
    training, held_out = split_cases(read_cases(records), settings)
    device = torch.device("cpu")

    def loss(batch, noisy, timesteps, target):
        return l1_loss(unet(x=noisy, timesteps=timesteps, **conditions(batch, device, var)), target)

    divisor = check_patch(settings, training)
    validation = Validation("train_diffusion", held_out, settings, divisor, torch.tensor(scale), build_scheduler(settings.scheduler_spec()),
                            settings.kind, loss, device)  # fmt: skip
    with torch.no_grad():
        return validation()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latents")
    records = _records(folder)
    out = tmp_path_factory.mktemp("validated")
    return {"folder": folder, "records": records, "out": out, "run": _diffusion(records, out)}


def test_held_out_cases_are_left_out_of_training(data):
    cases = read_cases(data["records"])
    training, held_out = split_cases(cases, DiffusionSettings(**FAST))
    assert [c.case_id for c in held_out] == HELD_OUT and not {c.case_id for c in training} & set(HELD_OUT)
    assert [c.case_id for c in split_cases(cases, DiffusionSettings(**{**FAST, "validation_fold": 1}))[1]] == ["c1"]
    for off in ({"validation_every": 0}, {"validation_fold": None}):  # no validation: every case trains
        assert split_cases(cases, DiffusionSettings(**{**FAST, **off})) == (cases, [])
    sidecar = data["run"]["sidecar"]
    assert (
        sidecar["cases"] == ["c0", "c1", "c3"]
        and sidecar["validation"]["cases"] == HELD_OUT
        and sidecar["validation"]["fold"] == 2
    )


def test_folds_that_leave_nothing_to_train_or_validate_are_errors(data):
    cases = read_cases(data["records"])
    with pytest.raises(
        ValueError, match=r"'model.validation_fold' \(3\): no case is in that fold \(the cases' folds: \[0, 1, 2\]\)"
    ):
        split_cases(cases, DiffusionSettings(**{**FAST, "validation_fold": 3}))
    only_fold_2 = [c for c in cases if c.fold == 2]
    with pytest.raises(ValueError, match=r"'model.validation_fold' \(-1\): fold 2 holds all 2 cases .* none is left to train on"):
        split_cases(only_fold_2, DiffusionSettings(**FAST))
    no_folds = read_cases([{k: v for k, v in r.items() if k != "fold"} for r in data["records"]])
    with pytest.raises(ValueError, match=r"'model.validation_every' \(2\) .* 5 case\(s\) have no fold"):
        split_cases(no_folds, DiffusionSettings(**FAST))
    with pytest.raises(ValueError, match="model.validation_fold"):
        DiffusionSettings(**{**FAST, "validation_fold": -2})


def test_the_validation_loss_is_recorded_plotted_and_recomputed_from_the_weights(data, tmp_path, monkeypatch):
    run, sidecar = data["run"], data["run"]["sidecar"]
    curve = sidecar["validation"]["curve"]
    assert [step for step, _ in curve] == [2, 4] and sidecar["validation"]["every"] == 2
    assert sidecar["metrics"]["validation_loss"] == curve[-1][1] and curve[0][1] != curve[1][1]
    # The same samples and noise every time: the last value again, from the checkpoint's weights.
    checkpoint = data["out"] / "diffusion.pt"
    assert _recomputed(data["records"], checkpoint, run["settings"]) == pytest.approx(curve[-1][1], rel=1e-6)

    drawn = {}
    monkeypatch.setattr(
        td, "plot_losses", lambda history, dest, title, validation=None: drawn.update(history=history, validation=validation)
    )
    _diffusion(data["records"], tmp_path)
    assert drawn["history"]["L1"] == run["history"] and list(drawn["validation"].values()) == [[tuple(p) for p in curve]]


def test_the_validation_loss_reads_the_held_out_cases_only(data, tmp_path):
    """A changed held-out latent changes the validation loss but not the weights; a changed training latent changes the
    weights but (with those weights) not how the validation loss is computed."""
    checkpoint, settings = data["out"] / "diffusion.pt", data["run"]["settings"]
    base = _recomputed(data["records"], checkpoint, settings)
    assert _recomputed(_changed(data["records"], "c4", tmp_path / "held"), checkpoint, settings) != pytest.approx(base, rel=1e-4)
    assert _recomputed(_changed(data["records"], "c3", tmp_path / "train"), checkpoint, settings) == base

    held = _diffusion(_changed(data["records"], "c4", tmp_path / "held"), tmp_path / "run_held")
    reference = torch.load(checkpoint, weights_only=True)["unet_state_dict"]
    weights = torch.load(tmp_path / "run_held" / "diffusion.pt", weights_only=True)["unet_state_dict"]
    assert all(torch.equal(reference[k], weights[k]) for k in reference) and held["history"] == data["run"]["history"]
    assert held["sidecar"]["metrics"]["validation_loss"] != pytest.approx(
        data["run"]["sidecar"]["metrics"]["validation_loss"], rel=1e-4
    )


def test_a_resumed_run_keeps_its_validation_curve(data, tmp_path, monkeypatch):
    calls = {"n": 0}

    def failing(seed, name, step, device="cpu"):
        if step == 3 and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("simulated crash at step 3")
        return step_generator(seed, name, step, device)

    monkeypatch.setattr(loop, "step_generator", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _diffusion(data["records"], tmp_path)
    resumed = _diffusion(data["records"], tmp_path)
    assert resumed["resumed_from"] == 2 and resumed["sidecar"]["validation"] == data["run"]["sidecar"]["validation"]


def test_controlnet_validates_on_the_held_out_cases(data, tmp_path):
    settings = ControlNetSettings(**{**FAST, "steps": 2, "tumour_weight": 100.0})
    out = tmp_path
    train_controlnet(
        data["records"], data["out"] / "diffusion.pt", settings, out / "cn.pt", out / "cn.png", out / ".resume" / "cn.pt"
    )
    sidecar = json.loads((out / "cn.pt.json").read_text(encoding="utf-8"))
    assert sidecar["cases"] == ["c0", "c1", "c3"] and sidecar["validation"]["cases"] == HELD_OUT
    assert [step for step, _ in sidecar["validation"]["curve"]] == [2] and np.isfinite(sidecar["metrics"]["validation_loss"])


def test_two_processes_validate_as_one(data, tmp_path):
    """Rank 0 validates with the weights every rank holds: the curve of one process, to float rounding."""
    two = _diffusion(data["records"], tmp_path, processes=2)
    one = data["run"]["sidecar"]["validation"]["curve"]
    assert [s for s, _ in two["sidecar"]["validation"]["curve"]] == [s for s, _ in one]
    assert [v for _, v in two["sidecar"]["validation"]["curve"]] == pytest.approx([v for _, v in one], rel=1e-5)


def test_latent_records_take_the_folds_from_the_case_table(data, tmp_path):
    latents = pd.DataFrame(
        [{"case_id": r["case_id"], "source": "phantom", "status": "ok", "latent": r["latent"]} for r in data["records"]]
    )
    latents.to_csv(tmp_path / "latents.tsv", sep="\t", index=False)
    cases = pd.DataFrame(
        [{"source": "phantom", "case_id": r["case_id"], "label": r["label"], "fold": r["fold"]} for r in data["records"]]
    )
    cases.to_csv(tmp_path / "cases.tsv", sep="\t", index=False)
    records = latent_records([tmp_path / "latents.tsv"], cases=tmp_path / "cases.tsv")
    assert [c.fold for c in read_cases(records)] == FOLDS
    assert [c.fold for c in read_cases(latent_records([tmp_path / "latents.tsv"]))] == [None] * 5
