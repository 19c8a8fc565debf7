"""Snakemake script: check one generation shard, generating failing cases again (see maisi.evaluate.qc_check)."""

import json

import torch

from maisi.core.logs import from_snakemake
from maisi.evaluate.qc import QCSettings
from maisi.evaluate.qc_check import check_shard
from maisi.generate.mask_generation import MASK_FILES
from maisi.generate.requests import GenCase, GenerationRequest
from maisi.generate.settings import GenerateSettings
from maisi.prepare.totalsegmentator import TotalSegSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    check_shard(
        GenerationRequest.from_json(json.loads(smk.params.request)),
        [GenCase(**c) for c in json.loads(smk.params.cases)],
        smk.input.table,
        {k: smk.input.get(k) for k in ("autoencoder", "diffusion", "controlnet", *MASK_FILES)},
        smk.input.get("masks"),
        GenerateSettings.from_json(smk.params.settings),
        QCSettings.from_json(smk.params.qc),
        smk.input.reference,
        root=smk.params.regenerated,
        table=smk.output.table,
        segmenter=TotalSegSettings.from_json(smk.params.segmenter) if smk.params.segmenter else None,
        segmented=smk.params.segmented,
    )
