"""Snakemake script: train the latent diffusion UNet (see maisi.train.diffusion)."""

import torch

from maisi.core.logs import from_snakemake
from maisi.train.batches import latent_records
from maisi.train.diffusion import train_diffusion
from maisi.train.settings import DiffusionSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    train_diffusion(
        latent_records(smk.input.latents, cases=smk.input.cases),  # held-out split refused; folds for validation
        DiffusionSettings.from_json(smk.params.settings),
        checkpoint=smk.output.checkpoint,
        curve_png=smk.output.curve,
        resume_path=smk.params.resume,
    )
