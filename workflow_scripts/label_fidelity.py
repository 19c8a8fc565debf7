"""Snakemake script: does each released mask-conditioned image show what its mask says (see maisi.evaluate.fidelity)."""

import torch

from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table, write_table
from maisi.evaluate.fidelity import FIDELITY_COLUMNS, fidelity_summary, label_fidelity_rows, totalseg_reader
from maisi.evaluate.privacy import audited_release
from maisi.evaluate.settings import FIDSettings, UtilitySettings
from maisi.evaluate.utility import resolve_classes, utility_budget, utility_reader
from maisi.prepare.totalsegmentator import TotalSegSettings

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    fid, utility = FIDSettings.from_json(smk.params.fid), UtilitySettings.from_json(smk.params.settings)
    # images generated from label maps, as the release holds them (privacy.on_copy drop)
    cases = audited_release(smk.input.qc, smk.input.get("audit"), smk.params.masked)
    if smk.params.segmenter == "utility":
        read, classes = utility_reader(smk.input.model, fid, utility_budget(utility).device)
    else:
        classes = resolve_classes(utility.classes)
        read = totalseg_reader(TotalSegSettings.from_json(smk.params.totalseg), smk.params.segmented, fid, classes)
    write_table(label_fidelity_rows(cases, read, fid, classes), smk.output.cases, "label_fidelity", FIDELITY_COLUMNS)
    held = read_table(smk.input.utility) if smk.input.get("utility") else None
    summary = fidelity_summary(read_table(smk.output.cases), held, smk.params.segmenter)
    write_table(summary.to_dict("records"), smk.output.summary, "label_fidelity", list(summary.columns))
