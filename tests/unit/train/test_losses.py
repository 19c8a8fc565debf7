"""MAISI v2's region-contrastive ControlNet loss against NVIDIA's ``compute_region_contrasive_loss`` and by hand, and
in ControlNet training (tiny variant, CPU)."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.config import validated
from helpers.latent_data import latent_dataset
from helpers.models import randomise_zero_layers
from helpers.paths import NVIDIA_REFERENCE
from monai.transforms.utils_morphological_ops import dilate

import maisi.train.controlnet as tc
import maisi.train.loop as loop
from maisi.core.checks import ConfigError
from maisi.core.labels import remove_tumours
from maisi.models.networks import build_controlnet, build_diffusion_unet, label_to_bits
from maisi.train.controlnet import train_controlnet
from maisi.train.loop import step_generator
from maisi.train.losses import contrastive_regions, region_contrastive_loss
from maisi.train.settings import ControlNetSettings

#: Float32 sums over a few thousand voxels.
TOL = 1e-6


@pytest.fixture(scope="module")
def nvidia_loss():
    """NVIDIA's ``compute_region_contrasive_loss``, the function alone: its module imports tensorboard and the
    rest of NVIDIA's training code, so the function's source is taken out of the file and run on its own."""
    path = NVIDIA_REFERENCE / "scripts" / "train_controlnet.py"
    if not path.is_file():
        pytest.skip(f"NVIDIA's reference code is not at {path.parent} (set MAISI_NVIDIA_REFERENCE): no oracle to compare with")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_region_contrasive_loss"]
    assert found, f"{path} has no compute_region_contrasive_loss"
    namespace = {"torch": torch, "F": F}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102 - the reference's own code
    return namespace["compute_region_contrasive_loss"]


def _nvidia_regions(label: torch.Tensor, label_free: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks as NVIDIA's training loop makes them (uint8; MONAI's dilation)."""
    roi = (label_free != label).to(torch.uint8)
    return roi, 1 - dilate(roi, filter_size=3).to(torch.uint8)


def _labels(kind: str, gen: torch.Generator) -> torch.Tensor:
    """A batch of two label maps (2, 1, 32, 32, 32) with tumours of several shapes."""
    label = torch.zeros(2, 1, 32, 32, 32, dtype=torch.uint8)
    label[:, :, 2:30, 2:30, 2:30] = 200
    label[:, :, 4:16, 4:28, 4:28] = 1  # liver
    label[:, :, 16:28, 4:16, 4:28] = 28  # lung lobes
    label[:, :, 16:28, 16:28, 4:28] = 29
    if kind == "blobs":  # a hepatic and a lung tumour in the first map, a small one in the second
        label[0, :, 6:11, 8:15, 9:13] = 26
        label[0, :, 19:25, 12:20, 10:17] = 23
        label[1, :, 7:9, 20:23, 5:6] = 26
    elif kind == "border":  # tumours touching the volume's edge
        label[:, :, 0:5, 0:6, 0:7] = 26
        label[1, :, 27:32, 25:32, 28:32] = 23
    elif kind == "speckle":  # scattered single-voxel tumours
        spots = torch.rand(label.shape, generator=gen) < 0.02
        label[spots & (label == 1)] = 26
    elif kind == "none":  # no tumour: an empty ROI
        pass
    return label


def _free(label: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack([remove_tumours(m[0].numpy())[None] for m in label]))


@pytest.mark.parametrize("kind", ["blobs", "border", "speckle", "none"])
@pytest.mark.parametrize("max_loss", [2.0, 0.3])
def test_matches_nvidias_region_contrastive_loss(nvidia_loss, kind, max_loss):
    """Same random outputs and targets, several masks, NVIDIA's bound (2) and one that clips: equal to float tolerance."""
    gen = torch.Generator().manual_seed(len(kind))
    label = _labels(kind, gen)
    label_free = _free(label)
    roi, background = contrastive_regions(label, label_free)
    roi_nv, background_nv = _nvidia_regions(label, label_free)
    assert torch.equal(roi, roi_nv.float()) and torch.equal(background, background_nv.float())
    assert bool(roi.any()) == (kind != "none")
    for scale in (0.5, 3.0):  # small and large differences between the outputs: unclipped and clipped
        output, output_free, target = (torch.randn(2, 4, 8, 8, 8, generator=gen) * s for s in (scale, scale, 1.0))
        ours = region_contrastive_loss(output, output_free, target, roi, background, max_loss)
        theirs = nvidia_loss(output, output_free, target, roi_nv, background_nv, max_region_contrasive_loss=max_loss)
        for a, b in zip(ours, theirs, strict=True):
            assert abs(float(a) - float(b)) <= TOL, (kind, max_loss, scale, float(a), float(b))


def test_the_terms_by_hand():
    """Inside the ROI: minus the mean output difference, bounded at -max_loss; outside the dilated ROI: the
    tumour-free output's mean error against the target; the ring the dilation adds counts in neither."""
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.uint8)
    label[:, :, 4:8, 4:8, 4:8] = 26  # one latent voxel (1, 1, 1) of a 4x4x4 grid
    free = label.clone()
    free[label == 26] = 1
    roi, background = contrastive_regions(label, free)
    assert float(roi.sum()) == 64 and float(background.sum()) == 16**3 - 6**3  # 3x3x3 dilation: a 6^3 cube
    output, output_free, target = torch.zeros(1, 4, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4), torch.zeros(1, 4, 4, 4, 4)
    output[:, :, 1, 1, 1] = 5.0  # inside: |output - output_free| = 5
    output_free[:, :, 1, 1, 1] = 0.0
    target[:, :, 1, 1, 1] = 100.0  # inside the ROI: not part of the background term
    # Nearest-neighbour sampling takes latent voxel i from label voxel 4i: the dilated ROI (label voxels 3-8)
    # covers latent voxels 1 and 2 per axis, so 64 - 8 = 56 latent voxels are background.
    target[:, :, 2, 2, 2] = 50.0  # in the dilation's ring: in neither term
    target[:, :, 3, 3, 3] = 3.0  # one background voxel, all 4 channels
    inside, outside = region_contrastive_loss(output, output_free, target, roi, background, max_loss=10.0)
    assert float(inside) == pytest.approx(-5.0, abs=1e-4)
    assert float(outside) == pytest.approx(3.0 * 4 / (56 * 4), abs=1e-6)
    inside, _ = region_contrastive_loss(output, output_free, target, roi, background, max_loss=2.0)
    assert float(inside) == pytest.approx(-2.0, abs=1e-6)  # clipped: it never goes below -max_loss
    # No ROI: the first term is 0, the second the mean error over every voxel.
    empty = torch.zeros_like(roi)
    inside, outside = region_contrastive_loss(output, output_free, target, empty, 1.0 - empty, max_loss=2.0)
    assert float(inside) == 0.0 and float(outside) == pytest.approx((100.0 + 50.0 + 3.0) * 4 / (64 * 4), abs=1e-5)


def test_the_bound_passes_no_gradient_once_reached():
    output = torch.full((1, 1, 2, 2, 2), 5.0, requires_grad=True)
    roi = torch.ones(1, 1, 2, 2, 2)
    inside, _ = region_contrastive_loss(
        output, torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2), roi, 1 - roi, max_loss=2.0
    )
    inside.backward()
    assert float(inside.detach()) == -2.0 and float(output.grad.abs().sum()) == 0.0


def test_bad_shapes_are_clear_errors():
    x = torch.zeros(1, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="one channel"):
        region_contrastive_loss(x, x, x, torch.zeros(1, 2, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        region_contrastive_loss(x, x[:, :2], x, torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="one shape"):
        contrastive_regions(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 4))


# --------------------------------------------------------------------------- in ControlNet training


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """Labelled cases (c1 holds a lung tumour), a tiny diffusion checkpoint and a strong ControlNet to start from, in
    NVIDIA's layouts (their zero-initialised layers set, so that the tumour changes the prediction)."""
    folder = tmp_path_factory.mktemp("contrastive")
    torch.manual_seed(3)
    unet = randomise_zero_layers(build_diffusion_unet("tiny"), 3)
    controlnet = randomise_zero_layers(build_controlnet("tiny"), 4, scale=0.3)
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.5)}, folder / "diffusion.pt")
    torch.save({"controlnet_state_dict": controlnet.state_dict()}, folder / "controlnet_parent.pt")
    records = latent_dataset(folder, ["c0", "c1"], tumours=["c1"])
    return {"folder": folder, "diffusion": folder / "diffusion.pt", "parent": str(folder / "controlnet_parent.pt"),
            "records": {r["case_id"]: r for r in records}}  # fmt: skip


def _spied_run(training, out, case_ids, monkeypatch, **overrides):
    """One ControlNet run that records the label maps the ControlNet sees and the contrastive loss's inputs and terms."""
    seen = {"labels": [], "loss": []}

    def bits(label):
        seen["labels"].append(label.clone())
        return label_to_bits(label)

    def contrastive(*args):
        terms = region_contrastive_loss(*args)
        seen["loss"].append((args, terms))
        return terms

    monkeypatch.setattr(tc, "label_to_bits", bits)
    monkeypatch.setattr(tc, "region_contrastive_loss", contrastive)
    settings = ControlNetSettings(**{"variant": "tiny", "device": "cpu", "steps": 1, "batch_size": 1, "latent_patch": None,
                                     "init_from": training["parent"], **overrides})  # fmt: skip
    records = [training["records"][c] for c in case_ids]
    result = train_controlnet(records, training["diffusion"], settings, out / "cn.pt", out / "cn.png", out / ".resume" / "cn.pt")
    return result, seen


def test_training_adds_the_contrastive_terms_as_nvidia_does(training, tmp_path, monkeypatch):
    result, seen = _spied_run(training, tmp_path, ["c1"], monkeypatch, contrastive_weight=0.5, contrastive_max=1.5)
    # One forward pass over the map and its tumour-free version (remove_tumours of the whole map).
    assert len(seen["labels"]) == 1 and seen["labels"][0].shape[0] == 2
    label, label_free = seen["labels"][0][:1], seen["labels"][0][1:]
    assert (label == 23).any() and torch.equal(label_free[0, 0], torch.from_numpy(remove_tumours(label[0, 0].numpy())))
    (output, output_free, target, roi, background, bound), (inside, outside) = seen["loss"][0]
    roi_nv, background_nv = _nvidia_regions(label, label_free)
    assert torch.equal(roi, roi_nv.float()) and torch.equal(background, background_nv.float()) and bound == 1.5
    assert float((output - output_free).detach().abs().max()) > 1e-3  # the tumour-free map's own prediction
    inside, outside = float(inside.detach()), float(outside.detach())
    assert output.shape == target.shape and inside < 0 < outside
    sidecar = json.loads((tmp_path / "cn.pt.json").read_text(encoding="utf-8"))
    assert sidecar["contrastive_loss"]["weight"] == 0.5 and sidecar["contrastive_loss"]["max"] == 1.5
    parts = {name: m["first_loss"] for name, m in sidecar["contrastive_loss"]["metrics"].items()}
    assert parts["contrastive (ROI)"] == pytest.approx(inside) and parts["background"] == pytest.approx(outside)
    assert result["history"][0] == pytest.approx(parts["weighted L1"] + 0.5 * (inside + outside), rel=1e-5)


def test_a_batch_without_tumours_takes_one_pass(training, tmp_path, monkeypatch):
    _, seen = _spied_run(training, tmp_path, ["c0"], monkeypatch, contrastive_weight=0.5)
    assert len(seen["labels"]) == 1 and seen["labels"][0].shape[0] == 1
    (output, output_free, target, roi, background, bound), (inside, outside) = seen["loss"][0]
    assert output_free is output and not roi.any() and float(inside.detach()) == 0.0 and bound == 2.0
    assert float(outside.detach()) == pytest.approx(float((output.detach() - target).abs().mean()), rel=1e-5)


def test_the_variants_setting_and_off(training, tmp_path, monkeypatch):
    assert ControlNetSettings(variant="rflow-ct").contrastive == (0.01, 2.0)  # NVIDIA's rflow-ct training config
    assert ControlNetSettings(variant="ddpm-ct").contrastive == (0.0, 2.0) == ControlNetSettings(variant="tiny").contrastive
    assert ControlNetSettings(variant="rflow-ct", contrastive_weight=0, contrastive_max=1).contrastive == (0.0, 1.0)
    with pytest.raises(ConfigError, match="contrastive_max"):
        validated(train_controlnet={"contrastive_max": 0})
    result, seen = _spied_run(training, tmp_path, ["c1"], monkeypatch)  # tiny: off
    assert not seen["loss"] and len(seen["labels"]) == 1 and seen["labels"][0].shape[0] == 1
    assert result["contrastive_loss"] == {"weight": 0.0, "max": 2.0}


def test_the_loss_parts_survive_a_resume(training, tmp_path, monkeypatch):
    settings = {"contrastive_weight": 0.5, "steps": 3, "checkpoint_every": 1}
    whole, _ = _spied_run(training, tmp_path / "whole", ["c1"], monkeypatch, **settings)
    calls = {"n": 0}

    def failing(seed, name, step, device="cpu"):
        if step == 2 and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("simulated crash")
        return step_generator(seed, name, step, device)

    monkeypatch.setattr(loop, "step_generator", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _spied_run(training, tmp_path / "crashed", ["c1"], monkeypatch, **settings)
    resumed, _ = _spied_run(training, tmp_path / "crashed", ["c1"], monkeypatch, **settings)
    assert resumed["resumed_from"] == 2 and resumed["history"] == whole["history"]
    assert resumed["contrastive_loss"]["metrics"] == whole["contrastive_loss"]["metrics"]  # the parts of all 3 steps
