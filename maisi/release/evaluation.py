"""The release's evaluation reports: the memorisation audit, label fidelity and downstream utility.

Each is a table the workflow made (``results/privacy``, ``results/label_fidelity``, ``results/utility``); the
release copies them under ``evaluation/`` and the data card says what they found, what they mean and where
they stop. A report that did not run is named with the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import pandas as pd

from maisi.core.tables import numeric, read_table

__all__ = ["EVALUATION_FILES", "read_evaluation", "privacy_columns", "evaluation_sections"]

#: Workflow key -> file name under the release's ``evaluation/`` folder.
EVALUATION_FILES: dict[str, str] = {
    "privacy": "privacy_audit.tsv", "privacy_held_out": "privacy_held_out.tsv", "privacy_figure": "privacy_distances.png",
    "fidelity": "label_fidelity_cases.tsv", "fidelity_summary": "label_fidelity.tsv",
    "utility": "utility.tsv", "utility_dice": "utility_dice.tsv", "utility_figure": "utility.png",
}  # fmt: skip


def read_evaluation(files: Mapping[str, str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """The tables among ``files`` (workflow key -> path), read as text columns."""
    unknown = sorted(set(files) - set(EVALUATION_FILES))
    if unknown:
        raise ValueError(f"unknown evaluation report(s) {unknown}; expected some of {', '.join(EVALUATION_FILES)}")
    return {k: read_table(p) for k, p in files.items() if str(p).endswith(".tsv")}


def privacy_columns(qc: pd.DataFrame, audit: pd.DataFrame | None) -> pd.DataFrame:
    """The QC table with each audited case's nearest training case, distance, threshold, image similarity and flag."""
    if audit is None:
        return qc
    keep = {"nearest_training": "privacy_nearest_training", "distance": "privacy_distance", "threshold": "privacy_threshold",
            "image_similarity": "privacy_image_similarity", "flagged": "privacy_flagged"}  # fmt: skip
    return qc.merge(audit[["case_id", *keep]].rename(columns=keep), on="case_id", how="left").fillna("")


def _f(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(v) else f"{v:.{digits}g}"


def _interval(row: Mapping[str, Any], name: str) -> str:
    return f"{_f(row[name])} [{_f(row[f'{name}_lo'])}, {_f(row[f'{name}_hi'])}]"


def _privacy(t: Mapping[str, pd.DataFrame], cfg: Mapping[str, Any]) -> list[str]:
    audit, held = t["privacy"], t["privacy_held_out"]
    block = cfg.get("privacy") or {}
    flagged = audit[audit["flagged"].str.lower() == "true"]
    gen, ref = numeric(audit["distance"]), numeric(held["distance"])
    threshold = _f(audit["threshold"].iloc[0]) if len(audit) else "n/a"
    similar = _f(audit["similarity_threshold"].iloc[0]) if len(audit) else "n/a"
    out = [
        f"For every released case, the nearest of the real cases the models were trained on, in the pooled features of FID's "
        f"`{audit['extractor'].iloc[0] if len(audit) else block.get('extractor')}` extractor, and the Pearson correlation of "
        f"that pair's HU values inside the body on FID's grid. The yardstick is the {len(held)} held-out real case(s), which "
        f"no generative stage saw: a generated case nearer to the training set than the {block.get('percentile', 5)}th "
        f"percentile of their distances (threshold {threshold}), and more alike its neighbour in image space than "
        f"all but that share of the held-out cases are alike theirs, at least `privacy.min_similarity` (correlation "
        f"threshold {similar}), is flagged as a possible copy (`privacy.on_copy: {block.get('on_copy', 'flag')}`).", "",
        "| | cases | nearest-training distance: min | median | max |", "|---|---|---|---|---|",
        f"| generated | {len(audit)} | {_f(gen.min())} | {_f(gen.median())} | {_f(gen.max())} |",
        f"| held-out real | {len(held)} | {_f(ref.min())} | {_f(ref.median())} | {_f(ref.max())} |", "",
        f"{len(flagged)} case(s) flagged" + (":" if len(flagged) else "."), "",
    ]  # fmt: skip
    out += [f"- {r.case_id}: nearest {r.nearest_training}, distance {_f(r.distance)}, image correlation {_f(r.image_similarity)}"
            for r in flagged.itertuples()] + ([""] if len(flagged) else [])  # fmt: skip
    masked = audit[audit["mask_source"] != ""] if "mask_source" in audit.columns else audit.iloc[:0]
    if len(masked):
        same = masked[masked["mask_source"] == masked["nearest_training"]]
        alike = numeric(same["image_similarity"])
        out += [f"{len(same)} of the {len(masked)} mask-conditioned case(s) lie nearest the training case their mask came from "
                "(`mask_source` in the audit table): that case's anatomy, by design"
                + (f"; their image correlation with it, {_f(alike.min())} to {_f(alike.max())}, says how much more came along."
                   if len(same) else "."), ""]  # fmt: skip
    out += ["**Limits.** The audit finds copies and near-copies of whole training volumes in one feature space; it cannot "
            "prove that no trace of a training patient remains (a copied organ in a new body, say). With few held-out cases "
            "the threshold is a coarse percentile. Per case: `evaluation/privacy_audit.tsv` and the `privacy_*` columns of "
            "`qc.tsv`; the figure is `evaluation/privacy_distances.png`.", ""]  # fmt: skip
    return out


def _fidelity(t: Mapping[str, pd.DataFrame]) -> list[str]:
    s = t["fidelity_summary"]
    segmenter = s["segmenter"].iloc[0] if len(s) else "n/a"
    out = [
        "Does each mask-conditioned image show what its mask says? A segmenter trained on real cases only "
        f"(`{segmenter}`) reads each released image; the table gives the Dice of its reading with the mask the image "
        "was generated from, per organ group the masks hold, beside the same segmenter's Dice on held-out real cases "
        "(what it can tell at best).", "",
        "| organ group | cases | Dice mean | median | lowest | segmenter on held-out real |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    out += [f"| {r['class']} | {r['n_cases']} | {_f(r['dice_mean'])} | {_f(r['dice_median'])} | {_f(r['dice_min'])} | "
            f"{_f(r['held_out_dice_real'])} |" for _, r in s.iterrows()]  # fmt: skip
    out += ["", "**Limits.** A low Dice says the image and its mask disagree *or* that the segmenter cannot find that organ; "
            "read it against the held-out column. Per case: `evaluation/label_fidelity_cases.tsv`.", ""]  # fmt: skip
    return out


def _utility(t: Mapping[str, pd.DataFrame], cfg: Mapping[str, Any]) -> list[str]:
    d = t["utility"]
    block = cfg.get("utility") or {}
    n_held = t["utility_dice"]["case_id"].nunique() if "utility_dice" in t else "n/a"
    out = [
        f"MONAI's SegResNet trained with one budget and seed ({block.get('steps')} steps, crops {block.get('crop')}) on "
        "(a) the real training cases, (b) real plus the released mask-conditioned cases, (c) those synthetic cases only; "
        f"each evaluated on the {n_held} held-out real case(s) no generative stage saw. Differences are means over the "
        "held-out cases with paired bootstrap intervals; an interval that excludes 0 is a difference those cases support.", "",
        "| class | held-out cases | Dice (a) real | (b) real + synthetic | (c) synthetic | (b) - (a) | (c) - (a) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    out += [f"| {r['class']} | {r['n_cases']} | {_f(r['dice_real'])} | {_f(r['dice_real+synthetic'])} | {_f(r['dice_synthetic'])} | "
            f"{_interval(r, 'b_minus_a')} | {_interval(r, 'c_minus_a')} |" for _, r in d.iterrows()]  # fmt: skip
    out += ["", "**Limits.** One seed, one budget, one network: the result speaks for this setting, not for every model trained "
            "on the data. With few held-out cases the intervals are wide, and classes absent from them read n/a. Per case: "
            "`evaluation/utility_dice.tsv`; the figure is `evaluation/utility.png`.", ""]  # fmt: skip
    return out


def evaluation_sections(tables: Mapping[str, pd.DataFrame], config: Mapping[str, Any]) -> list[str]:
    """The data card's sections on memorisation, label fidelity and downstream utility (each says when it did not run)."""
    held_out = float((config.get("dataset") or {}).get("held_out", 0) or 0)
    why_not = "dataset.held_out is 0: there are no held-out real cases to judge by" if held_out <= 0 else None
    out = ["## Privacy audit (memorisation)", ""]
    out += _privacy(tables, config) if "privacy" in tables else [f"Not run: {why_not or 'privacy.enabled is false'}.", ""]
    out += ["## Label fidelity", ""]
    out += _fidelity(tables) if "fidelity_summary" in tables else ["Not run: no mask-conditioned request, or label_fidelity.enabled is false.", ""]
    out += ["## Downstream utility", ""]
    out += _utility(tables, config) if "utility" in tables else [
        f"Not run: {why_not or 'no mask-conditioned request, or utility.enabled is false'}.", ""]  # fmt: skip
    return out
