"""Snakemake script: download a catalog dataset's archive, resumably, checksum-verified."""

from maisi.core.logs import from_snakemake
from maisi.sources.catalog import load_catalog
from maisi.sources.download import download

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    entry = load_catalog(smk.params.catalog)[smk.wildcards.dataset]
    download(smk.params.url, smk.output[0], **entry.require_checksum())
