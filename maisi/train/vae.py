"""MAISI's autoencoder training stage (MONAI's ``AutoencoderKlMaisi``), as the Snakemake rule calls it.

Losses as in MAISI's ``train_vae`` tutorial: L1 reconstruction + ``kl_weight`` * KL + ``adv_weight`` *
least-squares patch-adversarial generator loss (a ``PatchDiscriminator`` with its own Adam step) +
``perceptual_weight`` * fake-3D SqueezeNet LPIPS (only with local weights: nothing is downloaded).

Training data are random patches of the prepared images (already scaled to [0, 1]). Every random
draw of step ``k`` (cases, crop corners, the VAE's latent noise, the perceptual loss's slice choice)
comes from generators seeded by (seed, "train_vae", k), so a run resumed from its resume state ends
with the same weights as an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from maisi.core.holdout import case_key, check_not_held_out
from maisi.core.seeds import derive_seed
from maisi.models.networks import build_autoencoder, build_discriminator, float32_norms_off, select_device
from maisi.train.loop import (
    ResumeState,
    files_fingerprint,
    fingerprint,
    plot_losses,
    polynomial_lr,
    progress,
    save_checkpoint,
    seed_everything,
    small_data_warning,
    step_generator,
)
from maisi.train.settings import VaeSettings

__all__ = ["STAGE", "SQUEEZENET_FILE", "PERCEPTUAL_OFF", "DatasetError", "train_vae", "read_training_images", "perceptual_status", "kl_loss", "patch_size_for_step"]

log = logging.getLogger(__name__)


STAGE = "train_vae"


#: torchvision's SqueezeNet 1.1 weights, as torch.hub stores them under ``<cache_dir>/checkpoints/``.
SQUEEZENET_FILE = "squeezenet1_1-b8a52dc0.pth"


PERCEPTUAL_OFF = "off: no local weights (train_vae.perceptual_cache_dir)"


#: SqueezeNet's pooling needs 2-D slices larger than 16 voxels a side.
PERCEPTUAL_MIN_PATCH = 20


#: Decoded volumes kept in memory at once (least recently used dropped first), by count and by size.
VOLUME_CACHE_ITEMS = 16


VOLUME_CACHE_BYTES = 4 << 30


class DatasetError(ValueError):
    """The datalist or one of its images cannot be used for training; the message names the file."""


def read_training_images(datalist: str | os.PathLike) -> list[Path]:
    """The training images of a MAISI datalist (paths relative to its folder), each checked readable; a
    training entry that is also a held-out (``testing``) one is refused."""
    datalist = Path(datalist)
    try:
        with open(datalist, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise DatasetError(f"{datalist}: datalist not found") from None
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{datalist}: unreadable datalist ({type(exc).__name__}: {exc})") from None
    entries = data.get("training") if isinstance(data, Mapping) else None
    if not entries:
        raise DatasetError(f"{datalist}: the datalist has no training entries")
    import nibabel as nib

    def key(entry: Mapping) -> str:
        return case_key(entry["source"], entry["case_id"]) if entry.get("source") and entry.get("case_id") else str(entry.get("image"))

    testing = [e for e in data.get("testing") or [] if isinstance(e, Mapping)]
    train_keys = {k: str(e.get("image")) for e in entries if isinstance(e, Mapping) for k in (key(e), str(e.get("image")))}
    check_not_held_out(train_keys, {key(e) for e in testing} | {str(e.get("image")) for e in testing}, "train_vae")
    images = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not entry.get("image"):
            raise DatasetError(f"{datalist}: training entry {i} has no 'image'")
        path = datalist.parent / entry["image"]
        if not path.is_file():
            raise DatasetError(f"{datalist}: training image {path} not found")
        try:
            shape = nib.load(str(path)).shape
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
            raise DatasetError(f"{datalist}: training image {path} is unreadable ({type(exc).__name__}: {exc})") from None
        if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
            raise DatasetError(f"{datalist}: training image {path} is not a 3-D volume (shape {tuple(shape)})")
        images.append(path)
    return images


class _Volumes:
    """Decoded float32 volumes, read once with nibabel and kept in a bounded LRU cache."""

    def __init__(self, paths: Sequence[Path], max_items: int = VOLUME_CACHE_ITEMS, max_bytes: int = VOLUME_CACHE_BYTES):
        import nibabel as nib

        self.paths = list(paths)
        self.shapes = [tuple(int(n) for n in nib.load(str(p)).shape[:3]) for p in self.paths]
        self.max_items, self.max_bytes = max_items, max_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        import nibabel as nib

        path = self.paths[index]
        try:
            array = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - corrupt or truncated data
            raise DatasetError(f"training image {path} is unreadable ({type(exc).__name__}: {exc})") from None
        array = np.ascontiguousarray(array.reshape(array.shape[:3]))
        self._cache[index] = array
        while len(self._cache) > 1 and (
            len(self._cache) > self.max_items or sum(a.nbytes for a in self._cache.values()) > self.max_bytes
        ):
            self._cache.popitem(last=False)
        return array


def _crop(volume: np.ndarray, shape: Sequence[int], patch: Sequence[int], gen: torch.Generator) -> np.ndarray:
    """A random ``patch``-sized crop; axes shorter than the patch are zero-padded (centred)."""
    slices, pads = [], []
    for n, p in zip(shape, patch, strict=True):
        start = int(torch.randint(max(n - p, 0) + 1, (1,), generator=gen))
        slices.append(slice(start, start + p))
        short = max(p - n, 0)
        pads.append((short // 2, short - short // 2))
    out = volume[tuple(slices)]
    if any(sum(p) for p in pads):
        out = np.pad(out, pads, mode="constant", constant_values=0.0)
    return out


def _draw_batch(volumes: _Volumes, patch: Sequence[int], batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, *patch) float32 patches: cases and corners drawn from ``gen``."""
    cases = torch.randint(len(volumes), (batch_size,), generator=gen).tolist()
    patches = [_crop(volumes.get(i), volumes.shapes[i], patch, gen) for i in cases]
    return torch.from_numpy(np.stack(patches)[:, None].astype(np.float32, copy=False))


def patch_size_for_step(settings: VaeSettings, step: int) -> tuple[int, int, int]:
    """The patch size of a step: the steps are split evenly over ``patch_sizes``, in order."""
    n = len(settings.patch_sizes)
    return settings.patch_sizes[min(step * n // settings.steps, n - 1)]


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """MAISI's KL term: batch mean of 0.5 * sum(mu^2 + sigma^2 - log(sigma^2) - 1)."""
    dims = list(range(1, z_sigma.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-10) - 1, dim=dims)
    return kl.sum() / kl.shape[0]


def perceptual_status(settings: VaeSettings) -> str:
    """``"on"`` or ``"off: <why>"``; a set cache dir without the weights or ``lpips`` is a ValueError."""
    if settings.perceptual_cache_dir is None:
        return PERCEPTUAL_OFF
    if settings.perceptual_weight == 0:
        return "off: train_vae.perceptual_weight is 0"
    small = [list(size) for size in settings.patch_sizes if min(size) < PERCEPTUAL_MIN_PATCH]
    if small:
        raise ValueError(
            f"train_vae: the perceptual loss (SqueezeNet on patch slices) needs patch sizes of at least {PERCEPTUAL_MIN_PATCH} "
            f"voxels per axis, got {small}; enlarge train_vae.patch_sizes or unset train_vae.perceptual_cache_dir"
        )
    missing = []
    weights = Path(settings.perceptual_cache_dir) / "checkpoints" / SQUEEZENET_FILE
    if not weights.is_file():
        missing.append(f"the SqueezeNet weights file {weights}")
    for package in ("lpips", "torchvision"):
        if importlib.util.find_spec(package) is None:
            missing.append(f"the Python package '{package}' (pip install {package})")
    if missing:
        raise ValueError(
            f"train_vae.perceptual_cache_dir is {settings.perceptual_cache_dir!r} but the perceptual loss needs "
            f"{' and '.join(missing)}; nothing is downloaded. Provide them, or unset perceptual_cache_dir to train without it."
        )
    return "on"


def _perceptual_loss(settings: VaeSettings, device: torch.device) -> torch.nn.Module:
    import warnings

    from monai.losses import PerceptualLoss

    hub_dir = torch.hub.get_dir()  # PerceptualLoss points torch.hub at cache_dir for the whole process
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting cache_dir")
            loss = PerceptualLoss(
                spatial_dims=3,
                network_type="squeeze",
                is_fake_3d=True,
                fake_3d_ratio=0.2,
                cache_dir=settings.perceptual_cache_dir,
            )
    finally:
        torch.hub.set_dir(hub_dir)
    return loss.to(device).eval()


@contextlib.contextmanager
def _step_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators (the VAE's latent noise, the perceptual slice choice) for one step."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _metrics(history: Mapping[str, Sequence[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, values in sorted(history.items()):
        if values:
            out[f"final_{name}"] = float(values[-1])
            out[f"mean_{name}"] = float(np.mean(values))
    return out


def train_vae(
    datalist: str | os.PathLike,
    settings: VaeSettings,
    checkpoint: str | os.PathLike,
    curve_png: str | os.PathLike,
    resume_path: str | os.PathLike,
) -> dict[str, float]:
    """Train the autoencoder; write ``checkpoint`` (``{"autoencoder_state_dict", "variant", "steps"}``) with its
    JSON sidecar and the loss-curve PNG; return the metrics (final and mean of each loss).

    The training state is saved to ``resume_path`` every ``checkpoint_every`` steps and reused by a rerun
    with the same settings (device aside) and data; it is removed once the checkpoint is written.
    """
    perceptual_on = perceptual_status(settings)
    images = read_training_images(datalist)
    volumes = _Volumes(images)
    data_fp = files_fingerprint(images)
    resume = ResumeState(resume_path, fingerprint({"stage": STAGE, "settings": settings.run_fingerprint(), "data": data_fp}))

    device = select_device(settings.device)
    amp_dtype: torch.dtype | None = None
    if device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    use_scaler = amp_dtype == torch.float16

    seed_everything(settings.seed)
    autoencoder = build_autoencoder(settings.variant).to(device)
    discriminator = build_discriminator(settings.variant).to(device)
    if amp_dtype is None:
        # The released variants' float16 group-norm outputs (a GPU memory saving) break plain float32 training.
        float32_norms_off(autoencoder)
    eps = 1e-6 if amp_dtype is not None else 1e-8  # as MAISI: a larger epsilon under mixed precision
    opt_g = torch.optim.Adam(autoencoder.parameters(), lr=settings.lr, eps=eps)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=settings.lr, eps=eps)
    decay = [polynomial_lr(opt, settings.steps, settings.lr_power) for opt in (opt_g, opt_d)]
    scaler_g = torch.amp.GradScaler("cuda", enabled=use_scaler)
    scaler_d = torch.amp.GradScaler("cuda", enabled=use_scaler)

    from monai.losses.adversarial_loss import PatchAdversarialLoss

    adv_loss = PatchAdversarialLoss(criterion="least_squares")
    perceptual = _perceptual_loss(settings, device) if perceptual_on == "on" else None

    history: dict[str, list[float]] = {"total": [], "l1": [], "kl": []}
    if perceptual is not None:
        history["perceptual"] = []
    if settings.adv_weight > 0:
        history.update(adv_g=[], disc=[])
    start = 0
    state = resume.load()
    if state is not None:
        autoencoder.load_state_dict(state["autoencoder"])
        discriminator.load_state_dict(state["discriminator"])
        opt_g.load_state_dict(state["optimizer_g"])
        opt_d.load_state_dict(state["optimizer_d"])
        for sched, key in zip(decay, ("lr_g", "lr_d"), strict=True):
            if key in state:
                sched.load_state_dict(state[key])
        if use_scaler and state.get("scaler_g"):
            scaler_g.load_state_dict(state["scaler_g"])
            scaler_d.load_state_dict(state["scaler_d"])
        history = {k: [float(v) for v in values] for k, values in state["history"].items()}
        start = int(state["step"])

    log.info(
        "train_vae: %d cases, variant %s, device %s%s, steps %d (from %d), patches %s, perceptual %s",
        len(volumes), settings.variant, device, f" ({amp_dtype})" if amp_dtype else "", settings.steps, start,
        [list(p) for p in settings.patch_sizes], perceptual_on,
    )  # fmt: skip

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=amp_dtype)

    autoencoder.train()
    discriminator.train()
    bar = progress(settings.steps, start, STAGE)
    try:
        for step in range(start, settings.steps):
            gen = step_generator(settings.seed, STAGE, step)
            images_t = _draw_batch(volumes, patch_size_for_step(settings, step), settings.batch_size, gen).to(device)
            adversarial = settings.adv_weight > 0 and step >= settings.adv_start
            values: dict[str, float] = {}
            with _step_rng(derive_seed(settings.seed, STAGE, "noise", step), device):
                # Generator (autoencoder) step; the discriminator only judges here, it gets no gradients.
                opt_g.zero_grad(set_to_none=True)
                discriminator.requires_grad_(False)
                with autocast():
                    recon, z_mu, z_sigma = autoencoder(images_t)
                    l1 = torch.nn.functional.l1_loss(recon.float(), images_t)
                    kl = kl_loss(z_mu.float(), z_sigma.float())
                    loss_g = l1 + settings.kl_weight * kl
                    values.update(l1=l1.item(), kl=kl.item())
                    if perceptual is not None:
                        p_loss = perceptual(recon.float(), images_t)
                        loss_g = loss_g + settings.perceptual_weight * p_loss
                        values["perceptual"] = p_loss.item()
                    if adversarial:
                        logits_fake = discriminator(recon.contiguous().float())[-1]
                        g_adv = adv_loss(logits_fake, target_is_real=True, for_discriminator=False)
                        loss_g = loss_g + settings.adv_weight * g_adv
                        values["adv_g"] = g_adv.item()
                values["total"] = loss_g.item()
                scaler_g.scale(loss_g).backward()
                scaler_g.step(opt_g)
                scaler_g.update()
                discriminator.requires_grad_(True)

                if adversarial:
                    opt_d.zero_grad(set_to_none=True)
                    with autocast():
                        logits_fake = discriminator(recon.contiguous().detach())[-1]
                        d_fake = adv_loss(logits_fake, target_is_real=False, for_discriminator=True)
                        logits_real = discriminator(images_t.contiguous().detach())[-1]
                        d_real = adv_loss(logits_real, target_is_real=True, for_discriminator=True)
                        loss_d = settings.adv_weight * 0.5 * (d_fake + d_real)
                    scaler_d.scale(loss_d).backward()
                    scaler_d.step(opt_d)
                    scaler_d.update()
                    values["disc"] = (0.5 * (d_fake + d_real)).item()
            for sched in decay:
                sched.step()

            if not math.isfinite(values["total"]):
                raise FloatingPointError(f"train_vae: loss is {values['total']} at step {step + 1}; lower train_vae.lr")
            for name, value in values.items():
                history.setdefault(name, []).append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{values['total']:.4g}", l1=f"{values['l1']:.4g}")

            done = step + 1
            if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.steps:
                resume.save(
                    done,
                    {
                        "autoencoder": autoencoder.state_dict(),
                        "discriminator": discriminator.state_dict(),
                        "optimizer_g": opt_g.state_dict(),
                        "optimizer_d": opt_d.state_dict(),
                        "lr_g": decay[0].state_dict(),
                        "lr_d": decay[1].state_dict(),
                        "scaler_g": scaler_g.state_dict() if use_scaler else {},
                        "scaler_d": scaler_d.state_dict() if use_scaler else {},
                        "history": history,
                    },
                )
                log.info(
                    "train_vae: step %d/%d, l1 %.4g; resume state saved to %s", done, settings.steps, values["l1"], resume.path
                )
    finally:
        bar.close()

    metrics = _metrics(history)
    meta = {
        "stage": STAGE,
        "settings": asdict(settings),
        "data_fingerprint": data_fp,
        "metrics": metrics,
        "cases": len(volumes),
        "device": str(device),
        "resumed_from": start,
        "train_seconds": round(resume.elapsed_s(), 1),  # over every run this one resumed
        "small_data_warning": small_data_warning(STAGE, len(volumes), settings.min_cases),
        "perceptual": perceptual_on,
    }
    payload = {"autoencoder_state_dict": _cpu_state(autoencoder), "variant": settings.variant, "steps": settings.steps}
    save_checkpoint(checkpoint, payload, meta, STAGE)
    # Series that started late (adversarial losses with adv_start > 0) would be drawn shifted: plot full ones only.
    curves = {k: v for k, v in history.items() if len(v) == settings.steps}
    plot_losses(curves, curve_png, f"train_vae: {settings.variant}, {settings.steps} steps, {len(volumes)} cases")
    resume.clear()
    log.info(
        "train_vae: wrote %s (%s)", checkpoint, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("final_"))
    )
    return metrics
