"""What the training stages share: per-step seeds, resumable state, checkpoints with sidecars,
loss curves and progress bars.

Reproducibility: every random draw of step ``k`` comes from a generator seeded with
``derive_seed(seed, stage, k)``, so a run resumed at step ``k`` continues exactly as an
uninterrupted run would, without saving RNG states.

Several processes (:mod:`maisi.train.distributed`): every rank draws the step's whole global batch from
that generator and trains on its slice (``TrainLoop.part``) through ``TrainLoop.net``, the
``DistributedDataParallel`` wrapper; the loss history is the mean over the ranks, and only rank 0 writes
(checkpoints, sidecars, loss curves and resume states: the writers here do nothing on the other ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maisi.core.io import atomic_path, sha256_file, write_json
from maisi.core.provenance import provenance
from maisi.core.seeds import derive_seed
from maisi.train.distributed import World, world

__all__ = [
    "small_data_warning",
    "step_generator",
    "seed_everything",
    "fingerprint",
    "files_fingerprint",
    "ResumeState",
    "save_checkpoint",
    "plot_losses",
    "progress",
    "polynomial_lr",
    "TrainLoop",
]

log = logging.getLogger(__name__)


def small_data_warning(stage: str, n_cases: int, min_cases: int) -> str | None:
    """A warning (logged, and returned for the checkpoint's sidecar) when a stage trains on fewer than
    ``min_cases`` cases (``model.min_training_cases``); None otherwise."""
    if n_cases >= min_cases:
        return None
    message = (f"{stage}: trained on {n_cases} case(s), fewer than model.min_training_cases ({min_cases}): results may blur "
               "(NVIDIA's users report blurry images after training or fine-tuning MAISI on small datasets); more cases help, "
               "and when fine-tuning, fewer steps or a lower learning rate")  # fmt: skip
    log.warning(message)
    return message


def step_generator(seed: int, stage: str, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for one training step, seeded from (seed, stage, step)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, stage, step))
    return gen


def seed_everything(seed: int) -> None:
    """Seed torch (model initialisation) and make CPU kernels deterministic where torch can."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (sorted keys): what a checkpoint was trained from."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def files_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 over the sorted files' sha256 sums (the 'data hash' of a training run)."""
    return fingerprint(sorted((Path(p).name, sha256_file(p)) for p in paths))


class ResumeState:
    """The last training state of a stage, kept beside (not as) the stage's output.

    Snakemake removes a failed job's outputs, so the state lives in its own file. It is reused
    only when its fingerprint (config + data) equals the current run's.
    """

    def __init__(self, path: str | os.PathLike, run_fingerprint: str):
        self.path = Path(path)
        self.run_fingerprint = run_fingerprint
        self._clock = time.monotonic()
        self._before = 0.0  # training seconds of the runs this one resumes

    def elapsed_s(self) -> float:
        """Seconds of training so far: this run's plus those of the runs it resumed (a long training spans several)."""
        return self._before + time.monotonic() - self._clock

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a broken state file is ignored, training restarts
            log.warning("ignoring unreadable resume state %s (%s)", self.path, exc)
            return None
        if state.get("fingerprint") != self.run_fingerprint:
            log.info("resume state %s belongs to another config or dataset; starting afresh", self.path)
            return None
        log.info("resuming from %s at step %d", self.path, state["step"])
        self._before = float(state.get("elapsed_s", 0.0))
        return state

    def save(self, step: int, payload: Mapping[str, Any]) -> None:
        """Write the state (rank 0 only)."""
        if not world().main:
            return
        with atomic_path(self.path, suffix=".pt") as tmp:
            torch.save({"fingerprint": self.run_fingerprint, "step": int(step), "elapsed_s": self.elapsed_s(), **payload}, str(tmp))

    def clear(self) -> None:
        """Remove the state (rank 0 only)."""
        if world().main:
            self.path.unlink(missing_ok=True)


def save_checkpoint(dest: str | os.PathLike, payload: Mapping[str, Any], meta: Mapping[str, Any], step: str) -> Path:
    """Atomically ``torch.save`` a checkpoint dict, then its JSON sidecar (config, data hash, metrics,
    the number of training processes, sha256 and provenance). Rank 0 only: other ranks write nothing."""
    dest = Path(dest)
    here = world()
    if not here.main:
        return dest
    with atomic_path(dest, suffix=".pt") as tmp:
        torch.save(dict(payload), str(tmp))
    write_json(
        dest.with_name(dest.name + ".json"),
        {"file": dest.name, "sha256": sha256_file(dest), "processes": here.size, **dict(meta), "provenance": provenance(step)},
    )
    return dest


def plot_losses(
    history: Mapping[str, Sequence[float]],
    dest: str | os.PathLike,
    title: str,
    validation: Mapping[str, Sequence[tuple[int, float]]] | None = None,
) -> None:
    """Loss curves (one line per loss, log scale when all positive) as PNG, written atomically (rank 0 only).

    ``validation``: curves known at some steps only, ``(step, loss)`` pairs (validation losses), drawn with markers.
    """
    if not world().main:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    positive = True
    for name, values in history.items():
        values = np.asarray(values, dtype=float)
        if values.size == 0:
            continue
        positive &= bool(np.all(values > 0))
        ax.plot(np.arange(1, values.size + 1), values, label=name, lw=1)
        if values.size >= 10:
            k = max(values.size // 20, 2)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, values.size + 1), smooth, lw=2, alpha=0.6, label=f"{name} (mean of {k})")
    for name, points in (validation or {}).items():
        if not points:
            continue
        steps, values = (np.asarray(v, dtype=float) for v in zip(*points, strict=True))
        positive &= bool(np.all(values > 0))
        ax.plot(steps, values, "o-", ms=3, lw=1.5, label=name)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def progress(total: int, initial: int, desc: str):
    """A tqdm bar over training steps; set the loss with ``bar.set_postfix(loss=...)``. Silent on ranks other than 0."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="step", mininterval=1.0, dynamic_ncols=True, disable=not world().main
    )


def polynomial_lr(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 2.0):
    """MAISI's polynomial learning-rate decay over ``total_steps``."""
    return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=max(int(total_steps), 1), power=power)


class TrainLoop:
    """The loop both stages share: Adam, polynomial LR decay, AMP on CUDA, resume states, progress bar.

    ``loss_fn(step, generator)`` computes one step's loss (inside autocast); the generator is
    ``step_generator(seed, stage, step)``. It draws the global batch (``settings.batch_size``) from the
    generator, keeps the rows ``part`` and calls the model as ``net`` (with several processes the
    ``DistributedDataParallel`` wrapper, which averages the gradients over the ranks; else the model).
    ``stage`` is also the config section whose ``batch_size`` an uneven split names.

    ``validate()`` (optional) gives the validation loss; it is called every ``settings.validation_every`` steps
    and after the last, on rank 0 only, under ``torch.no_grad`` with the model in eval mode. Its ``(step, loss)``
    pairs are ``validation`` (kept in the resume state).
    """

    def __init__(self, stage: str, model: torch.nn.Module, settings: Any, device: torch.device, resume: ResumeState):
        self.stage, self.model, self.settings, self.device, self.resume = stage, model, settings, device, resume
        self.world: World = world()
        self.part: slice = self.world.part(settings.batch_size, f"{stage}.batch_size")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr)
        self.lr_scheduler = polynomial_lr(self.optimizer, settings.steps, settings.lr_power)
        self.amp = bool(settings.amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.history: list[float] = []
        self.validation: list[tuple[int, float]] = []
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
            self.validation = [(int(step), float(value)) for step, value in state.get("validation", [])]
        self.net: torch.nn.Module = model
        if self.world.size > 1:  # after loading the state; DDP copies rank 0's weights to the others here
            from torch.nn.parallel import DistributedDataParallel

            # Every parameter of the UNet and the ControlNet gets a gradient (all variants), so DDP need not search the
            # graph for unused ones. A loss_fn calls the net once per step (DDP's gradient hooks expect one forward).
            self.net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def _save(self, step: int, extra: Mapping[str, Any]) -> None:
        if not self.world.main:
            return
        self.resume.save(step, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "history": list(self.history), "extra": dict(extra), "validation": list(self.validation),
        })  # fmt: skip

    def _validate(self, step: int, validate: Callable[[], float], autocast: Callable[[], Any]) -> None:
        """The validation loss after ``step`` steps (rank 0 only; the other ranks go on to the next step's sync)."""
        if not self.world.main:
            return
        self.model.eval()
        try:
            with torch.no_grad(), autocast():
                value = float(validate())
        finally:
            self.model.train()
        self.validation.append((step, value))
        log.info("%s: step %d, validation loss %.4f (training loss %.4f)", self.stage, step, value, self.history[-1])

    def validation_metrics(self) -> dict[str, float]:
        """The sidecar's validation summary: the last validation loss (nothing without validation)."""
        return {"validation_loss": self.validation[-1][1]} if self.validation else {}

    def run(
        self,
        loss_fn: Callable[[int, torch.Generator], torch.Tensor],
        extra: Mapping[str, Any] | None = None,
        validate: Callable[[], float] | None = None,
    ) -> list[float]:
        """Train from the resumed (or first) step to ``settings.steps``; return the loss history."""
        s = self.settings
        extra = dict(extra or {})
        every = int(getattr(s, "validation_every", 0) or 0) if validate is not None else 0
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
                value = self.world.mean(loss)  # the global batch's loss: every rank stops together on a bad one
                if not np.isfinite(value):
                    raise FloatingPointError(f"{self.stage}: the loss became {value} at step {step}")
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.lr_scheduler.step()
                self.history.append(value)
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{self.history[-1]:.4f}", refresh=False)
                if every and ((step + 1) % every == 0 or step + 1 == s.steps):
                    self._validate(step + 1, validate, autocast)  # type: ignore[arg-type]
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
    return {
        "final_loss": float(h[-1]),
        "mean_loss": float(h.mean()),
        "first_loss": float(h[0]),
        "mean_loss_last_10pct": float(tail.mean()),
    }


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict (what checkpoints hold)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
