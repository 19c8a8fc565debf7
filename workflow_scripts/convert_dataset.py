"""Snakemake script: extract a downloaded archive safely and convert it to the common layout."""

from pathlib import Path

from maisi.catalog import extract_entry, load_catalog
from maisi.converters import convert_dataset
from maisi.logs import from_snakemake

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    entry = load_catalog(smk.params.catalog)[smk.params.dataset]
    out_dir = Path(smk.output.table).parent
    raw = extract_entry(entry, smk.input.archive, out_dir / "raw", overwrite=True)
    convert_dataset(entry, raw, out_dir)
