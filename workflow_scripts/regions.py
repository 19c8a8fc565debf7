"""Snakemake script: top and bottom body regions of one shard (see maisi.prepare.regions)."""

import json

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table, write_table
from maisi.prepare.regions import REGION_COLUMNS, shard_regions

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    rows = shard_regions(
        read_table(smk.input.table),
        read_table(smk.input.segmented) if "segmented" in smk.input.keys() else None,
        json.loads(smk.params.regions),
        threads=smk.threads,
        on_error=smk.params.on_error,
        desc=f"regions {smk.wildcards.source}/{smk.wildcards.shard}",
    )
    write_table(rows, smk.output.table, "regions", REGION_COLUMNS)
