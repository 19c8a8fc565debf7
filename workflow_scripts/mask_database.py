"""Snakemake script: MAISI's mask database from the prepared dataset's label maps, or from NVIDIA's candidate
database (see maisi.generate.mask_database)."""

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.generate.mask_database import build_mask_database, read_nvidia_candidates, write_mask_database

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    if smk.params.source == "nvidia":
        entries = read_nvidia_candidates(smk.input.candidates, smk.input.masks)
    else:
        entries = build_mask_database(read_table(smk.input.cases))
    write_mask_database(entries, smk.output.database)
