"""Snakemake script: train one arm of the downstream-utility stage (see maisi.evaluate.utility)."""

import torch

from maisi.core.holdout import case_files, training_rows
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table
from maisi.evaluate.privacy import audited_release
from maisi.evaluate.settings import FIDSettings, UtilitySettings
from maisi.evaluate.utility import arm_cases, load_pairs, resolve_classes, save_segmentation, train_segmentation, utility_budget

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    settings, fid = UtilitySettings.from_json(smk.params.settings), FIDSettings.from_json(smk.params.fid)
    real = case_files(training_rows(read_table(smk.input.real)), labels=True)
    synthetic = {}
    if smk.params.arm != "real":  # images generated from label maps, as the release holds them (privacy.on_copy drop)
        cases = audited_release(smk.input.qc, smk.input.get("audit"), smk.params.masked)
        synthetic = {f"generated/{r.case_id}": (r.image, r.label) for r in cases.itertuples()}
    classes, budget = resolve_classes(settings.classes), utility_budget(settings)
    used = {**(real if smk.params.arm != "synthetic" else {}), **(synthetic if smk.params.arm != "real" else {})}
    pairs = load_pairs(used, fid)
    model = train_segmentation(
        arm_cases(smk.params.arm, [pairs[c] for c in real if c in pairs], [pairs[c] for c in synthetic], classes),
        len(classes), budget, smk.params.arm,
    )  # fmt: skip
    save_segmentation(model, smk.output.model, classes, budget, smk.params.arm, sorted(used))
