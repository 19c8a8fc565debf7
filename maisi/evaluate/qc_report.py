"""The QC stage's tables and pictures: per-case verdicts, pass rate per organ, HU histograms of
generated against real data per organ, and mid-slices of generated cases beside real ones."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from maisi.core.provenance import provenance
from maisi.core.tables import read_table, write_table
from maisi.evaluate.qc import OrganRange, QCSettings, load_case, organ_groups

__all__ = ["QC_CASE_COLUMNS", "QC_ORGAN_COLUMNS", "REFERENCE_COLUMNS", "assess_generated", "reference_table", "plot_hu_histograms", "plot_generated_vs_real", "released_cases"]

QC_CASE_COLUMNS = ("request", "case_id", "status", "attempt", "image", "label", "qc_status", "release", "qc_reasons", "checks", "medians", "unchecked")


QC_ORGAN_COLUMNS = ("organ", "low", "high", "n_reference", "n_cases", "n_pass", "pass_rate")


REFERENCE_COLUMNS = ("organ", "measure", "labels", "n", "mean", "sd", "p005", "p995", "low", "high")


def reference_table(reference: Mapping[str, Any], dest: str | os.PathLike) -> pd.DataFrame:
    """The reference ranges as a TSV: one row per organ (median HU), then the intensity check's shares
    (of the volume inside the body, of the body in each HU band) and the one-body check's (the body's structure)."""
    blocks = (("median HU", reference["ranges"], 1), ("share", reference.get("intensity", {}).get("ranges", {}), 4))
    rows = []
    for measure, ranges, digits in blocks:
        for name, r in (sorted(ranges.items()) if measure == "median HU" else ranges.items()):
            row = {**r, "organ": name, "measure": measure, "labels": json.dumps(list(r["labels"]))}
            rows.append({**row, **{col: round(float(r[col]), digits) for col in ("mean", "sd", "p005", "p995", "low", "high")}})
    return write_table(rows, dest, "qc_reference", REFERENCE_COLUMNS)


def assess_generated(
    checked: pd.DataFrame, ranges: Mapping[str, OrganRange], settings: QCSettings, cases_dest, organs_dest
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Decide each checked case's place in the release and write the QC tables.

    ``checked`` holds the QC shards' rows (:mod:`maisi.evaluate.qc_check`: the final attempt's files and
    verdict). A case is ``include`` (passed), ``flagged`` (failed, kept per ``qc.on_fail: flag``) or
    ``excluded``; the organ table gives each organ's range and its pass rate over the cases."""
    rows, per_organ = [], {}
    for r in checked.itertuples():
        passed = r.status == "ok" and r.qc_status == "pass"
        release = "include" if passed else ("flagged" if r.status == "ok" and settings.on_fail == "flag" else "excluded")
        rows.append({
            "request": r.request, "case_id": r.case_id, "status": r.status, "attempt": r.attempt, "image": r.image, "label": r.label,
            "qc_status": "pass" if passed else "fail", "release": release, "qc_reasons": r.qc_reasons or r.reason,
            "checks": r.checks or "", "medians": r.medians or "{}", "unchecked": r.unchecked or "[]",
        })  # fmt: skip
        for organ, median in json.loads(r.medians or "{}").items():
            if organ in ranges:
                per_organ.setdefault(organ, []).append(ranges[organ].contains(median))
    organs = []
    for organ, rng in sorted(ranges.items()):
        results = per_organ.get(organ, [])
        organs.append({
            "organ": organ, "low": round(rng.low, 1), "high": round(rng.high, 1), "n_reference": rng.n, "n_cases": len(results),
            "n_pass": int(sum(results)), "pass_rate": round(float(np.mean(results)), 3) if results else "",
        })  # fmt: skip
    cases = write_table(rows, cases_dest, "qc", QC_CASE_COLUMNS)
    return cases, write_table(organs, organs_dest, "qc", QC_ORGAN_COLUMNS)


def _hu_and_label(row) -> tuple[np.ndarray, np.ndarray]:
    image_hu = getattr(row, "image_hu", "")
    hu, lab, _, _ = load_case(image_hu or row.image, row.label, scaled=hasattr(row, "image_hu") and not image_hu)
    return hu, lab


def plot_hu_histograms(
    generated: pd.DataFrame, real: pd.DataFrame, ranges: Mapping[str, OrganRange], dest, max_organs: int = 12, seed: int = 0
) -> None:
    """Per organ, the HU distribution inside the organ in generated and in real cases (density),
    with the organ's allowed median range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maisi.core.figures import save_figure

    rng = np.random.default_rng(seed)
    values: dict[str, dict[str, list[np.ndarray]]] = {}
    for kind, frame in (("generated", generated[generated.status == "ok"] if "status" in generated else generated), ("real", real)):
        for row in frame.itertuples():
            if not row.label:
                continue
            hu, lab = _hu_and_label(row)
            for organ, ids in organ_groups(lab).items():
                v = hu[np.isin(lab, ids)]
                if v.size > 20000:
                    v = rng.choice(v, 20000, replace=False)
                values.setdefault(organ, {"generated": [], "real": []})[kind].append(v)
    both = [o for o, d in values.items() if d["generated"] and d["real"]]
    organs = sorted(both, key=lambda o: (o not in ranges, -sum(map(len, values[o]["real"]))))[:max_organs]
    n = max(len(organs), 1)
    cols = min(4, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.6 * cols, 2.8 * -(-n // cols)), squeeze=False)
    bins = np.linspace(-1024, 2000, 121)
    for ax, organ in zip(axes.ravel(), organs, strict=False):
        for kind, colour in (("real", "tab:gray"), ("generated", "tab:orange")):
            v = np.concatenate(values[organ][kind])
            ax.hist(v, bins=bins, density=True, histtype="stepfilled" if kind == "real" else "step", alpha=0.6 if kind == "real" else 1,
                    color=colour, label=f"{kind} ({len(values[organ][kind])})", linewidth=1.2)  # fmt: skip
        if organ in ranges:
            ax.axvspan(ranges[organ].low, ranges[organ].high, color="tab:green", alpha=0.12, label="allowed median")
        ax.set_title(organ, fontsize=9)
        ax.set_xlabel("HU", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(organs):]:
        ax.set_axis_off()
    if not organs:
        axes[0, 0].text(0.5, 0.5, "no organ present in both generated and real label maps", ha="center", va="center")
    fig.suptitle("HU inside each organ: generated vs real (density; cases in brackets)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, dest)


def plot_generated_vs_real(generated: pd.DataFrame, real: pd.DataFrame, dest, n: int = 4) -> None:
    """Axial, coronal and sagittal mid-slices of ``n`` generated cases beside ``n`` real ones, labels overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maisi.core.figures import mid_slices, save_figure

    gen = (generated[generated.status == "ok"] if "status" in generated else generated).head(n)
    ref = real[real.label != ""].head(n) if "label" in real else real.head(n)
    columns = [("generated", r) for r in gen.itertuples()] + [("real", r) for r in ref.itertuples()]
    k = max(len(columns), 1)
    fig, axes = plt.subplots(3, k, figsize=(2.4 * k, 7.6), squeeze=False)
    for j, (kind, row) in enumerate(columns):
        hu, lab = _hu_and_label(row)
        mid_slices(axes[:, j], hu, lab, json.loads(row.spacing))
        axes[0, j].set_title(f"{kind}\n{row.case_id}", fontsize=7, color="tab:orange" if kind == "generated" else "black")
    for ax in axes.ravel():
        if not ax.images:
            ax.set_axis_off()
    fig.suptitle(f"Generated ({len(gen)}) beside real ({len(ref)}) cases; axial (top), coronal, sagittal (bottom)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, dest)


def reference_record(reference: Mapping[str, Any]) -> dict[str, Any]:
    """The reference with the provenance of the step that made it."""
    return {**reference, "provenance": provenance("qc_reference")}


def released_cases(qc_cases: str | os.PathLike) -> pd.DataFrame:
    """Generated cases that QC lets into the release (``include``, or ``flagged`` under ``qc.on_fail: flag``),
    each with the files of its final attempt and ``qc_status`` ``pass`` or ``flagged`` as
    :func:`maisi.release.build_release` takes them."""
    qc = read_table(qc_cases)
    cases = qc[qc.release.isin(["include", "flagged"])].copy()
    cases["qc_status"] = np.where(cases.release == "include", "pass", "flagged")
    return cases[["case_id", "request", "image", "label", "qc_status", "qc_reasons"]].reset_index(drop=True)
