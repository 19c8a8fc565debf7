"""Snakemake script: 2.5-D FID of the released generated cases against the real cases (see maisi.evaluate.fid)."""

import torch

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.evaluate.fid import compute_fid, write_fid, write_fid_disabled
from maisi.evaluate.settings import FIDSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    if not smk.params.enabled:
        write_fid_disabled(smk.output.table, smk.output.record)
    else:
        qc = read_table(smk.input.qc)
        images = sorted(qc.image[qc.release != "excluded"])  # each released case's final attempt
        if len(images) < 2:
            write_fid_disabled(smk.output.table, smk.output.record, f"{len(images)} released case(s); FID needs at least 2")
        else:
            result = compute_fid(
                images, sorted(read_table(smk.input.real).image_hu), FIDSettings.from_json(smk.params.settings),
                autoencoder=smk.input.get("autoencoder"), variant=smk.params.variant, segmenter=smk.input.get("segmenter"),
            )  # fmt: skip
            write_fid(result, smk.output.table, smk.output.record)
