"""Snakemake script: encode one shard's prepared images into latents (see maisi.train.cache_latents)."""


import torch

from maisi.core.holdout import held_out_keys
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table, write_table
from maisi.train.cache_latents import LATENT_COLUMNS, cache_shard
from maisi.train.settings import LatentSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    rows = cache_shard(
        read_table(smk.input.prepared),
        read_table(smk.input.regions),
        smk.input.autoencoder,
        LatentSettings.from_json(smk.params.settings),
        out_root=smk.params.out_root,
        on_error=smk.params.on_error,
        desc=f"cache_latents {smk.wildcards.source}/{smk.wildcards.shard}",
        held_out=held_out_keys(read_table(smk.input.cases)),
    )
    write_table(rows, smk.output.table, "cache_latents", LATENT_COLUMNS)
