"""Snakemake script: evaluate the three utility arms on the held-out real cases (see maisi.evaluate.utility)."""

import torch

from maisi.core.holdout import case_files, require_held_out
from maisi.core.logs import from_snakemake
from maisi.core.tables import read_table, write_table
from maisi.evaluate.settings import FIDSettings, UtilitySettings
from maisi.evaluate.utility import DIFFERENCE_COLUMNS, evaluate_arms, load_pairs, load_segmentation, plot_utility, utility_budget

smk = snakemake  # noqa: F821 (injected by Snakemake)
with from_snakemake(smk):
    torch.set_num_threads(smk.threads)
    settings, fid = UtilitySettings.from_json(smk.params.settings), FIDSettings.from_json(smk.params.fid)
    budget = utility_budget(settings)
    loaded = [load_segmentation(path, budget.device) for path in smk.input.models]
    models = {record["arm"]: model for model, record in loaded}
    classes = loaded[0][1]["classes"]
    held = case_files(require_held_out(read_table(smk.input.real), "utility", need_labels=True), labels=True)
    dice, differences = evaluate_arms(models, load_pairs(held, fid), classes, budget, settings.n_boot, settings.level)
    write_table(dice.to_dict("records"), smk.output.dice, "utility", list(dice.columns))
    write_table(differences.to_dict("records"), smk.output.differences, "utility", DIFFERENCE_COLUMNS)
    plot_utility(differences, smk.output.figure)
