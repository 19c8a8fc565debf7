"""Snakemake script: per-organ median-HU ranges from the real prepared cases, or NVIDIA's statistics (see maisi.evaluate.qc)."""


from maisi.core.holdout import training_rows
from maisi.core.io import write_json
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.evaluate.qc import QCSettings, build_reference, nvidia_reference
from maisi.evaluate.qc_report import reference_record, reference_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    settings = QCSettings.from_json(smk.params.settings)
    reference = build_reference(training_rows(read_table(smk.input.cases)).to_dict("records"), settings)
    if settings.reference == "nvidia":  # NVIDIA's organ ranges; the intensity ranges from the real data
        reference = nvidia_reference(settings.nvidia_statistics, reference["intensity"])
    write_json(smk.output.reference, reference_record(reference))
    reference_table(reference, smk.output.table)
