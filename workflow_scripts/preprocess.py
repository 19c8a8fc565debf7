"""Snakemake script: prepare one shard of cases (see maisi.prepare.preprocess)."""

import json

from maisi.core.logs import from_snakemake
from maisi.core.shards import run_cases
from maisi.core.tables import write_table
from maisi.prepare.preprocess import PREPARED_COLUMNS, PreprocessSettings, preprocess_case
from maisi.sources.cases import CaseInput

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = [CaseInput.from_json(c) for c in json.loads(smk.params.cases)]
    settings = PreprocessSettings.from_json(smk.params.settings)
    out_root = smk.params.out_root
    rows = run_cases(
        lambda case: preprocess_case(case, out_root, settings),
        cases,
        case_id=lambda c: c.case_id,
        threads=smk.threads,
        on_error=smk.params.on_error,
        desc=f"preprocess {smk.wildcards.source}/{smk.wildcards.shard}",
    )
    for row, case in zip(rows, cases, strict=True):
        row.setdefault("source", case.source)
    write_table(rows, smk.output.table, "preprocess", PREPARED_COLUMNS)
