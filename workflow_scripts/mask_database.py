"""Snakemake script: MAISI's mask database from the prepared dataset's label maps (see maisi.generate.mask_database)."""

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.generate.mask_database import build_mask_database, write_mask_database

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    write_mask_database(build_mask_database(read_table(smk.input.cases)), smk.output.database)
