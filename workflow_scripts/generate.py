"""Snakemake script: generate one shard of a request (see maisi.generate)."""

import json
from pathlib import Path

import torch

from maisi.generate import GenerateSettings, generate_shard
from maisi.generation_plan import GenCase, GenerationRequest
from maisi.logs import from_snakemake

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    generate_shard(
        GenerationRequest.from_json(json.loads(smk.params.request)),
        [GenCase(**c) for c in json.loads(smk.params.cases)],
        {k: smk.input.get(k) for k in ("autoencoder", "diffusion", "controlnet")},
        smk.input.get("masks"),
        GenerateSettings.from_json(smk.params.settings),
        out_root=Path(smk.output.table).parents[2],  # results/generated/{request}/shards/{shard}.tsv
        table=smk.output.table,
    )
