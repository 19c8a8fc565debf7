"""Immutable, versioned releases of the synthetic dataset.

A release lives at ``<root>/<name>/<version>/`` and holds the generated images and label maps in
the Medical Segmentation Decathlon layout (``imagesTr``, ``labelsTr``, ``dataset.json``), the QC
and FID tables, ``provenance.json``, a ``DATACARD.md`` and a ``manifest.json`` with the sha256 and
size of every file.

The identity of a release is its *content digest*: a sha256 over the sorted ``(path, sha256)`` of
the identity files (images, labels, ``dataset.json``, ``qc.tsv``, ``fid.tsv`` and the data card
without its build trailer) and the canonical JSON of ``provenance.json``'s ``content`` (config,
checkpoint hashes, per-case seeds, conditions and QC). What built the release (git commit, package
versions, host, time) is recorded under ``build`` and in the data card's trailer, but is not part
of the identity, so rebuilding the same content elsewhere gives the same digest.

A release is assembled in a hidden ``.building-<version>-<random>/`` folder and renamed into place
only once complete; a version that exists already is never changed: the same content is a no-op,
different content raises :class:`ReleaseConflict`.

Command line::

    python -m maisi.release list [--root results/releases]
    python -m maisi.release diff <release_dir_a> <release_dir_b>    # exit 1 when different
    python -m maisi.release verify <release_dir>                    # exit 1 on mismatches
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from maisi.io import _json_default, _umask, read_json, sha256_file, sidecar_path, write_json, write_text
from maisi.labels import label_name
from maisi.provenance import package_versions

__all__ = [
    "ReleaseResult",
    "ReleaseConflict",
    "build_release",
    "list_releases",
    "diff_releases",
    "format_diff",
    "verify_release",
    "content_digest",
    "render_datacard",
    "DATACARD_TRAILER",
    "main",
]

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
#: Line that separates the data card's deterministic body from its build trailer.
DATACARD_TRAILER = "<!-- release build: not part of the content digest -->"
#: The feature extractor of the MAISI paper's FID (2.5-D: axial, coronal and sagittal slices).
PAPER_FID_EXTRACTOR = "RadImageNet ResNet-50 (maisi.fid extractor radimagenet_resnet50)"
MAISI_CITATION = (
    "P. Guo, C. Zhao, D. Yang, Z. Xu, V. Nath, Y. Tang, B. Simon, M. Belue, S. Harmon, B. Turkbey, D. Xu. "
    "MAISI: Medical AI for Synthetic Imaging. WACV 2025. arXiv:2409.11169"
)
CASE_COLUMNS = ("case_id", "request", "image", "label", "qc_status", "qc_reasons")
QC_STATUSES = ("pass", "flagged")
_IDENTITY_TABLES = ("dataset.json", "qc.tsv", "fid.tsv", "DATACARD.md")


class ReleaseConflict(ValueError):
    """The release version exists with different content."""


@dataclass(frozen=True)
class ReleaseResult:
    """Where a release is, its content digest, whether this call created it, and its case count."""

    path: Path
    content_digest: str
    created: bool
    n_cases: int


# --------------------------------------------------------------------------- small helpers


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (numpy scalars, paths and tuples converted)."""
    return json.loads(_canonical(obj))


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_digest(identity: Mapping[str, str], content: Mapping[str, Any]) -> str:
    """sha256 over the sorted ``(relative path, sha256)`` of the identity files and the canonical
    JSON of the provenance ``content``."""
    h = hashlib.sha256()
    for rel, digest in sorted(identity.items()):
        h.update(f"{rel}\t{digest}\n".encode())
    h.update(b"provenance.content\t" + _canonical(content).encode("utf-8"))
    return h.hexdigest()


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"invalid release {kind} {value!r}: use letters, digits, '.', '_' and '-', not starting with '.'")
    return value


def _utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _git_info(repo_dir: str | os.PathLike) -> dict[str, Any]:
    """Commit of the workflow checkout and whether its tracked files differ from it; ``"unknown"``
    when ``repo_dir`` is not a git checkout or git is missing."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo_dir), *args], capture_output=True, encoding="utf-8", timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": "unknown"}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": "unknown" if status is None else bool(status.strip())}


def _build_info(repo_dir: str | os.PathLike) -> dict[str, Any]:
    return {
        "git": _git_info(repo_dir),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": _utc_now(),
    }


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


_ABSENT = object()


def _content_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two provenance contents (``_ABSENT`` where missing)."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True, default=_json_default)


def _file_changes(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k]),
    }


def _capped(lines: Sequence[str], limit: int = 25) -> list[str]:
    return list(lines[:limit]) + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _place(src: Path, dest: Path) -> None:
    """Hard-link ``src`` to ``dest`` (same filesystem), else copy it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _make_read_only(folder: Path) -> None:
    """``chmod a-w`` every file under ``folder``."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            mode = path.stat().st_mode
            os.chmod(path, mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@contextlib.contextmanager
def _version_lock(parent: Path, version: str) -> Iterator[None]:
    """Serialise builds of one release version (so removing stale temp folders is safe)."""
    with open(parent / f".lock-{version}", "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale(parent: Path, version: str) -> None:
    for stale in parent.glob(f".building-{version}-*"):
        _remove_tree(stale)


def _remove_tree(path: Path) -> None:
    def writable(func, p, _exc):  # a crashed build may have left read-only files
        os.chmod(p, stat.S_IRWXU)
        func(p)

    if not path.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable)
    else:
        shutil.rmtree(path, onerror=writable)


# --------------------------------------------------------------------------- inputs


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "pass", "passed", "ok")


def _check_cases(cases: pd.DataFrame) -> pd.DataFrame:
    if cases is None or len(cases) == 0:
        raise ValueError("the release has no cases: the case table is empty (did every case fail QC?)")
    missing = [c for c in CASE_COLUMNS if c not in cases.columns]
    if missing:
        raise ValueError(f"the case table lacks column(s) {', '.join(missing)} (needs {', '.join(CASE_COLUMNS)})")
    cases = cases.copy()
    cases["case_id"] = cases["case_id"].astype(str)
    cases["qc_reasons"] = cases["qc_reasons"].fillna("").astype(str)
    dup = sorted(cases.case_id[cases.case_id.duplicated()].astype(str).unique())
    if dup:
        raise ValueError(f"case id(s) appear more than once: {', '.join(dup)}")
    for r in cases.itertuples():
        _check_name("case id", str(r.case_id))
        if r.qc_status not in QC_STATUSES:
            raise ValueError(f"case {r.case_id}: qc_status {r.qc_status!r} is not one of {', '.join(QC_STATUSES)}")
        for kind in ("image", "label"):
            path = Path(str(getattr(r, kind)))
            if not path.is_file():
                raise FileNotFoundError(f"case {r.case_id}: {kind} file {path} does not exist")
            if not path.name.endswith(".nii.gz"):
                raise ValueError(f"case {r.case_id}: {kind} file {path} is not a .nii.gz file")
    return cases.sort_values("case_id").reset_index(drop=True)


def _case_record(row: Any, image_sha: str, checkpoint_hashes: Mapping[str, str]) -> dict[str, Any]:
    """What the release records about a case, read from its image sidecar."""
    side = sidecar_path(row.image)
    if not side.is_file():
        raise FileNotFoundError(f"case {row.case_id}: image sidecar {side} does not exist (it holds the case's seed and conditions)")
    record = read_json(side)
    for key in ("seed", "attempt"):
        if key not in record:
            raise ValueError(f"case {row.case_id}: image sidecar {side} has no {key!r}")
    if record.get("sha256") not in (None, image_sha):
        raise ValueError(f"case {row.case_id}: image {row.image} does not match its sidecar {side} (sha256 differs): regenerate the case")
    for model, sha in (record.get("checkpoints") or {}).items():
        if model in checkpoint_hashes and checkpoint_hashes[model] != sha:
            raise ValueError(f"case {row.case_id}: generated with a {model} checkpoint of sha256 {sha[:12]}..., "
                             f"not the released {checkpoint_hashes[model][:12]}...")  # fmt: skip
    mask = record.get("mask")
    mask = {k: v for k, v in mask.items() if k != "path"} if isinstance(mask, Mapping) else None  # paths differ between hosts
    return _jsonable({
        "request": record.get("request", row.request), "seed": record["seed"], "attempt": record["attempt"],
        "conditions": record.get("conditions", {}), "mask_source": (mask or {}).get("case_id"), "mask": mask,
        "label_source": record.get("label_source"), "qc_status": row.qc_status, "qc_reasons": row.qc_reasons,
    })  # fmt: skip


def _read_tsv(path: str | os.PathLike, kind: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} table {path} does not exist")
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def _licence(config: Mapping[str, Any], sources: Sequence[Mapping[str, str]]) -> str:
    given = (config.get("release") or {}).get("licence") if isinstance(config.get("release"), Mapping) else None
    if given:
        return str(given)
    licences = sorted({str(s.get("licence", "")).strip() for s in sources} - {""})
    if len(licences) == 1:
        return licences[0]
    return "; ".join(licences) + " (per source, see DATACARD.md)" if licences else "see the sources in DATACARD.md"


# --------------------------------------------------------------------------- documents


def _dataset_json(name: str, version: str, description: str, licence: str, labels: Sequence[int], case_ids: Sequence[str]) -> dict[str, Any]:
    label_map = {"0": "background"}
    label_map.update({str(int(i)): label_name(int(i)) for i in labels if int(i) != 0})
    return {
        "name": name, "description": description, "reference": f"Synthetic CT generated with MAISI ({MAISI_CITATION})",
        "licence": licence, "release": version, "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": label_map,
        "numTraining": len(case_ids), "numTest": 0,
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in case_ids], "test": [],
    }  # fmt: skip


def _qc_summary(qc: pd.DataFrame, organs: pd.DataFrame, cases: pd.DataFrame) -> dict[str, Any]:
    """Pass rate, per-organ pass rates, excluded and flagged cases, from the QC stage's tables
    (:mod:`maisi.qc_report`: one row per generated case with ``qc_status`` and ``qc_reasons``; one
    row per organ with ``n_pass`` and ``n_cases``)."""
    released = set(cases.case_id)
    flagged = [(r.case_id, r.qc_reasons) for r in cases.itertuples() if r.qc_status == "flagged"]
    status = {r["case_id"]: (r["qc_status"] == "pass", str(r.get("qc_reasons", ""))) for r in qc.to_dict("records")} if len(qc) else {}
    if not status:  # no QC table rows: the released cases' own statuses
        status = {r.case_id: (r.qc_status == "pass", r.qc_reasons) for r in cases.itertuples()}
    per_organ = {}
    for r in organs.to_dict("records") if len(organs) else []:
        if str(r.get("n_cases", "")).strip() not in ("", "0"):
            per_organ[str(r["organ"])] = (int(r["n_pass"]), int(r["n_cases"]))
    excluded = [(c, why) for c, (_, why) in sorted(status.items()) if c not in released]
    n_pass = sum(ok for ok, _ in status.values())
    return {
        "n_checked": len(status), "n_pass": n_pass, "pass_rate": n_pass / len(status) if status else float("nan"),
        "organs": dict(sorted(per_organ.items())), "excluded": excluded, "flagged": flagged,
    }  # fmt: skip


def _fid_summary(fid: pd.DataFrame) -> dict[str, Any]:
    """Per-plane FID, average, real-vs-real floor and feature extractor from :func:`maisi.fid.write_fid`'s
    table (``plane``, ``fid``, ``real_floor``, ``extractor``; rows axial, coronal, sagittal, average).
    Also read: ``real_vs_real`` / ``feature_extractor`` for the floor / extractor, and optional
    ``comparable`` and ``warning`` columns."""
    if not len(fid) or not {"plane", "fid"} <= set(fid.columns):
        return {"planes": [], "average": None, "extractor": None, "warning": None}

    def num(v: Any) -> float | None:
        try:
            return float(v)
        except (TypeError, ValueError):
            return None

    floor_col = next((c for c in ("real_floor", "real_vs_real") if c in fid.columns), None)
    extractor_col = next((c for c in ("extractor", "feature_extractor") if c in fid.columns), None)
    planes = [(str(r["plane"]), num(r["fid"]), num(r.get(floor_col))) for r in fid.to_dict("records")]
    avg_rows = [p for p in planes if p[0].lower() in ("average", "mean")]
    per_plane = [p for p in planes if p not in avg_rows]
    if avg_rows:
        average = avg_rows[0]
    else:
        vals = [p[1] for p in per_plane if p[1] is not None]
        floors = [p[2] for p in per_plane if p[2] is not None]
        average = ("average", sum(vals) / len(vals) if vals else None, sum(floors) / len(floors) if len(floors) == len(per_plane) and floors else None)
    extractors = sorted({str(v) for v in (fid[extractor_col] if extractor_col else []) if str(v)})
    extractor = ", ".join(extractors) or "unknown"
    if "comparable" in fid.columns:
        comparable = all(_truthy(v) for v in fid["comparable"] if str(v).strip() != "")
    else:
        comparable = bool(extractors) and all("radimagenet" in e.lower() for e in extractors)
    warning = None
    if not comparable:
        notes = sorted({str(v) for v in fid.get("warning", pd.Series(dtype=str)) if str(v)})
        warning = (f"These FIDs use {extractor}, not the paper's feature extractor ({PAPER_FID_EXTRACTOR}): "
                   "they are NOT comparable with the FIDs reported in the MAISI paper.") + ("".join(f" {n}" for n in notes))  # fmt: skip
    return {"planes": per_plane, "average": average, "extractor": extractor, "warning": warning}


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_datacard(
    name: str,
    version: str,
    description: str,
    content: Mapping[str, Any],
    qc: pd.DataFrame,
    fid: pd.DataFrame,
    cases: pd.DataFrame,
    licence: str,
    qc_organs: pd.DataFrame | None = None,
) -> str:
    """The data card's deterministic body (no build information, no digest)."""
    records = content["cases"]
    out = [
        f"# {name} {version}: synthetic CT dataset", "",
        "> **NOT FOR CLINICAL USE.** Every image in this release is synthetic, generated by a model. It must not be used "
        "for clinical decisions, diagnosis, treatment planning or as evidence about any patient.", "",
    ]  # fmt: skip
    if description:
        out += [description, ""]
    out += [
        "## Intended use", "",
        "Research and machine-learning development on synthetic CT: pre-training and augmenting segmentation models, "
        "benchmarking, and studying generative models of CT. **Not for clinical use or diagnosis.** Synthetic images may contain "
        "anatomically implausible structures; validate any model trained on them on real data before drawing conclusions.", "",
        "## Contents", "",
        f"{len(records)} cases (3-D CT volumes in HU, int16, with uint8 label maps), in the Medical Segmentation Decathlon layout "
        "(`imagesTr/`, `labelsTr/`, `dataset.json`).", "",
        "| request | cases | size (voxels) | spacing (mm) | regions (top -> bottom) | anatomy | masks |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    by_request: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records.values():
        by_request.setdefault(str(rec["request"]), []).append(rec)

    def values(recs: Sequence[Mapping[str, Any]], key: str) -> str:
        vals = [r.get("conditions", {}).get(key) for r in recs]
        seen = sorted({v if isinstance(v, str) else json.dumps(v) for v in vals if v is not None})
        return ", ".join(seen) or "n/a"

    sampler_lines = []
    for req, recs in sorted(by_request.items()):
        regions = sorted({f"{r['conditions'].get('top_region')} -> {r['conditions'].get('bottom_region')}" for r in recs
                          if r.get("conditions", {}).get("top_region")})  # fmt: skip
        anatomy = sorted({label_name(int(a)) if str(a).isdigit() else str(a) for r in recs for a in (r.get("conditions", {}).get("anatomy") or [])})
        masks = "yes" if any(r.get("mask_source") for r in recs) else "no"
        out.append(f"| {req} | {len(recs)} | {values(recs, 'size')} | {values(recs, 'spacing')} | {', '.join(regions) or 'n/a'} "
                   f"| {', '.join(anatomy) or 'any'} | {masks} |")  # fmt: skip
        sampler_lines.append(f"- {req}: sampler {values(recs, 'sampler')}, {values(recs, 'steps')} steps")
    labels = [int(i) for i in content.get("labels", []) if int(i) != 0]
    out += ["", f"Label classes ({len(labels)}, plus 0 background): " + (", ".join(f"{i} {label_name(i)}" for i in labels) or "none"), ""]

    generate = (content.get("config") or {}).get("generate") or {}
    decoder = generate.get("decoder") if isinstance(generate, Mapping) else None
    out += ["## Generation settings", "", "| model | sha256 |", "|---|---|"]
    out += [f"| {m} | `{sha}` |" for m, sha in sorted(content.get("checkpoints", {}).items())]
    out += ["", *sampler_lines, f"- decoder: {json.dumps(decoder, sort_keys=True) if decoder else 'n/a'}",
            "- every case's seed, attempt, conditions and mask source are in `provenance.json` (`content.cases`)", ""]  # fmt: skip

    q = _qc_summary(qc, qc_organs if qc_organs is not None else pd.DataFrame(), cases)
    out += ["## Quality control", "",
            f"QC pass rate: {_fmt(100 * q['pass_rate'], 1)}% ({q['n_pass']} of {q['n_checked']} checked cases); "
            f"{len(q['excluded'])} excluded, {len(q['flagged'])} released but flagged.", ""]  # fmt: skip
    if q["organs"]:
        out += ["| organ | pass rate | passed |", "|---|---|---|"]
        out += [f"| {o} | {_fmt(100 * p / n, 1)}% | {p}/{n} |" for o, (p, n) in q["organs"].items()]
        out.append("")
    for title, items in (("Excluded cases (failed QC, not released)", q["excluded"]), ("Flagged cases (failed QC, released)", q["flagged"])):
        if items:
            out += [f"{title}:", ""] + [f"- {c}: {_md_cell(why) or 'no reason recorded'}" for c, why in items] + [""]
    out += ["The full QC table is `qc.tsv`.", ""]

    f = _fid_summary(fid)
    out += ["## FID", ""]
    if not f["planes"] and f["average"] is None:
        out += ["FID was not computed for this release (`fid.tsv` has no rows).", ""]
    else:
        out += [f"Feature extractor: {f['extractor']}.", ""]
        if f["warning"]:
            out += [f"> **Warning:** {f['warning']}", ""]
        else:
            out += ["This is the paper's feature extractor: the values are comparable with published MAISI FIDs only when "
                    "the preprocessing (spacing, size, central slices) matches the paper's.", ""]  # fmt: skip
        out += ["| plane | FID (synthetic vs real) | real-vs-real floor |", "|---|---|---|"]
        out += [f"| {p} | {_fmt(v)} | {_fmt(floor)} |" for p, v, floor in [*f["planes"], f["average"]]]
        out += ["", "The real-vs-real floor is the FID between two halves of the real data: values near it are as good as the data allows.",
                "The full table is `fid.tsv`.", ""]  # fmt: skip

    out += ["## Sources and licences", "", f"Release licence: {licence}.", "", "| source | licence | citation |", "|---|---|---|"]
    out += [f"| {_md_cell(s.get('source', ''))} | {_md_cell(s.get('licence', ''))} | {_md_cell(s.get('citation', ''))} |"
            for s in content.get("sources", [])]  # fmt: skip
    out += ["", "## How to cite", "",
            f"Cite the release as \"{name} {version}\" with its content digest (below), the generative model:", "",
            f"- {MAISI_CITATION}", "", "and the sources the models were trained on:", ""]  # fmt: skip
    out += [f"- {_md_cell(s.get('citation') or s.get('source', ''))}" for s in content.get("sources", [])]
    return "\n".join(out) + "\n"


def _datacard_trailer(digest: str, build: Mapping[str, Any]) -> str:
    git = build["git"]
    dirty = {True: " (uncommitted changes)", False: ""}.get(git["dirty"], " (state unknown)")
    return "\n".join([
        "", DATACARD_TRAILER, "", "## Release identity", "",
        f"- content digest: `{digest}` (sha256; `python -m maisi.release verify <release>` checks it)",
        f"- workflow commit: `{git['commit']}`{dirty}",
        f"- built: {build['created_utc']} with Python {build['python']} on {build['platform']}", "",
    ])  # fmt: skip


def _datacard_body(text: str) -> str:
    """The deterministic part of a rendered data card (before the build trailer)."""
    head, sep, _ = text.partition("\n" + DATACARD_TRAILER)
    return head if sep else text


# --------------------------------------------------------------------------- building


def build_release(
    root: str | os.PathLike,
    name: str,
    version: str,
    cases: pd.DataFrame,
    *,
    config: Mapping[str, Any],
    checkpoints: Mapping[str, str | os.PathLike],
    labels: Sequence[int],
    sources: Sequence[Mapping[str, str]],
    qc_table: str | os.PathLike,
    fid_table: str | os.PathLike,
    repo_dir: str | os.PathLike,
    description: str = "",
    qc_organs_table: str | os.PathLike | None = None,
) -> ReleaseResult:
    """Build ``<root>/<name>/<version>/`` from the generated ``cases`` (or find it already built).

    ``cases`` has columns ``case_id``, ``request``, ``image``, ``label``, ``qc_status`` (``pass`` or
    ``flagged``) and ``qc_reasons``; ``checkpoints`` maps model name -> checkpoint file; ``labels``
    are the label ids in the released maps; ``sources`` are ``{source, licence, citation}`` records.
    An existing version with the same content digest is left untouched (``created=False``); with a
    different digest :class:`ReleaseConflict` says what differs.
    """
    _check_name("name", name)
    _check_name("version", version)
    cases = _check_cases(cases)
    for model, path in checkpoints.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{model} checkpoint {path} does not exist")
    qc, fid = _read_tsv(qc_table, "QC"), _read_tsv(fid_table, "FID")
    organs = _read_tsv(qc_organs_table, "QC organ") if qc_organs_table else pd.DataFrame()
    labels = sorted({int(i) for i in labels})

    hashes = {m: sha256_file(p) for m, p in sorted(checkpoints.items())}
    identity: dict[str, str] = {}
    records: dict[str, Any] = {}
    for r in cases.itertuples():
        image_sha, label_sha = sha256_file(r.image), sha256_file(r.label)
        identity[f"imagesTr/{r.case_id}.nii.gz"] = image_sha
        identity[f"labelsTr/{r.case_id}.nii.gz"] = label_sha
        records[str(r.case_id)] = _case_record(r, image_sha, hashes)
    content = _jsonable({
        "name": name, "version": version, "config": dict(config), "checkpoints": hashes, "labels": labels,
        "sources": [dict(s) for s in sources], "cases": records,
    })  # fmt: skip
    licence = _licence(config, sources)
    description = description or f"Synthetic CT volumes with label maps generated with MAISI ({len(cases)} cases)."
    dataset = _dataset_json(name, version, description, licence, labels, list(cases.case_id))
    dataset_text = json.dumps(dataset, indent=2, sort_keys=True) + "\n"
    card_body = render_datacard(name, version, description, content, qc, fid, cases, licence, organs)
    identity.update({
        "dataset.json": _sha256_text(dataset_text), "qc.tsv": sha256_file(qc_table), "fid.tsv": sha256_file(fid_table),
        "DATACARD.md": _sha256_text(card_body),
    })  # fmt: skip
    if qc_organs_table:
        identity["qc_organs.tsv"] = sha256_file(qc_organs_table)
    digest = content_digest(identity, content)

    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / version
    with _version_lock(parent, version):
        _remove_stale(parent, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a release is as readable as the other outputs
        try:
            if final.exists():
                _check_existing(final, digest, identity, content)
                return ReleaseResult(final, digest, False, len(cases))
            for r in cases.itertuples():
                _place(Path(r.image), tmp / "imagesTr" / f"{r.case_id}.nii.gz")
                _place(Path(r.label), tmp / "labelsTr" / f"{r.case_id}.nii.gz")
            write_text(tmp / "dataset.json", dataset_text)
            shutil.copyfile(qc_table, tmp / "qc.tsv")
            shutil.copyfile(fid_table, tmp / "fid.tsv")
            if qc_organs_table:
                shutil.copyfile(qc_organs_table, tmp / "qc_organs.tsv")
            build = _build_info(repo_dir)
            write_json(tmp / "provenance.json", {"content": content, "build": build})
            write_text(tmp / "DATACARD.md", card_body + _datacard_trailer(digest, build))
            _write_manifest(tmp, name, version, digest, identity, len(cases), build["created_utc"])
            os.rename(tmp, final)
        finally:
            _remove_tree(tmp)  # gone already after the rename
    _make_read_only(final)
    return ReleaseResult(final, digest, True, len(cases))


def _write_manifest(folder: Path, name: str, version: str, digest: str, identity: Mapping[str, str], n_cases: int, created: str) -> None:
    """``manifest.json``: sha256 and size of every other file, the identity hashes and the content digest."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != "manifest.json":
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    write_json(folder / "manifest.json", {
        "name": name, "version": version, "n_cases": n_cases, "created_utc": created, "content_digest": digest,
        "identity": dict(sorted(identity.items())), "files": files,
    })  # fmt: skip


def _check_existing(final: Path, digest: str, identity: Mapping[str, str], content: Mapping[str, Any]) -> None:
    """Nothing to do when ``final`` holds this content; else :class:`ReleaseConflict` with the differences."""
    manifest_path = final / "manifest.json"
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError) as exc:
        raise ReleaseConflict(f"release {final} exists but its manifest {manifest_path} is unreadable ({exc}); "
                              "bump the version in release.version or remove the folder by hand") from exc  # fmt: skip
    if manifest.get("content_digest") == digest:
        return
    try:
        old_content = read_json(final / "provenance.json").get("content", {})
    except (OSError, ValueError):
        old_content = {}
    lines = [f"release {final} exists with different content (digest {str(manifest.get('content_digest'))[:12]}..., "
             f"this build {digest[:12]}...):"]  # fmt: skip
    lines += _describe(_file_changes(manifest.get("identity", {}), identity), _content_changes(old_content, content))
    lines.append("A release is immutable: bump the version in release.version to publish this content.")
    raise ReleaseConflict("\n".join(lines))


def _describe(files: Mapping[str, Sequence[str]], changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    lines = []
    for kind in ("added", "removed", "changed"):
        if files[kind]:
            lines.append(f"  files {kind} ({len(files[kind])}):")
            lines += _capped([f"    {p}" for p in files[kind]])
    if changes:
        lines.append(f"  provenance content differs ({len(changes)} key(s)):")
        lines += _capped([f"    {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()])
    return lines


# --------------------------------------------------------------------------- reading releases


def _release_dirs(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in sorted(p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (version_dir / "manifest.json").is_file():
                yield version_dir


def _version_key(version: str) -> tuple:
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(version), version)
    except InvalidVersion:
        return (1, version)


def list_releases(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The releases under ``root``: name, version, n_cases, content_digest, created_utc (by name, then version)."""
    out = []
    for folder in _release_dirs(Path(root)):
        m = read_json(folder / "manifest.json")
        out.append({"name": folder.parent.name, "version": folder.name, "n_cases": m.get("n_cases"),
                    "content_digest": m.get("content_digest"), "created_utc": m.get("created_utc"), "path": str(folder)})  # fmt: skip
    return sorted(out, key=lambda r: (r["name"], _version_key(r["version"])))


def _load(release_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = Path(release_dir)
    if not (folder / "manifest.json").is_file():
        raise FileNotFoundError(f"{folder} is not a release (no manifest.json)")
    prov = read_json(folder / "provenance.json") if (folder / "provenance.json").is_file() else {}
    return read_json(folder / "manifest.json"), prov.get("content", {})


def diff_releases(a_dir: str | os.PathLike, b_dir: str | os.PathLike) -> dict[str, Any]:
    """What differs from release ``a_dir`` to ``b_dir``: identity files added/removed/changed, the
    provenance content keys, and the case counts (overall and per request)."""
    (ma, ca), (mb, cb) = _load(a_dir), _load(b_dir)
    changes = _content_changes(ca, cb)

    def per_request(content: Mapping[str, Any]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in (content.get("cases") or {}).values():
            counts[str(rec.get("request"))] = counts.get(str(rec.get("request")), 0) + 1
        return counts

    ra, rb = per_request(ca), per_request(cb)
    cases_a, cases_b = set(ca.get("cases") or {}), set(cb.get("cases") or {})
    return {
        "a": str(a_dir), "b": str(b_dir),
        "identical": ma.get("content_digest") == mb.get("content_digest"),
        "content_digest": {"a": ma.get("content_digest"), "b": mb.get("content_digest")},
        "files": _file_changes(ma.get("identity", {}), mb.get("identity", {})),
        "content": {k: {s: v for s, v in (("a", a), ("b", b)) if v is not _ABSENT} for k, (a, b) in changes.items()},
        "cases": {"a": ma.get("n_cases"), "b": mb.get("n_cases"), "added": sorted(cases_b - cases_a), "removed": sorted(cases_a - cases_b),
                  "requests": {r: [ra.get(r, 0), rb.get(r, 0)] for r in sorted(set(ra) | set(rb))}},
    }  # fmt: skip


def format_diff(diff: Mapping[str, Any]) -> str:
    """``diff_releases``'s result as text."""
    if diff["identical"]:
        return f"{diff['a']} and {diff['b']} are identical (content digest {diff['content_digest']['a']})\n"
    changes = {k: (v.get("a", _ABSENT), v.get("b", _ABSENT)) for k, v in diff["content"].items()}
    c = diff["cases"]
    lines = [f"--- {diff['a']} (digest {str(diff['content_digest']['a'])[:12]}...)",
             f"+++ {diff['b']} (digest {str(diff['content_digest']['b'])[:12]}...)",
             f"  cases: {c['a']} -> {c['b']}"]  # fmt: skip
    lines += [f"    request {r}: {na} -> {nb}" for r, (na, nb) in c["requests"].items() if na != nb]
    lines += _describe(diff["files"], changes)
    return "\n".join(lines) + "\n"


def verify_release(release_dir: str | os.PathLike) -> list[str]:
    """Re-hash every file of a release against its manifest and recompute the content digest;
    returns the problems found (empty when the release is intact)."""
    folder = Path(release_dir)
    manifest, content = _load(folder)
    problems = []
    listed = manifest.get("files", {})
    for rel, entry in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
            continue
        sha, size = sha256_file(path), path.stat().st_size
        if sha != entry.get("sha256") or size != entry.get("size"):
            problems.append(f"changed: {rel} (sha256 {sha[:12]}... size {size}, manifest {str(entry.get('sha256'))[:12]}... "
                            f"size {entry.get('size')})")  # fmt: skip
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != "manifest.json" and rel not in listed:
            problems.append(f"unexpected: {rel} (not in the manifest)")
    identity = {}
    for rel in manifest.get("identity", {}):
        path = folder / rel
        if path.is_file():
            identity[rel] = _sha256_text(_datacard_body(path.read_text(encoding="utf-8"))) if rel == "DATACARD.md" else sha256_file(path)
    if len(identity) == len(manifest.get("identity", {})) and content_digest(identity, content) != manifest.get("content_digest"):
        problems.append("content digest: the files and provenance content do not give the manifest's content_digest")
    return problems


# --------------------------------------------------------------------------- command line


def _print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maisi.release", description="List, compare and verify synthetic CT releases.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="the releases under a root folder")
    p_list.add_argument("--root", default="results/releases")
    p_diff = sub.add_parser("diff", help="what differs between two releases (exit 1 when they differ)")
    p_diff.add_argument("a")
    p_diff.add_argument("b")
    p_verify = sub.add_parser("verify", help="re-hash a release's files against its manifest (exit 1 on mismatches)")
    p_verify.add_argument("release")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            rows = list_releases(args.root)
            if not rows:
                print(f"no releases under {args.root}")
                return 0
            shown = [{**r, "content_digest": str(r["content_digest"])[:16]} for r in rows]
            _print_table(shown, ("name", "version", "n_cases", "created_utc", "content_digest"))
            return 0
        if args.command == "diff":
            diff = diff_releases(args.a, args.b)
            sys.stdout.write(format_diff(diff))
            return 0 if diff["identical"] else 1
        problems = verify_release(args.release)
        if problems:
            print(f"{args.release}: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"{args.release}: all files match the manifest")
        return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
