"""Snakemake script: the QC shards' verdicts gathered, pass rate per organ and QC figures (see maisi.evaluate.qc_report)."""

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table, read_tables
from maisi.evaluate.qc import QCSettings, read_reference
from maisi.evaluate.qc_check import QC_SHARD_COLUMNS
from maisi.evaluate.qc_report import assess_generated, plot_generated_vs_real, plot_hu_histograms

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    settings = QCSettings.from_json(smk.params.settings)
    ranges = read_reference(smk.input.reference)
    generated, real = read_tables(smk.input.tables, QC_SHARD_COLUMNS), read_table(smk.input.real)
    assess_generated(generated, ranges, settings, smk.output.cases, smk.output.organs)
    plot_hu_histograms(generated, real, ranges, smk.output.histograms)
    plot_generated_vs_real(generated, real, smk.output.montage)
