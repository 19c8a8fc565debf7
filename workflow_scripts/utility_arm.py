"""Snakemake script: train one arm of the downstream-utility stage (see maisi.evaluate.utility)."""

import torch

from maisi.core.holdout import case_key, training_rows
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.evaluate.privacy import apply_audit
from maisi.evaluate.qc_report import released_cases
from maisi.evaluate.settings import FIDSettings, UtilitySettings
from maisi.evaluate.utility import arm_cases, load_pairs, resolve_classes, save_segmentation, train_segmentation, utility_budget

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    settings, fid = UtilitySettings.from_json(smk.params.settings), FIDSettings.from_json(smk.params.fid)
    real = training_rows(read_table(smk.input.real))
    real = {case_key(r.source, r.case_id): (r.image_hu or r.image, r.label) for r in real.itertuples() if r.label}
    synthetic = {}
    if smk.params.arm != "real":
        cases = released_cases(smk.input.qc)
        if smk.input.get("audit"):  # privacy.on_copy drop: what the release leaves out, the arms do not learn from
            cases = apply_audit(cases, read_table(smk.input.audit), "drop")
        cases = cases[cases.request.isin(smk.params.masked)]  # images generated from these label maps
        synthetic = {f"generated/{r.case_id}": (r.image, r.label) for r in cases.itertuples()}
    classes, budget = resolve_classes(settings.classes), utility_budget(settings)
    used = {**(real if smk.params.arm != "synthetic" else {}), **(synthetic if smk.params.arm != "real" else {})}
    pairs = load_pairs(used, fid)
    model = train_segmentation(
        arm_cases(smk.params.arm, [pairs[c] for c in real if c in pairs], [pairs[c] for c in synthetic], classes),
        len(classes), budget, smk.params.arm,
    )  # fmt: skip
    save_segmentation(model, smk.output.model, classes, budget, smk.params.arm, sorted(used))
