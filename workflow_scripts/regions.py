"""Snakemake script: top and bottom body regions of one shard (see maisi.regions)."""

import json

from maisi.logs import from_snakemake
from maisi.regions import REGION_COLUMNS, shard_regions
from maisi.shards import read_table, write_table

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
