"""Snakemake script: generate one shard of a request (see maisi.generate). A request on the user's own label maps is
refused first when its folder holds a held-out case's map (see maisi.generate.user_masks.check_own_masks_held_out)."""

import json

import torch

from maisi.core.holdout import held_out_rows
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.generate.mask_generation import MASK_FILES
from maisi.generate.requests import GenCase, GenerationRequest
from maisi.generate.settings import GenerateSettings
from maisi.generate.shard import generate_shard
from maisi.generate.user_masks import check_own_masks_held_out, find_user_masks

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)  # torch's default ignores the job's share of the cores
    request = GenerationRequest.from_json(json.loads(smk.params.request))
    if request.masks and request.mask_source == "folder":
        where = f"generate.requests.{request.name}.mask_folder"
        check_own_masks_held_out(find_user_masks(request.mask_folder or {}, where), held_out_rows(read_table(smk.input.cases)), where)
    generate_shard(
        request,
        [GenCase(**c) for c in json.loads(smk.params.cases)],
        {k: smk.input.get(k) for k in ("autoencoder", "diffusion", "controlnet", *MASK_FILES)},
        smk.input.get("masks"),
        GenerateSettings.from_json(smk.params.settings),
        out_root=smk.params.out_root,
        table=smk.output.table,
    )
