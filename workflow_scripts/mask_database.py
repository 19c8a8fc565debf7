"""Snakemake script: MAISI's mask database from the prepared dataset's label maps (see maisi.masks)."""

from maisi.logs import from_snakemake
from maisi.masks import build_mask_database, write_mask_database
from maisi.shards import read_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    write_mask_database(build_mask_database(read_table(smk.input.cases)), smk.output.database)
