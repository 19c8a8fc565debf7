"""Snakemake script: the generated set's case table and mid-slice montage (see maisi.generated)."""

import json

from maisi.generated import collect_generated, plot_generated
from maisi.logs import from_snakemake

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = collect_generated(smk.input.tables, smk.output.cases)
    plot_generated(cases, smk.output.montage, json.loads(smk.params.requests))
