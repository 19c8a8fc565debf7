"""Snakemake script: prepare one shard of cases (see maisi.preprocess)."""

import json
from pathlib import Path

from maisi.logs import from_snakemake
from maisi.preprocess import PREPARED_COLUMNS, CaseInput, PreprocessSettings, preprocess_case
from maisi.shards import run_cases, write_table

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = [CaseInput.from_json(c) for c in json.loads(smk.params.cases)]
    settings = PreprocessSettings.from_json(smk.params.settings)
    out_root = Path(smk.output.table).parents[2]  # results/prepared/{source}/shards/{shard}.tsv
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
