"""Snakemake script: extract a downloaded archive safely and convert it to the common layout."""

from pathlib import Path

from maisi.core.logs import from_snakemake
from maisi.sources.catalog import extract_entry, load_catalog
from maisi.sources.converters import convert_dataset

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    entry = load_catalog(smk.params.catalog)[smk.params.dataset]
    out_dir = Path(smk.output.table).parent
    raw = extract_entry(entry, smk.input.archive, out_dir / "raw", overwrite=True)
    convert_dataset(entry, raw, out_dir)
