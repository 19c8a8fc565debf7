"""Snakemake script: per-organ median-HU ranges from the real prepared cases (see maisi.qc)."""

import json

from maisi.io import write_json
from maisi.logs import from_snakemake
from maisi.qc import QCSettings, build_reference
from maisi.qc_report import reference_record, reference_table
from maisi.shards import read_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    settings = QCSettings.from_config(json.loads(smk.params.settings))
    reference = build_reference(read_table(smk.input.cases).to_dict("records"), settings)
    write_json(smk.output.reference, reference_record(reference))
    reference_table(reference, smk.output.table)
