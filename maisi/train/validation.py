"""Validation loss on held-out cases, for the diffusion UNet and ControlNet stages.

With ``model.validation_every`` above 0, the cases of one fold of the prepared dataset
(``model.validation_fold``: the ``fold`` column of ``results/prepared/cases.tsv``) are left out of
training, and every ``validation_every`` steps (and after the last) the stage's loss is computed on them
without gradients. Each held-out case gives one sample whose crop, latent noise, timestep and diffusion
noise come from a generator seeded by (seed, stage, "validation", case id): the samples are the same at
every validation, so the curve is comparable between steps (and between runs that differ in their other
cases). At most ``model.validation_samples`` cases are used, a fixed choice among the fold's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from maisi.core.seeds import derive_seed
from maisi.train.batches import Batch, LatentCase, noise_inputs, sample_batch

__all__ = ["validating", "split_cases", "Validation"]

log = logging.getLogger(__name__)

#: ``loss_fn(batch, noisy, timesteps, target)``: a stage's loss of one batch of held-out samples (on the device).
LossOfBatch = Callable[[Batch, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def validating(settings: Any) -> bool:
    """Whether the settings ask for a validation loss (``validation_every`` above 0 and a ``validation_fold``)."""
    return int(getattr(settings, "validation_every", 0) or 0) > 0 and getattr(settings, "validation_fold", None) is not None


def split_cases(cases: Sequence[LatentCase], settings: Any) -> tuple[list[LatentCase], list[LatentCase]]:
    """(training cases, held-out cases) by the cases' folds; without validation every case trains.

    ``validation_fold`` -1 holds out the highest fold that holds cases. A fold with no case, a fold that holds
    every case, or cases without a fold are ``ValueError`` s naming the config key.
    """
    if not validating(settings):
        return list(cases), []
    missing = [c.case_id for c in cases if c.fold is None]
    if missing:
        raise ValueError(
            f"config key 'model.validation_every' ({settings.validation_every}) holds out a fold of the prepared dataset, "
            f"but {len(missing)} case(s) have no fold (e.g. {missing[0]}): the training records need the 'fold' column "
            "of results/prepared/cases.tsv (latent_records(..., cases=...))"
        )
    folds = sorted({int(c.fold) for c in cases})  # type: ignore[arg-type]
    fold = folds[-1] if settings.validation_fold == -1 else int(settings.validation_fold)
    held_out = [c for c in cases if c.fold == fold]
    training = [c for c in cases if c.fold != fold]
    if not held_out:
        raise ValueError(f"config key 'model.validation_fold' ({fold}): no case is in that fold (the cases' folds: {folds})")
    if not training:
        raise ValueError(
            f"config key 'model.validation_fold' ({settings.validation_fold}): fold {fold} holds all {len(cases)} cases "
            f"(their folds: {folds}), so none is left to train on; add cases, or set model.validation_fold to null "
            "(or model.validation_every to 0) to train on all of them"
        )
    log.info("validation: %d case(s) of fold %d held out, %d train", len(held_out), fold, len(training))
    return training, held_out


class Validation:
    """The validation loss of a stage: ``loss_fn`` over fixed samples of the held-out cases, averaged.

    Call it under ``torch.no_grad()`` with the networks in eval mode (:class:`maisi.train.loop.TrainLoop` does).
    """

    def __init__(
        self,
        stage: str,
        cases: Sequence[LatentCase],
        settings: Any,
        divisor: int,
        scale: torch.Tensor | float,
        scheduler: Any,
        kind: str,
        loss_fn: LossOfBatch,
        device: torch.device,
    ):
        if not cases:
            raise ValueError(f"{stage}: no held-out cases to validate on")
        self.stage, self.settings, self.divisor, self.scale = stage, settings, divisor, scale
        self.scheduler, self.kind, self.loss_fn, self.device = scheduler, kind, loss_fn, device
        ordered = sorted(cases, key=lambda c: c.case_id)
        gen = torch.Generator().manual_seed(derive_seed(settings.seed, stage, "validation"))
        chosen = torch.randperm(len(ordered), generator=gen).tolist()[: int(settings.validation_samples)]
        self.cases: list[LatentCase] = sorted((ordered[i] for i in chosen), key=lambda c: c.case_id)
        self.fold = self.cases[0].fold

    def samples(self) -> Iterator[tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each case's sample (a batch of one, its noisy latent, timestep and target on the device), drawn afresh
        from the case's own generator: the same every time."""
        for case in self.cases:
            gen = torch.Generator().manual_seed(derive_seed(self.settings.seed, self.stage, "validation", case.case_id))
            batch = sample_batch([case], gen, 1, self.settings.latent_patch, self.divisor, self.scale)
            noisy, timesteps, target = noise_inputs(self.scheduler, self.kind, batch.z, gen, self.device, batch.whole)
            yield batch, noisy, timesteps, target

    def __call__(self) -> float:
        """The mean of the samples' losses."""
        return float(np.mean([float(self.loss_fn(*sample).detach()) for sample in self.samples()]))

    def record(self, curve: Sequence[tuple[int, float]]) -> dict[str, Any]:
        """The sidecar's account of the validation: fold, cases, interval and the (step, loss) curve."""
        return {"fold": self.fold, "cases": [c.case_id for c in self.cases], "every": int(self.settings.validation_every),
                "curve": [[int(step), float(value)] for step, value in curve]}  # fmt: skip
