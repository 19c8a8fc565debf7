"""Snakemake script: encode one shard's prepared images into latents (see maisi.latents)."""

from pathlib import Path

import torch

from maisi.latents import LATENT_COLUMNS, LatentSettings, cache_shard
from maisi.logs import from_snakemake
from maisi.shards import read_table, write_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    rows = cache_shard(
        read_table(smk.input.prepared),
        read_table(smk.input.regions),
        smk.input.autoencoder,
        LatentSettings.from_json(smk.params.settings),
        out_root=Path(smk.output.table).parents[2],  # results/latents/{source}/shards/{shard}.tsv
        on_error=smk.params.on_error,
        desc=f"cache_latents {smk.wildcards.source}/{smk.wildcards.shard}",
    )
    write_table(rows, smk.output.table, "cache_latents", LATENT_COLUMNS)
