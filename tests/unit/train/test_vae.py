"""The autoencoder stage (maisi.train.vae) on a tiny prepared dataset: outputs, learning, reproducibility,
resume after a crash, and errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.config import validated

import maisi.train.vae as tv
from maisi.core.checks import ConfigError
from maisi.core.io import save_nifti
from maisi.models.checkpoints import load_autoencoder
from maisi.models.networks import build_autoencoder
from maisi.train.loop import files_fingerprint, seed_everything

SHAPE = (48, 40, 32)
# Two patch sizes (steps 0-2, then 3-5); the second is longer than the volumes along z, so it is padded. The learning
# rate decays linearly, so a resumed run matches only if it resumes the decay too.
BASE = tv.VaeSettings(
    variant="tiny", device="cpu", steps=6, batch_size=2, patch_sizes=((16, 16, 16), (16, 16, 40)), lr=1e-3, lr_power=1.0,
    checkpoint_every=2,
)


def _volume(seed: int) -> np.ndarray:
    """A [0, 1] 'CT': air, an elliptic body with a smooth gradient and a bright core."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    a, b = rng.uniform(0.6, 0.9, 2)
    vol = np.zeros(SHAPE, np.float32)
    body = (x / a) ** 2 + (y / b) ** 2 < 1
    vol[body] = 0.45 + 0.1 * z[body]
    cx, cy = rng.uniform(-0.3, 0.3, 2)
    vol[(x - cx) ** 2 + (y - cy) ** 2 < 0.04] = 0.9
    vol += rng.normal(0, 0.01, SHAPE).astype(np.float32)
    return np.clip(vol, 0, 1)


def _write_dataset(root: Path, n: int = 3) -> Path:
    entries = []
    for i in range(n):
        rel = f"phantom/images/case_{i:04d}.nii.gz"
        save_nifti(_volume(i), np.diag([2.0, 2.0, 3.0, 1.0]), root / rel, np.float32)
        entries.append({
            "image": rel, "dim": list(SHAPE), "spacing": [2.0, 2.0, 3.0], "top_region_index": [0, 1, 0, 0],
            "bottom_region_index": [0, 0, 1, 0], "fold": i % 2, "case_id": f"case_{i:04d}", "source": "phantom",
        })  # fmt: skip
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}), encoding="utf-8")
    return datalist


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: small 3-D convolutions run fastest so, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("prepared"))


def _run(datalist: Path, out: Path, settings: tv.VaeSettings = BASE) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return tv.train_vae(datalist, settings, out / "autoencoder.pt", out / "curve.png", out / "resume.pt")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "autoencoder.pt", weights_only=True)["autoencoder_state_dict"]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def baseline(datalist, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Weights of an uninterrupted run with BASE."""
    out = tmp_path_factory.mktemp("baseline")
    _run(datalist, out)
    return _weights(out)


def _spy_steps(monkeypatch, crash_at: int | None = None) -> list[int]:
    """Record the steps the training loop draws data for; raise at ``crash_at``."""
    seen: list[int] = []
    real = tv.step_generator

    def spy(seed, stage, step, *args, **kwargs):
        if step == crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        seen.append(step)
        return real(seed, stage, step, *args, **kwargs)

    monkeypatch.setattr(tv, "step_generator", spy)
    return seen


def _recon_l1(model: torch.nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.stack([_volume(i) for i in range(3)])[:, None])
        return float(torch.nn.functional.l1_loss(model.reconstruct(x), x))


# --------------------------------------------------------------------------- outputs and learning


def test_train_writes_checkpoint_sidecar_curve_and_learns(datalist, tmp_path):
    settings = replace(BASE, steps=30, patch_sizes=((16, 16, 16),), checkpoint_every=10)
    metrics = _run(datalist, tmp_path, settings)

    model = load_autoencoder(tmp_path / "autoencoder.pt", "tiny")
    raw = torch.load(tmp_path / "autoencoder.pt", weights_only=True)
    assert raw["variant"] == "tiny" and raw["steps"] == 30

    meta = json.loads((tmp_path / "autoencoder.pt.json").read_text(encoding="utf-8"))
    assert meta["stage"] == "train_vae"
    assert meta["settings"] == json.loads(settings.to_json())
    images = [datalist.parent / f"phantom/images/case_{i:04d}.nii.gz" for i in range(3)]
    assert meta["data_fingerprint"] == files_fingerprint(images)
    assert meta["cases"] == 3
    # 3 cases, fewer than model.min_training_cases (50 by default): the sidecar says results may blur
    assert meta["small_data_warning"].startswith("train_vae: trained on 3 case(s), fewer than model.min_training_cases (50)")
    assert meta["perceptual"] == tv.PERCEPTUAL_OFF == "off: no local weights (train_vae.perceptual_cache_dir)"
    assert meta["metrics"] == pytest.approx(metrics)
    assert {"final_l1", "mean_l1", "final_kl", "final_total", "final_adv_g", "final_disc"} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "resume.pt").exists()  # cleared at the end

    # Learning: the trained autoencoder reconstructs the volumes better than its (same-seed) initialisation.
    seed_everything(settings.seed)
    initial = build_autoencoder("tiny")
    before, after = _recon_l1(initial), _recon_l1(model)
    assert after < 0.7 * before, (before, after)


def test_patches_follow_the_schedule_and_are_padded(datalist):
    assert [tv.patch_size_for_step(BASE, s) for s in range(6)] == [(16, 16, 16)] * 3 + [(16, 16, 40)] * 3
    volumes = tv._Volumes(tv.read_training_images(datalist))
    gen = torch.Generator().manual_seed(0)
    batch = tv._draw_batch(volumes, (16, 16, 40), 2, gen)
    assert batch.shape == (2, 1, 16, 16, 40) and batch.dtype == torch.float32
    assert torch.all(batch[..., :4] == 0) and torch.all(batch[..., -4:] == 0)  # 32 -> 40: 4 zero slices each side


def test_settings_from_config_and_json_round_trip():
    block = {"steps": 10, "batch_size": 1, "patch_sizes": [[64, 64, 64], [128, 128, 128]], "lr": 1.0e-4, "seed": 3}
    s = tv.VaeSettings.from_config(validated(train_vae=block, model={"variant": "rflow-ct", "device": "cpu"}))
    assert s.patch_sizes == ((64, 64, 64), (128, 128, 128)) and s.lr == 1e-4 and s.variant == "rflow-ct" and s.device == "cpu"
    assert tv.VaeSettings.from_json(s.to_json()) == s
    assert s.to_json() == json.dumps(json.loads(s.to_json()), sort_keys=True)
    with pytest.raises(ConfigError, match="bogus"):
        validated(train_vae={"bogus": 1})
    # YAML 1.1 reads 1e-4 (no dot) as text: the schema names the key
    with pytest.raises(ConfigError, match="train_vae.lr"):
        validated(train_vae={"lr": "1e-4"})
    with pytest.raises(ValueError, match="train_vae.steps"):
        tv.VaeSettings(steps=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        tv.VaeSettings(patch_sizes=((30, 32, 32),))


# --------------------------------------------------------------------------- reproducibility and resume


def test_same_settings_give_identical_weights_and_another_seed_differs(datalist, baseline, tmp_path):
    _run(datalist, tmp_path / "again")
    assert _same(_weights(tmp_path / "again"), baseline)
    _run(datalist, tmp_path / "seed1", replace(BASE, seed=1))
    assert not _same(_weights(tmp_path / "seed1"), baseline)


def test_crash_then_resume_matches_uninterrupted_run(datalist, baseline, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _spy_steps(m, crash_at=4)
        with pytest.raises(RuntimeError, match="simulated crash at step 4"):
            _run(datalist, tmp_path)
    state_file = tmp_path / "resume.pt"
    assert state_file.is_file()
    state = torch.load(state_file, weights_only=True)
    assert state["step"] == 4 and state["elapsed_s"] > 0
    assert not (tmp_path / "autoencoder.pt").exists()

    seen = _spy_steps(monkeypatch)
    _run(datalist, tmp_path)
    assert seen == [4, 5]  # it resumed, it did not start over
    assert _same(_weights(tmp_path), baseline)
    assert not state_file.exists()
    sidecar = json.loads((tmp_path / "autoencoder.pt.json").read_text(encoding="utf-8"))
    assert sidecar["resumed_from"] == 4 and sidecar["train_seconds"] >= state["elapsed_s"]  # the crashed run's time counts


def test_resume_state_of_other_settings_is_ignored(datalist, baseline, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _spy_steps(m, crash_at=4)
        with pytest.raises(RuntimeError):
            _run(datalist, tmp_path, replace(BASE, lr=5e-4))
    assert (tmp_path / "resume.pt").is_file()

    seen = _spy_steps(monkeypatch)
    _run(datalist, tmp_path)
    assert seen == list(range(6))
    assert _same(_weights(tmp_path), baseline)
    assert not (tmp_path / "resume.pt").exists()


# --------------------------------------------------------------------------- errors


def test_empty_datalist_is_an_error(tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": []}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"datalist\.json: the datalist has no training entries"):
        _run(datalist, tmp_path / "out")
    assert not (tmp_path / "out" / "autoencoder.pt").exists()


def test_missing_or_unreadable_image_is_named(tmp_path):
    datalist = _write_dataset(tmp_path, n=2)
    (tmp_path / "phantom/images/case_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"case_0001\.nii\.gz not found"):
        _run(datalist, tmp_path / "out")
    (tmp_path / "phantom/images/case_0001.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match=r"case_0001\.nii\.gz is unreadable"):
        _run(datalist, tmp_path / "out")
    assert not (tmp_path / "out" / "autoencoder.pt").exists()


def test_perceptual_needs_local_weights_and_lpips(datalist, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    with pytest.raises(ValueError, match="at least 20 voxels per axis"):
        _run(datalist, tmp_path / "out", replace(BASE, perceptual_cache_dir=str(cache)))
    settings = replace(BASE, patch_sizes=((32, 32, 32),), perceptual_cache_dir=str(cache))
    with pytest.raises(ValueError, match=r"checkpoints/squeezenet1_1-b8a52dc0\.pth"):
        _run(datalist, tmp_path / "out", settings)

    (cache / "checkpoints").mkdir()
    (cache / "checkpoints" / tv.SQUEEZENET_FILE).write_bytes(b"")
    real = tv.importlib.util.find_spec
    monkeypatch.setattr(tv.importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    with pytest.raises(ValueError, match="'lpips'") as info:
        _run(datalist, tmp_path / "out", settings)
    assert "squeezenet" not in str(info.value)
    assert not (tmp_path / "out" / "autoencoder.pt").exists()


def test_perceptual_loss_with_local_weights(datalist, tmp_path, monkeypatch):
    """With lpips installed and SqueezeNet weights in the cache (random ones here: nothing is downloaded)."""
    pytest.importorskip("lpips")
    torchvision = pytest.importorskip("torchvision")
    cache = tmp_path / "hub"
    (cache / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), cache / "checkpoints" / tv.SQUEEZENET_FILE)
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("attempted a download"))
    settings = replace(BASE, steps=2, patch_sizes=((32, 32, 32),), perceptual_cache_dir=str(cache))
    hub_dir = torch.hub.get_dir()
    metrics = _run(datalist, tmp_path / "out", settings)
    assert torch.hub.get_dir() == hub_dir  # PerceptualLoss's torch.hub.set_dir is undone
    meta = json.loads((tmp_path / "out" / "autoencoder.pt.json").read_text(encoding="utf-8"))
    assert meta["perceptual"] == "on"
    assert np.isfinite(metrics["final_perceptual"])
