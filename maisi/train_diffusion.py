"""Latent diffusion UNet training (MAISI's second stage), and what the ControlNet stage shares with it.

The UNet learns to denoise the autoencoder's latents, conditioned on the voxel spacing (mm) and the
top/bottom body-region one-hots (both x100, as MAISI feeds them). Every step draws fresh latents
``z = mu + sigma * eps`` from the cached posteriors (``.npz`` files), crops them (or takes whole
latents), scales them by the data's scale factor, adds noise with MONAI's RFlow (velocity target
``z - noise``) or DDPM (noise target) scheduler and minimises the L1 loss with Adam and a
polynomial learning-rate decay.

All random draws of step ``k`` come from ``step_generator(seed, stage, k)`` (RFlow's timestep
sampler, which uses torch's global generator, runs under a forked, re-seeded global generator), so
the same settings give the same weights and a resumed run continues exactly where it stopped.

The output is laid out like NVIDIA's released diffusion checkpoint, so
:func:`maisi.models.load_diffusion` reads both.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from maisi.latents import read_latent
from maisi.models import build_diffusion_unet, build_scheduler, condition_tensors, preset, select_device
from maisi.settings import DiffusionSettings, Patch, SettingsIO, check_settings
from maisi.shards import read_table
from maisi.training import (
    ResumeState,
    files_fingerprint,
    fingerprint,
    plot_losses,
    polynomial_lr,
    progress,
    save_checkpoint,
    seed_everything,
    step_generator,
)

__all__ = [
    "DiffusionSettings",
    "train_diffusion",
    "latent_records",
    "LatentCase",
    "read_cases",
    "scale_factor_of",
    "TrainLoop",
    "SettingsIO",
    "check_settings",
    "sample_batch",
    "noise_inputs",
]

log = logging.getLogger(__name__)

STAGE = "train_diffusion"
#: How many cases (sorted by case id) the scale factor is computed from (MAISI: the first batch).
SCALE_FACTOR_CASES = 8


# --------------------------------------------------------------------------- latent records


@dataclass
class LatentCase:
    """One training case: its latent posterior, conditioning inputs and (for the ControlNet) label file."""

    case_id: str
    path: Path
    mu: torch.Tensor  # (C, x, y, z) float32
    sigma: torch.Tensor
    spacing: list[float]
    top: list[int]
    bottom: list[int]
    label: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.mu.shape[1:])  # type: ignore[return-value]


def _rows(records: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(records, pd.DataFrame):
        return records.to_dict("records")
    return [dict(r) for r in records]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def read_cases(records: pd.DataFrame | Iterable[Mapping[str, Any]], need_label: bool = False) -> list[LatentCase]:
    """Load the latents of ``records`` (``case_id``, ``latent`` and, with ``need_label``, ``label``),
    sorted by case id."""
    rows = _rows(records)
    if not rows:
        raise ValueError("no latent records to train on (the record list is empty)")
    for i, row in enumerate(rows):
        for key in ("case_id", "latent"):
            if _blank(row.get(key)):
                raise ValueError(f"latent record {i} ({row.get('case_id', '?')}) has no '{key}'")
    rows.sort(key=lambda r: (str(r["case_id"]), str(r["latent"])))
    ids = [str(r["case_id"]) for r in rows]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate case ids in the latent records: {', '.join(dupes[:5])}")
    cases = []
    for row in rows:
        case_id = str(row["case_id"])
        label = None
        if need_label:
            if _blank(row.get("label")):
                raise ValueError(f"case {case_id}: no label map (the ControlNet needs one per case)")
            label = Path(str(row["label"]))
        data = read_latent(row["latent"])
        cases.append(
            LatentCase(
                case_id=case_id, path=Path(str(row["latent"])), mu=torch.from_numpy(data["mu"]), sigma=torch.from_numpy(data["sigma"]),
                spacing=[float(v) for v in data["spacing"].reshape(-1)],
                top=[int(v) for v in data["top_region_index"].reshape(-1)],
                bottom=[int(v) for v in data["bottom_region_index"].reshape(-1)], label=label,
            )
        )  # fmt: skip
    channels = {int(c.mu.shape[0]) for c in cases}
    if len(channels) > 1:
        raise ValueError(f"latents with different channel counts: {sorted(channels)}")
    return cases


def latent_records(tables: Sequence[str | os.PathLike] | str | os.PathLike, cases: str | os.PathLike | None = None) -> pd.DataFrame:
    """The training records from ``cache_latents``' shard tables: rows with a latent (and status ``ok``
    where the table has a status), with the ``label`` path joined from the prepared ``cases`` table
    (``results/prepared/cases.tsv``) when given. With several sources, case ids become ``source/case_id``."""
    paths = [tables] if isinstance(tables, (str, os.PathLike)) else list(tables)
    frames = [read_table(p) for p in paths]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case_id", "latent"])
    if "status" in frame.columns:
        skipped = frame[frame.status != "ok"]
        if len(skipped):
            log.info("leaving out %d cases without a latent (status not ok)", len(skipped))
        frame = frame[frame.status == "ok"]
    if "latent" not in frame.columns or "case_id" not in frame.columns:
        raise ValueError(f"latent tables {', '.join(map(str, paths))} lack a 'case_id' or 'latent' column")
    frame = frame[frame.latent != ""].copy()
    keys = ["source", "case_id"] if "source" in frame.columns else ["case_id"]
    if cases is not None:
        table = read_table(cases)
        on = [k for k in keys if k in table.columns]
        frame = frame.drop(columns=["label"], errors="ignore").merge(table[[*on, "label"]], on=on, how="left")
        frame["label"] = frame["label"].fillna("")
    if "source" in frame.columns and frame.source.nunique() > 1:
        frame["case_id"] = frame.source + "/" + frame.case_id
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------- sampling


def scale_factor_of(cases: Sequence[LatentCase], seed: int, stage: str = STAGE) -> torch.Tensor:
    """MAISI's scale factor ``1 / std(z)`` of sampled latents ``z = mu + sigma * eps`` (whole latents of
    the first :data:`SCALE_FACTOR_CASES` cases by case id, eps from the step-0 generator), float32."""
    gen = step_generator(seed, stage, 0)
    chosen = sorted(cases, key=lambda c: c.case_id)[:SCALE_FACTOR_CASES]
    z = [(c.mu + c.sigma * torch.randn(c.mu.shape, generator=gen)).reshape(-1) for c in chosen]
    std = torch.cat(z).std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError("the sampled latents have zero or non-finite spread; cannot compute the scale factor")
    return (1.0 / std).to(torch.float32)


def model_divisor(preset_name: str) -> int:
    """What every latent size must be a multiple of (the UNet halves it once per extra level)."""
    return 2 ** (len(preset(preset_name)["diffusion"]["num_channels"]) - 1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass
class Batch:
    """One step's sampled latents (scaled, CPU) and where each came from."""

    z: torch.Tensor  # (B, C, x, y, z)
    cases: list[LatentCase]
    starts: list[Patch]  # crop origin in latent voxels
    shape: Patch  # the (padded) spatial size of z


def _choose(gen: torch.Generator, pool: Sequence[int], first: int, batch_size: int) -> list[int]:
    """``first`` plus ``batch_size - 1`` other cases of ``pool`` (repeats only when the pool is too small)."""
    rest = [i for i in pool if i != first]
    perm = torch.randperm(len(rest), generator=gen).tolist() if rest else []
    chosen = [first] + [rest[i] for i in perm[: batch_size - 1]]
    while len(chosen) < batch_size:  # fewer cases than the batch: draw again
        chosen.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
    return chosen


def sample_batch(
    cases: Sequence[LatentCase], gen: torch.Generator, batch_size: int, patch: Patch | None, divisor: int, scale: torch.Tensor | float
) -> Batch:
    """Choose ``batch_size`` cases (random crops of size ``patch``, or whole latents of one shape), draw
    ``z = mu + sigma * eps`` and scale it. Latents smaller than the patch (or than a multiple of
    ``divisor``, for whole latents) are zero-padded at the far end."""
    first = int(torch.randint(len(cases), (1,), generator=gen))
    if patch is None:
        pool = [i for i, c in enumerate(cases) if c.shape == cases[first].shape]
        target: Patch = tuple(_round_up(n, divisor) for n in cases[first].shape)  # type: ignore[assignment]
    else:
        pool = list(range(len(cases)))
        target = tuple(int(p) for p in patch)  # type: ignore[assignment]
    chosen = _choose(gen, pool, first, batch_size)
    zs, starts = [], []
    for i in chosen:
        case = cases[i]
        start = tuple(int(torch.randint(max(n - p, 0) + 1, (1,), generator=gen)) for n, p in zip(case.shape, target, strict=True))
        sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, target, strict=True))
        mu, sigma = case.mu[sl], case.sigma[sl]
        z = mu + sigma * torch.randn(mu.shape, generator=gen)
        pad = [0] * 6
        for axis in range(3):  # F.pad takes (last axis first) (before, after) pairs
            pad[2 * (2 - axis) + 1] = target[axis] - z.shape[1 + axis]
        zs.append(F.pad(z, pad) if any(pad) else z)
        starts.append(start)  # type: ignore[arg-type]
    z = torch.stack(zs) * torch.as_tensor(scale, dtype=torch.float32)
    return Batch(z=z, cases=[cases[i] for i in chosen], starts=starts, shape=target)


def noise_inputs(scheduler: Any, kind: str, z: torch.Tensor, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, target) on ``device``: target = noise (DDPM) or ``z - noise`` (RFlow)."""
    noise = torch.randn(z.shape, generator=gen)
    if kind == "ddpm":
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), generator=gen)
    else:  # RFlowScheduler.sample_timesteps draws from torch's global generator: fork and seed it
        sub_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub_seed)
            timesteps = scheduler.sample_timesteps(z)
    z, noise, timesteps = z.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
    target = noise if kind == "ddpm" else z - noise
    return noisy, timesteps, target


def conditions(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    """The UNet's region and spacing keyword inputs for a batch (x100, as MAISI)."""
    top, bottom, spacing = condition_tensors(
        [c.top for c in batch.cases], [c.bottom for c in batch.cases], [c.spacing for c in batch.cases], device
    )
    return {"top_region_index_tensor": top, "bottom_region_index_tensor": bottom, "spacing_tensor": spacing}


def l1_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 loss in float32, optionally weighted per voxel."""
    diff = (prediction.float() - target.float()).abs()
    return diff.mean() if weight is None else (diff * weight).mean()


def check_patch(settings: Any, cases: Sequence[LatentCase]) -> int:
    """The model's size divisor; a patch that does not fit it is an error, small latents are padded."""
    divisor = model_divisor(settings.preset)
    if settings.latent_patch is not None:
        if any(p % divisor for p in settings.latent_patch):
            raise ValueError(f"latent_patch {tuple(settings.latent_patch)} must be a multiple of {divisor} per axis for preset '{settings.preset}'")
        small = [c.case_id for c in cases if any(n < p for n, p in zip(c.shape, settings.latent_patch, strict=True))]
        if small:
            log.info("%d latents smaller than the patch %s are zero-padded (e.g. %s)", len(small), settings.latent_patch, small[0])
    else:
        odd = [c.case_id for c in cases if any(n % divisor for n in c.shape)]
        if odd:
            log.info("%d whole latents are zero-padded to a multiple of %d (e.g. %s)", len(odd), divisor, odd[0])
    return divisor


# --------------------------------------------------------------------------- the training loop


class TrainLoop:
    """The loop both stages share: Adam, polynomial LR decay, AMP on CUDA, resume states, progress bar.

    ``loss_fn(step, generator)`` computes one step's loss (inside autocast); the generator is
    ``step_generator(seed, stage, step)``.
    """

    def __init__(self, stage: str, model: torch.nn.Module, settings: Any, device: torch.device, resume: ResumeState):
        self.stage, self.model, self.settings, self.device, self.resume = stage, model, settings, device, resume
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr)
        self.lr_scheduler = polynomial_lr(self.optimizer, settings.steps, settings.lr_power)
        self.amp = bool(settings.amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.history: list[float] = []
        self.start = 0
        self.extra: dict[str, Any] = {}
        state = resume.load()
        if state is not None:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.history = [float(v) for v in state["history"]]
            self.start = int(state["step"])
            self.extra = dict(state.get("extra", {}))

    def _save(self, step: int, extra: Mapping[str, Any]) -> None:
        self.resume.save(step, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "history": list(self.history), "extra": dict(extra),
        })  # fmt: skip

    def run(self, loss_fn: Callable[[int, torch.Generator], torch.Tensor], extra: Mapping[str, Any] | None = None) -> list[float]:
        """Train from the resumed (or first) step to ``settings.steps``; return the loss history."""
        s = self.settings
        extra = dict(extra or {})
        self.model.train()
        autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if self.amp else contextlib.nullcontext
        bar = progress(s.steps, self.start, self.stage)
        t0, done = time.perf_counter(), 0
        try:
            for step in range(self.start, s.steps):
                gen = step_generator(s.seed, self.stage, step)
                self.optimizer.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(step, gen)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.stage}: the loss became {loss.item()} at step {step}")
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.lr_scheduler.step()
                self.history.append(float(loss.item()))
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.history[-1]:.4f}", refresh=False)
                if (step + 1) % s.checkpoint_every == 0 and step + 1 < s.steps:
                    self._save(step + 1, extra)
        finally:
            bar.close()
        if done:
            log.info("%s: %d steps in %.1f s (%.3f s/step), final loss %.4f", self.stage, done, time.perf_counter() - t0,
                     (time.perf_counter() - t0) / done, self.history[-1])  # fmt: skip
        return self.history


def loss_metrics(history: Sequence[float]) -> dict[str, float]:
    """The sidecar's loss summary."""
    h = np.asarray(history, dtype=float)
    tail = h[-max(len(h) // 10, 1) :]
    return {"final_loss": float(h[-1]), "mean_loss": float(h.mean()), "first_loss": float(h[0]), "mean_loss_last_10pct": float(tail.mean())}


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict (what checkpoints hold)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- diffusion


def train_diffusion(
    records: pd.DataFrame | Iterable[Mapping[str, Any]],
    settings: DiffusionSettings,
    checkpoint: str | os.PathLike,
    curve_png: str | os.PathLike,
    resume_path: str | os.PathLike,
) -> dict[str, Any]:
    """Train the latent diffusion UNet on cached latents; write the checkpoint (+ JSON sidecar) and the
    loss curve. Returns the sidecar's metadata plus the loss history."""
    cases = read_cases(records)
    divisor = check_patch(settings, cases)
    data_fp = files_fingerprint([c.path for c in cases])
    device = select_device(settings.device)
    resume = ResumeState(resume_path, fingerprint({"stage": STAGE, "settings": settings.run_fingerprint(), "data": data_fp}))

    seed_everything(settings.seed)
    unet = build_diffusion_unet(settings.preset).to(device)
    scheduler = build_scheduler(settings.scheduler, settings.num_train_timesteps)
    loop = TrainLoop(STAGE, unet, settings, device, resume)
    if "scale_factor" in loop.extra:
        scale = torch.as_tensor(loop.extra["scale_factor"], dtype=torch.float32)
    else:
        scale = scale_factor_of(cases, settings.seed)
    log.info("%s: %d cases, preset %s, %s scheduler, device %s, scale factor %.5f, steps %d (from %d)", STAGE, len(cases),
             settings.preset, settings.scheduler, device, float(scale), settings.steps, loop.start)  # fmt: skip

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        batch = sample_batch(cases, gen, settings.batch_size, settings.latent_patch, divisor, scale)
        noisy, timesteps, target = noise_inputs(scheduler, settings.scheduler, batch.z, gen, device)
        prediction = unet(x=noisy, timesteps=timesteps, **conditions(batch, device))
        return l1_loss(prediction, target)

    history = loop.run(loss_fn, extra={"scale_factor": scale})
    metrics = loss_metrics(history)
    meta = {
        "stage": STAGE, "settings": asdict(settings), "data_fingerprint": data_fp, "metrics": metrics,
        "scale_factor": float(scale), "cases": [c.case_id for c in cases], "resumed_from": loop.start, "device": str(device),
    }  # fmt: skip
    payload = {
        "unet_state_dict": cpu_state(unet), "scale_factor": scale.clone(), "num_train_timesteps": int(settings.num_train_timesteps),
        "scheduler": settings.scheduler, "preset": settings.preset, "steps": int(settings.steps),
    }  # fmt: skip
    save_checkpoint(checkpoint, payload, meta, STAGE)
    plot_losses({"L1": history}, curve_png, f"diffusion UNet ({settings.scheduler}, {settings.preset})")
    resume.clear()
    return {**meta, "history": history}
