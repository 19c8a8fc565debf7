"""The prepared dataset: MAISI's datalist JSON, the case table and the rejected-cases table."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from maisi.core.checks import InputError
from maisi.core.holdout import HELD_OUT, split_column
from maisi.core.io import write_json
from maisi.core.provenance import provenance
from maisi.core.shards import shard_of
from maisi.core.tables import read_table, write_table

__all__ = ["assemble", "check_not_all_rejected", "write_dataset", "CASE_COLUMNS", "REJECTED_COLUMNS"]

log = logging.getLogger(__name__)

CASE_COLUMNS = (
    "source", "case_id", "fold", "split", "image", "image_hu", "label", "meta", "dim", "spacing", "orig_dim", "orig_spacing",
    "top_region", "bottom_region", "region_backend", "label_source", "labels_present",
)  # fmt: skip


REJECTED_COLUMNS = ("source", "case_id", "stage", "reason")


def _concat(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    frames = [read_table(p) for p in paths]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def assemble(
    prepared_tables: Sequence, region_tables: Sequence, folds: int, held_out: float = 0.0, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join the shard tables of the preprocess and regions stages into (cases, rejected); ``held_out`` of each
    source's cases (a fraction, :mod:`maisi.core.holdout`) form the held-out split."""
    prep = _concat(prepared_tables)
    regs = _concat(region_tables)
    rejected = []
    if not prep.empty:
        bad = prep[prep.status != "ok"]
        rejected += [{"source": r.source, "case_id": r.case_id, "stage": "preprocess", "reason": r.reason} for r in bad.itertuples()]
        prep = prep[prep.status == "ok"]
    if not regs.empty:
        bad = regs[regs.status != "ok"]
        rejected += [{"source": r.source, "case_id": r.case_id, "stage": "regions", "reason": r.reason} for r in bad.itertuples()]
        regs = regs[regs.status == "ok"]
    if prep.empty or regs.empty:
        return pd.DataFrame(columns=list(CASE_COLUMNS)), pd.DataFrame(rejected, columns=list(REJECTED_COLUMNS))
    regs = regs.rename(columns={"label": "region_label", "labels_present": "region_labels_present"})
    keep = ["source", "case_id", "top_region", "bottom_region", "region_backend", "region_label", "label_source", "region_labels_present"]
    cases = prep.merge(regs[keep], on=["source", "case_id"], how="inner")
    # A label made by the regions stage (TotalSegmentator) replaces the prepared one.
    made = cases.region_label != ""
    cases.loc[made, "label"] = cases.loc[made, "region_label"]
    cases.loc[made, "labels_present"] = cases.loc[made, "region_labels_present"]
    cases["fold"] = [shard_of(f"{s}/{c}", folds) for s, c in zip(cases.source, cases.case_id, strict=True)]
    cases = cases.sort_values(["source", "case_id"]).reset_index(drop=True)
    cases["split"] = split_column(cases, held_out, seed)
    return cases.reindex(columns=list(CASE_COLUMNS)), pd.DataFrame(rejected, columns=list(REJECTED_COLUMNS))


def datalist(cases: pd.DataFrame, root: str | os.PathLike) -> dict:
    """MAISI's datalist, paths relative to ``root`` (the folder holding the datalist): the training split under
    ``training``, the held-out split under ``testing`` (the Decathlon's and MONAI's ``load_decathlon_datalist``
    keys), each entry with its fold."""
    from maisi.core.anatomy import one_hot

    def rel(p: str) -> str:
        return os.path.relpath(p, root) if p else ""

    entries: dict[str, list] = {"training": [], "testing": []}
    for r in cases.itertuples():
        entry = {
            "image": rel(r.image),
            "dim": json.loads(r.dim),
            "spacing": json.loads(r.spacing),
            "top_region_index": one_hot(r.top_region),
            "bottom_region_index": one_hot(r.bottom_region),
            "fold": int(r.fold),
            "source": r.source,
            "case_id": r.case_id,
        }
        if r.label:
            entry["label"] = rel(r.label)
        if r.image_hu:
            entry["image_hu"] = rel(r.image_hu)
        entries["testing" if getattr(r, "split", "") == HELD_OUT else "training"].append(entry)
    return entries


def check_not_all_rejected(cases: pd.DataFrame, rejected: pd.DataFrame) -> None:
    """Every case rejected (``on_error: skip``) stops the run here, not at training: the commonest reasons, each case logged."""
    if not cases.empty or rejected.empty:
        return
    for r in rejected.itertuples():
        log.error("rejected %s/%s at %s: %s", r.source, r.case_id, r.stage, r.reason)
    reasons = rejected.reason.str.replace(r"\S*/\S*: ", "", regex=True).value_counts()  # the reasons without the files
    common = "; ".join(f"{n} x {reason}" for reason, n in reasons.head(3).items())
    raise InputError(
        None,
        f"every case was rejected ({len(rejected)} of {len(rejected)}), so there is no dataset to train on. "
        f"Commonest reasons: {common}. Each case and its reason is in this job's log (on_error: skip left them out).",
    )


def write_dataset(
    prepared_tables, region_tables, folds: int, datalist_path, cases_path, rejected_path, run_name: str,
    held_out: float = 0.0, seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    cases, rejected = assemble(prepared_tables, region_tables, folds, held_out, seed)
    check_not_all_rejected(cases, rejected)
    write_table(cases.to_dict("records"), cases_path, "dataset", CASE_COLUMNS)
    write_table(rejected.to_dict("records"), rejected_path, "dataset", REJECTED_COLUMNS)
    dl = datalist(cases, Path(datalist_path).parent)
    dl["run_name"] = run_name
    dl["provenance"] = provenance("dataset")
    write_json(datalist_path, dl)
    return cases
