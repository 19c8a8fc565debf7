"""QC of one generated shard: every case checked, a failing one generated again.

Each case of the shard's generation table is checked (:func:`maisi.evaluate.qc.check_files`) against the
organ ranges. One that fails is generated again from a new derived seed
(:meth:`GenCase.attempt_seed`; a masked case thereby also draws a new mask) until it passes or
``qc.max_attempts`` are used. Attempt ``k`` is written under ``<root>/attempt-<k>/`` and never over
the generation's own outputs, so a rerun with other QC settings finds every earlier attempt where it
left it (matched by its sidecar) and generates nothing it already has. The models are loaded only
when a case has to be generated again.

A case whose label map holds no checkable organ (an image-only request) is, where TotalSegmentator's
weights are configured, segmented with it and the organs it finds checked as a paired case's are
(:func:`check_with_totalsegmentator`); its masks go under ``<segmented>/attempt-<k>/<request>/``.

Because checking and regenerating live here and not in generation, changing a QC setting reruns
this stage and what reads its verdicts, never the generation shards.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from maisi.core.shards import raise_first, run_in_turn
from maisi.core.tables import read_table, write_table
from maisi.evaluate.qc import OrganRange, QCResult, QCSettings, check_files, load_reference
from maisi.generate.requests import GenCase, GenerationRequest
from maisi.generate.sampling import load_request
from maisi.generate.settings import GenerateSettings
from maisi.generate.shard import (
    CASE_ERRORS,
    GENERATED_COLUMNS,
    fail_case,
    generate_case,
)
from maisi.prepare.totalsegmentator import SegmentationError, TotalSegSettings, segment_case

__all__ = ["QC_SHARD_COLUMNS", "attempt_root", "check_shard", "check_with_totalsegmentator", "verdict_columns"]

log = logging.getLogger(__name__)


STEP = "qc_check"


#: The generation table's columns (of the case's final attempt) and the QC verdict.
QC_SHARD_COLUMNS = (*GENERATED_COLUMNS, "qc_status", "qc_reasons", "checks", "medians", "unchecked")


def attempt_root(root: str | os.PathLike, attempt: int) -> Path:
    """Where attempt ``attempt`` (>= 1) of every case goes (``<root>/attempt-<k>/<request>/imagesTr/...``)."""
    return Path(root) / f"attempt-{attempt}"


def verdict_columns(verdict: QCResult) -> dict[str, str]:
    """A verdict as table columns (medians rounded to 0.1 HU)."""
    return {
        "qc_status": "pass" if verdict.passed else "fail", "qc_reasons": "; ".join(verdict.reasons), "checks": ",".join(verdict.checks),
        "medians": json.dumps({k: round(v, 1) for k, v in verdict.medians.items()}, sort_keys=True),
        "unchecked": json.dumps(verdict.unchecked),
    }  # fmt: skip


def check_with_totalsegmentator(
    verdict: QCResult,
    case_id: str,
    image: str | os.PathLike,
    dest: str | os.PathLike,
    segmenter: TotalSegSettings,
    ranges: Mapping[str, OrganRange],
    qc: QCSettings,
    groups: Mapping[str, Sequence[int]] | None = None,
) -> QCResult:
    """``verdict`` (of a case without a checkable organ) with the organs TotalSegmentator finds in ``image``
    checked as a paired case's are: their medians, their reasons (prefixed ``TotalSegmentator``), and the
    check ``TotalSegmentator organs``. A segmentation that fails fails the case with its reason."""
    checks = [*verdict.checks, "TotalSegmentator organs"]
    try:
        mask = segment_case(case_id, image, dest, segmenter)["label"]
    except SegmentationError as exc:
        reasons = [*verdict.reasons, f"TotalSegmentator: {exc}"]
        return QCResult(False, reasons, verdict.medians, verdict.unchecked, checks)
    organs = check_files(image, mask, ranges, qc, groups)
    reasons = [*verdict.reasons, *(f"TotalSegmentator {r}" for r in organs.reasons if r not in verdict.reasons)]
    return QCResult(not reasons, reasons, organs.medians, organs.unchecked, checks)


def check_shard(
    request: GenerationRequest,
    cases: Sequence[GenCase],
    generated_table: str | os.PathLike,
    checkpoints: Mapping[str, str | None],
    mask_db: str | os.PathLike | None,
    settings: GenerateSettings,
    qc: QCSettings,
    qc_reference: str | os.PathLike,
    root: str | os.PathLike,
    table: str | os.PathLike,
    progress: bool = True,
    segmenter: TotalSegSettings | None = None,
    segmented: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Check a generation shard's cases and generate failing ones again; write the verdict table.

    A row holds the case's last attempt (its files, seed and attempt number) and that attempt's
    verdict. A case generation could not make stays ``failed`` with its reason. A bad-input error
    while generating again fails that case only; with ``on_error: stop`` the first such error is
    raised after the table is written. With ``segmenter``, image-only cases are also checked on
    TotalSegmentator's masks, written under ``segmented``.
    """
    loaded = functools.cache(lambda: load_request(request, checkpoints, mask_db, settings))  # only when a case fails

    reference = load_reference(qc_reference)
    ranges, groups, intensity = reference.ranges, reference.groups, reference.intensity
    by_id = {c.case_id: c for c in cases}
    generated = read_table(generated_table)
    missing = sorted(set(generated.case_id) - set(by_id))
    if missing:
        raise ValueError(f"{generated_table}: case(s) {', '.join(missing)} are not in this shard of request {request.name}")
    reached: dict[str, int] = {}  # the attempt each case got to (where a failed attempt's files lie)

    def verdict_of(row: Mapping[str, Any], attempt: int) -> QCResult:
        verdict = check_files(row["image"], row["label"], ranges, qc, groups, intensity)
        unreadable = not verdict.checks  # check_files could not read the case
        if segmenter is None or unreadable or "inside body" in verdict.checks:  # none, or its label map has organs
            return verdict
        dest = attempt_root(segmented, attempt) / request.name / f"{row['case_id']}.nii.gz"
        return check_with_totalsegmentator(verdict, row["case_id"], row["image"], dest, segmenter, ranges, qc, groups)

    def check(first: dict[str, Any]) -> dict[str, Any]:
        if first["status"] != "ok":
            return {**first, **verdict_columns(QCResult(False, [first["reason"]]))}
        case, row, attempt = by_id[first["case_id"]], first, 0
        verdict = verdict_of(row, attempt)
        while not verdict.passed and attempt + 1 < qc.max_attempts:
            log.warning("%s attempt %d failed QC (%s); generating again", case.case_id, attempt, "; ".join(verdict.reasons))
            attempt = reached[case.case_id] = attempt + 1
            models, masks, masks_sha = loaded()
            row = generate_case(models, request, case, masks, settings, attempt_root(root, attempt), attempt, progress, masks_sha)
            verdict = verdict_of(row, attempt)
        return {**row, **verdict_columns(verdict)}

    def failed(first: dict[str, Any], exc: Exception) -> dict[str, Any]:
        case_id = first["case_id"]
        if case_id not in reached:  # checking generation's own attempt failed: not a case error
            raise exc
        out_root = attempt_root(root, reached[case_id])
        return {**fail_case(request, by_id[case_id], exc, out_root), **verdict_columns(QCResult(False, [str(exc)]))}

    rows, errors = run_in_turn(check, generated.to_dict("records"), case_id=lambda r: r["case_id"], errors=CASE_ERRORS,
                               failed=failed, desc=f"qc {request.name}", progress=progress)  # fmt: skip
    write_table(rows, table, STEP, QC_SHARD_COLUMNS)
    raise_first(errors, settings.on_error, f"request {request.name}")
    return rows
