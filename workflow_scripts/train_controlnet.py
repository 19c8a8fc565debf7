"""Snakemake script: train the ControlNet on the frozen diffusion UNet (see maisi.train.controlnet)."""

import torch

from maisi.core.logs import from_snakemake
from maisi.train.batches import latent_records
from maisi.train.controlnet import train_controlnet
from maisi.train.settings import ControlNetSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    train_controlnet(
        latent_records(smk.input.latents, cases=smk.input.cases),
        smk.input.diffusion,
        ControlNetSettings.from_json(smk.params.settings),
        checkpoint=smk.output.checkpoint,
        curve_png=smk.output.curve,
        resume_path=smk.params.resume,
    )
