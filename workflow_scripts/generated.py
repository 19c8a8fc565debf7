"""Snakemake script: the generated set's case table and mid-slice montage (see maisi.generate.generated)."""

import json

from maisi.core.logs import from_snakemake
from maisi.generate.generated import collect_generated, plot_generated

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = collect_generated(smk.input.tables, smk.output.cases)
    plot_generated(cases, smk.output.montage, json.loads(smk.params.requests))
