"""Snakemake script: assemble the MAISI datalist and the case tables (see maisi.prepare.dataset)."""

from maisi.core.logs import from_snakemake
from maisi.prepare.dataset import write_dataset

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    write_dataset(
        smk.input.prepared,
        smk.input.regions,
        folds=smk.params.folds,
        datalist_path=smk.output.datalist,
        cases_path=smk.output.cases,
        rejected_path=smk.output.rejected,
        run_name=smk.params.run_name,
        held_out=smk.params.held_out,
        seed=smk.params.seed,
    )
