"""Snakemake script: generate one shard of a request (see maisi.generate)."""

import json

import torch

from maisi.core.logs import from_snakemake
from maisi.generate.mask_generation import MASK_FILES
from maisi.generate.requests import GenCase, GenerationRequest
from maisi.generate.settings import GenerateSettings
from maisi.generate.shard import generate_shard

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    generate_shard(
        GenerationRequest.from_json(json.loads(smk.params.request)),
        [GenCase(**c) for c in json.loads(smk.params.cases)],
        {k: smk.input.get(k) for k in ("autoencoder", "diffusion", "controlnet", *MASK_FILES)},
        smk.input.get("masks"),
        GenerateSettings.from_json(smk.params.settings),
        out_root=smk.params.out_root,
        table=smk.output.table,
    )
