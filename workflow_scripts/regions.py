"""Snakemake script: top and bottom body regions of one shard (see maisi.regions)."""

import json

from maisi.logs import from_snakemake
from maisi.regions import derive_case_regions
from maisi.shards import read_table, run_cases, write_table

COLUMNS = ("case_id", "source", "status", "reason", "top_region", "bottom_region", "region_backend")

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cfg = json.loads(smk.params.regions)
    prepared = read_table(smk.input.table)
    ok = prepared[prepared.status == "ok"]

    def one(row):
        result = derive_case_regions(row.case_id, row.label or None, cfg)
        return {"source": row.source, "top_region": result.top, "bottom_region": result.bottom, "region_backend": result.backend}

    rows = run_cases(
        one,
        list(ok.itertuples()),
        case_id=lambda r: r.case_id,
        threads=smk.threads,
        on_error=smk.params.on_error,
        desc=f"regions {smk.wildcards.source}/{smk.wildcards.shard}",
    )
    for row in rows:
        row.setdefault("source", smk.wildcards.source)
    write_table(rows, smk.output.table, "regions", COLUMNS)
