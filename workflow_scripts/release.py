"""Snakemake script: build (or confirm) the versioned release (see maisi.release)."""

import json
from pathlib import Path

from maisi.core.io import write_json
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.evaluate.privacy import apply_audit
from maisi.release.build import build_release
from maisi.release.inputs import labels_present, released_cases

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    evaluation = json.loads(smk.params.evaluation)
    cases = released_cases(smk.input.qc)
    if "privacy" in evaluation:  # a possible copy is flagged or left out (privacy.on_copy)
        cases = apply_audit(cases, read_table(evaluation["privacy"]), smk.params.on_copy)
    result = build_release(
        smk.params.root, smk.params.name, smk.params.version, cases,
        config=json.loads(smk.params.config), checkpoints=json.loads(smk.params.checkpoints),
        labels=labels_present(list(cases.label)), sources=json.loads(smk.params.sources),
        qc_table=smk.input.qc, qc_organs_table=smk.input.qc_organs, fid_table=smk.input.fid,
        repo_dir=Path(smk.scriptdir).parent, description=smk.params.description,  # the workflow's checkout (git state)
        evaluation=evaluation,
    )  # fmt: skip
    write_json(smk.output.record, {"path": str(result.path), "content_digest": result.content_digest,
                                   "created": result.created, "n_cases": result.n_cases})  # fmt: skip
