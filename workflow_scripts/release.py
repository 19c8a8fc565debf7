"""Snakemake script: build (or confirm) the versioned release (see maisi.release)."""

import json
from pathlib import Path

from maisi.core.io import write_json
from maisi.core.logs import from_snakemake
from maisi.release.build import build_release
from maisi.release.inputs import labels_present, released_cases

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    cases = released_cases(smk.input.qc)
    result = build_release(
        smk.params.root, smk.params.name, smk.params.version, cases,
        config=json.loads(smk.params.config), checkpoints=json.loads(smk.params.checkpoints),
        labels=labels_present(list(cases.label)), sources=json.loads(smk.params.sources),
        qc_table=smk.input.qc, qc_organs_table=smk.input.qc_organs, fid_table=smk.input.fid,
        repo_dir=Path(smk.scriptdir).parent, description=smk.params.description,  # the workflow's checkout (git state)
    )  # fmt: skip
    write_json(smk.output.record, {"path": str(result.path), "content_digest": result.content_digest,
                                   "created": result.created, "n_cases": result.n_cases})  # fmt: skip
