"""Snakemake script: MAISI's mask database from the prepared dataset's label maps (the training split), or from
NVIDIA's candidate database; a database holding a held-out case's map is refused (see maisi.generate.mask_database)."""

from maisi.core.holdout import held_out_rows, training_rows
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.generate.mask_database import build_mask_database, check_held_out_masks, read_nvidia_candidates, write_mask_database

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = read_table(smk.input.cases)
    if smk.params.source == "nvidia":
        entries = read_nvidia_candidates(smk.input.candidates, smk.input.masks)
    else:
        entries = build_mask_database(training_rows(cases))
    check_held_out_masks(entries, held_out_rows(cases))
    write_mask_database(entries, smk.output.database)
