"""Snakemake script: FID's independent segmenter, trained on the real cases or reused from its cache (see maisi.evaluate.segmenter)."""

import torch

from maisi.core.holdout import training_rows
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.evaluate.segmenter import read_cases, train_segmenter
from maisi.evaluate.settings import FIDSettings, SegmenterSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    images, labels = read_cases(training_rows(read_table(smk.input.real)).to_dict("records"))  # the training split
    train_segmenter(
        images, labels, SegmenterSettings.from_json(smk.params.settings), FIDSettings.from_json(smk.params.fid),
        smk.output.model, losses=smk.output.losses,
    )  # fmt: skip
