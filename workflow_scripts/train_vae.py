"""Snakemake script: train the autoencoder (see maisi.train.vae)."""

import torch

from maisi.core.logs import from_snakemake
from maisi.train.settings import VaeSettings
from maisi.train.vae import train_vae

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    train_vae(
        smk.input.datalist,
        VaeSettings.from_json(smk.params.settings),
        checkpoint=smk.output.checkpoint,
        curve_png=smk.output.curve,
        resume_path=smk.params.resume,
    )
