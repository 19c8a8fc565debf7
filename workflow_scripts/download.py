"""Snakemake script: download a catalog dataset's archive, resumably, checksum-verified."""

from maisi.catalog import load_catalog
from maisi.download import download
from maisi.logs import from_snakemake

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    entry = load_catalog(smk.params.catalog)[smk.wildcards.dataset]
    download(smk.params.url, smk.output[0], **entry.require_checksum())
