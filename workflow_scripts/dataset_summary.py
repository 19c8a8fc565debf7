"""Snakemake script: figures and HTML summary of the prepared dataset (see maisi.prepare.dataset_summary)."""

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.prepare.dataset_summary import plot_dims_spacing, plot_montage, write_summary_html

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = read_table(smk.input.cases)
    rejected = read_table(smk.input.rejected)
    plot_dims_spacing(cases, smk.output.dims)
    plot_montage(cases, smk.output.montage, max_cases=smk.params.max_cases)
    write_summary_html(cases, rejected, [smk.output.dims, smk.output.montage], smk.output.html, smk.params.run_name)
