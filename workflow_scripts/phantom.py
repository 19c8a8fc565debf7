"""Snakemake script: generate one shard of procedural CT phantom cases (see maisi.sources.phantom)."""

import json

from maisi.core.logs import from_snakemake
from maisi.sources.phantom.shard import spec_from_dict, write_phantom_shard

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    specs = [spec_from_dict(d) for d in json.loads(smk.params.specs)]
    write_phantom_shard(specs, smk.wildcards.source, smk.output.table, threads=smk.threads)
