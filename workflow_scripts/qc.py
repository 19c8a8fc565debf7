"""Snakemake script: QC verdicts, pass rate per organ and QC figures of the generated set (see maisi.qc_report)."""

from maisi.logs import from_snakemake
from maisi.qc import QCSettings, read_reference
from maisi.qc_report import assess_generated, plot_generated_vs_real, plot_hu_histograms
from maisi.shards import read_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    settings = QCSettings.from_json(smk.params.settings)
    ranges = read_reference(smk.input.reference)
    generated, real = read_table(smk.input.generated), read_table(smk.input.real)
    assess_generated(generated, ranges, settings, smk.output.cases, smk.output.organs)
    plot_hu_histograms(generated, real, ranges, smk.output.histograms)
    plot_generated_vs_real(generated, real, smk.output.montage)
