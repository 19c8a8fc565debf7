"""Tests of multi-process training (DistributedDataParallel, gloo on the CPU) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers.latent_data import latent_dataset

from maisi.train import distributed
from maisi.train.controlnet import train_controlnet
from maisi.train.diffusion import train_diffusion
from maisi.train.distributed import World, batch_part, launch, rank_device
from maisi.train.settings import ControlNetSettings, DiffusionSettings

#: The global batch is 4: one process computes all of it, each of two processes 2 samples of it.
FAST = {
    "variant": "tiny",
    "device": "cpu",
    "steps": 3,
    "batch_size": 4,
    "latent_patch": (8, 8, 8),
    "checkpoint_every": 2,
    "min_cases": 0,
    "lr": 1e-3,
}

#: Weights of one and of two processes agree to float rounding (the gradients are summed in another order).
ATOL = 1e-5


def _diffusion(records, out: Path, **overrides) -> dict:
    settings = DiffusionSettings(**{**FAST, **overrides})
    result = train_diffusion(records, settings, out / "diffusion.pt", out / "diffusion.png", out / ".resume" / "diffusion.pt")
    return {**result, "weights": torch.load(out / "diffusion.pt", weights_only=True)["unet_state_dict"], "out": out}


def _controlnet(records, diffusion: Path, out: Path, **overrides) -> dict:
    settings = ControlNetSettings(**{**FAST, **overrides})
    result = train_controlnet(
        records, diffusion, settings, out / "controlnet.pt", out / "controlnet.png", out / ".resume" / "cn.pt"
    )
    return {**result, "weights": torch.load(out / "controlnet.pt", weights_only=True)["controlnet_state_dict"], "out": out}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return latent_dataset(tmp_path_factory.mktemp("latents"), ["c0", "c1", "c2"], tumours=["c1"])


@pytest.fixture(scope="module")
def diffusion_runs(records, tmp_path_factory):
    """The diffusion UNet trained by one process and by two."""
    return {n: _diffusion(records, tmp_path_factory.mktemp(f"diffusion{n}"), processes=n) for n in (1, 2)}


def test_two_processes_train_the_weights_of_one_process_with_the_global_batch(records, diffusion_runs, tmp_path, monkeypatch):
    one, two = diffusion_runs[1], diffusion_runs[2]
    difference = _max_difference(one["weights"], two["weights"])
    assert difference < ATOL
    assert two["history"] == pytest.approx(one["history"], rel=1e-5)  # the global batch's mean loss, not rank 0's share
    assert len(two["history"]) == FAST["steps"] and two["resumed_from"] == 0
    for run, n in ((one, 1), (two, 2)):
        sidecar = json.loads((run["out"] / "diffusion.pt.json").read_text(encoding="utf-8"))
        assert sidecar["processes"] == n and sidecar["metrics"]["final_loss"] == pytest.approx(run["history"][-1])
        assert (run["out"] / "diffusion.png").is_file() and not (run["out"] / ".resume" / "diffusion.pt").exists()

    # Negative control: ranks that trained on the same samples (both on the global batch's first half) give
    # other weights, far beyond the tolerance.
    monkeypatch.setattr(World, "part", lambda self, batch_size, key="batch_size": slice(0, batch_size // 2))
    same_samples = _diffusion(records, tmp_path)
    print(
        "max weight difference, 1 vs 2 processes:",
        difference,
        "; same samples on both ranks:",
        _max_difference(same_samples["weights"], two["weights"]),
    )
    assert _max_difference(same_samples["weights"], two["weights"]) > 100 * ATOL
    assert same_samples["history"] != pytest.approx(one["history"], rel=1e-5)


def test_controlnet_two_processes_match_one_process(records, diffusion_runs, tmp_path):
    diffusion = diffusion_runs[1]["out"] / "diffusion.pt"
    one = _controlnet(records, diffusion, tmp_path / "one", processes=1, tumour_weight=100.0)
    two = _controlnet(records, diffusion, tmp_path / "two", processes=2, tumour_weight=100.0)
    assert _max_difference(one["weights"], two["weights"]) < ATOL
    assert two["history"] == pytest.approx(one["history"], rel=1e-5)
    assert json.loads((tmp_path / "two" / "controlnet.pt.json").read_text(encoding="utf-8"))["processes"] == 2


def test_controlnet_contrastive_pass_runs_in_two_processes(records, diffusion_runs, tmp_path):
    """The contrastive loss (maps and tumour-free maps, on ranks with and without a tumour) through the DDP-wrapped ControlNet."""
    diffusion = diffusion_runs[1]["out"] / "diffusion.pt"
    result = _controlnet(records, diffusion, tmp_path, processes=2, steps=2, contrastive_weight=0.01, latent_patch=None)
    assert len(result["history"]) == 2 and all(torch.isfinite(torch.tensor(result["history"])))


def test_batch_parts_split_the_global_batch_once():
    parts = [batch_part(6, rank, 3) for rank in range(3)]
    assert [list(range(6))[p] for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert World(1, 2).part(4) == slice(2, 4) and World().part(4) == slice(0, 4)


def test_a_batch_that_does_not_split_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"'train_diffusion.batch_size' \(3\) must be a multiple of model.resources.gpu \(2\)"):
        DiffusionSettings(**{**FAST, "batch_size": 3, "processes": 2})
    with pytest.raises(ValueError, match=r"'train_controlnet.batch_size' \(6\) must be a multiple of model.resources.gpu \(4\)"):
        ControlNetSettings(**{**FAST, "batch_size": 6, "processes": 4})
    with pytest.raises(ValueError, match=r"'train_diffusion.batch_size' \(5\)"):
        batch_part(5, 0, 2, "train_diffusion.batch_size")


def test_processes_come_from_model_resources_gpu_and_do_not_change_the_weights_fingerprint():
    config = {"model": {"variant": "tiny", "device": "cpu", "resources": {"gpu": 2}}, "train_diffusion": {"batch_size": 4}}
    settings = DiffusionSettings.from_config(config)
    assert settings.processes == 2 and ControlNetSettings.from_config(config).processes == 2
    assert DiffusionSettings.from_json(settings.to_json()) == settings
    assert "processes" not in settings.run_fingerprint()
    assert DiffusionSettings.from_config({**config, "model": {"resources": {"gpu": 0}}}).processes == 1  # device cpu: no GPU


def test_rank_devices():
    assert rank_device("cpu", 1, 2) == torch.device("cpu")
    assert rank_device("cpu", 0, 1) == torch.device("cpu")
    with pytest.raises(ValueError, match="'model.device' is 'cuda:1'"):
        rank_device("cuda:1", 0, 2)
    assert distributed.backend_for(torch.device("cpu")) == "gloo" and distributed.backend_for(torch.device("cuda", 1)) == "nccl"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failing_process_stops_the_others(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))  # tests/: the workers import helpers.ddp_workers
    from helpers.ddp_workers import fail_on

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="training process 1 of 2 failed"):
        launch(fail_on, 2, "cpu", 1, str(tmp_path))
    pids = [int(p.read_text(encoding="utf-8")) for p in sorted(tmp_path.glob("*.pid"))]
    alive = [pid for pid in pids if _alive(pid)]
    for pid in alive:  # a launcher that left them running: end them here
        os.kill(pid, signal.SIGKILL)
    assert len(pids) == 2 and not alive and time.monotonic() - start < 120  # rank 0 would sleep 600 s
