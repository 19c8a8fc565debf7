"""Snakemake script: check one generation shard, generating failing cases again (see maisi.qc_shard)."""

import json
from pathlib import Path

import torch

from maisi.generate import GenerateSettings
from maisi.generation_plan import GenCase, GenerationRequest
from maisi.logs import from_snakemake
from maisi.qc import QCSettings
from maisi.qc_shard import check_shard

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    check_shard(
        GenerationRequest.from_json(json.loads(smk.params.request)),
        [GenCase(**c) for c in json.loads(smk.params.cases)],
        smk.input.table,
        {k: smk.input.get(k) for k in ("autoencoder", "diffusion", "controlnet")},
        smk.input.get("masks"),
        GenerateSettings.from_json(smk.params.settings),
        QCSettings.from_json(smk.params.qc),
        smk.input.reference,
        root=Path(smk.output.table).parents[2] / "regenerated",  # results/qc/shards/{request}/{shard}.tsv
        table=smk.output.table,
    )
