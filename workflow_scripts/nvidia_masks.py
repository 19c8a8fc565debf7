"""Snakemake script: NVIDIA's mask archive extracted (checked member by member first; see maisi.sources.download.safe_extract)."""

from maisi.core.logs import from_snakemake
from maisi.sources.download import safe_extract

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    safe_extract(smk.input.archive, smk.output.folder, "zip", overwrite=True)
