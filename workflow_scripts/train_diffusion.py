"""Snakemake script: train the latent diffusion UNet (see maisi.train_diffusion)."""

import torch

from maisi.logs import from_snakemake
from maisi.train_diffusion import DiffusionSettings, latent_records, train_diffusion

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    train_diffusion(
        latent_records(smk.input.latents),
        DiffusionSettings.from_json(smk.params.settings),
        checkpoint=smk.output.checkpoint,
        curve_png=smk.output.curve,
        resume_path=smk.params.resume,
    )
