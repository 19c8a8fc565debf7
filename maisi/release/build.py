"""Building a release: assembling it, its identity (content digest) and never changing a version.

A release lives at ``<root>/<name>/<version>/`` and holds the generated images and label maps in
the Medical Segmentation Decathlon layout (``imagesTr``, ``labelsTr``, ``dataset.json``), the QC
and FID tables, ``provenance.json``, a ``DATACARD.md`` and a ``manifest.json`` with the sha256 and
size of every file.

The identity of a release is its *content digest* (:func:`maisi.release.inspect.content_digest`).
What built the release (git commit, package versions, host, time) is recorded under ``build`` and in
the data card's trailer, but is not part of the identity, so rebuilding the same content elsewhere
gives the same digest.

A release is assembled in a hidden ``.building-<version>-<random>/`` folder and renamed into place
only once complete; a version that exists already is never changed: the same content is a no-op,
different content raises :class:`ReleaseConflict`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from maisi.core.io import current_umask, read_json, sha256_file, sidecar_path, write_json, write_text
from maisi.core.labels import label_name
from maisi.core.provenance import git_state, package_versions, utc_now
from maisi.release.card import MAISI_CITATION, datacard_trailer, render_datacard
from maisi.release.evaluation import EVALUATION_FILES, privacy_columns, read_evaluation
from maisi.release.inspect import content_changes, content_digest, describe, file_changes, jsonable, sha256_text

__all__ = ["case_files", "ReleaseResult", "ReleaseConflict", "build_release"]

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


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



def case_files(case_id: str) -> dict[str, str]:
    """Where a case's image and label map lie in a release (the Medical Segmentation Decathlon layout)."""
    return {"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz"}

def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"invalid release {kind} {value!r}: use letters, digits, '.', '_' and '-', not starting with '.'")
    return value


def _build_info(repo_dir: str | os.PathLike) -> dict[str, Any]:
    return {
        "git": git_state(repo_dir),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_utc": utc_now(),
    }


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
    return jsonable({
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


def _dataset_json(name: str, version: str, description: str, licence: str, labels: Sequence[int], case_ids: Sequence[str]) -> dict[str, Any]:
    label_map = {"0": "background"}
    label_map.update({str(int(i)): label_name(int(i)) for i in labels if int(i) != 0})
    return {
        "name": name, "description": description, "reference": f"Synthetic CT generated with MAISI ({MAISI_CITATION})",
        "licence": licence, "release": version, "tensorImageSize": "3D", "modality": {"0": "CT"}, "labels": label_map,
        "numTraining": len(case_ids), "numTest": 0,
        "training": [{k: f"./{v}" for k, v in case_files(c).items()} for c in case_ids], "test": [],
    }  # fmt: skip






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
    evaluation: Mapping[str, str | os.PathLike] | None = None,
) -> ReleaseResult:
    """Build ``<root>/<name>/<version>/`` from the generated ``cases`` (or find it already built).

    ``cases`` has columns ``case_id``, ``request``, ``image``, ``label``, ``qc_status`` (``pass`` or
    ``flagged``) and ``qc_reasons``; ``checkpoints`` maps model name -> checkpoint file; ``labels``
    are the label ids in the released maps; ``sources`` are ``{source, licence, citation}`` records.
    An existing version with the same content digest is left untouched (``created=False``); with a
    different digest :class:`ReleaseConflict` says what differs. ``evaluation`` maps the privacy, label-fidelity
    and utility reports (:data:`maisi.release.evaluation.EVALUATION_FILES` keys) to their files: copied under
    ``evaluation/``, summarised in the data card, the audit's columns joined to ``qc.tsv``.
    """
    _check_name("name", name)
    _check_name("version", version)
    cases = _check_cases(cases)
    for model, path in checkpoints.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{model} checkpoint {path} does not exist")
    evaluation = dict(evaluation or {})
    tables = read_evaluation(evaluation)
    qc, fid = privacy_columns(_read_tsv(qc_table, "QC"), tables.get("privacy")), _read_tsv(fid_table, "FID")
    qc_text = qc.to_csv(sep="\t", index=False)
    organs = _read_tsv(qc_organs_table, "QC organ") if qc_organs_table else pd.DataFrame()
    labels = sorted({int(i) for i in labels})

    hashes = {m: sha256_file(p) for m, p in sorted(checkpoints.items())}
    identity: dict[str, str] = {}
    records: dict[str, Any] = {}
    for r in cases.itertuples():
        image_sha, label_sha = sha256_file(r.image), sha256_file(r.label)
        files = case_files(r.case_id)
        identity[files["image"]], identity[files["label"]] = image_sha, label_sha
        records[str(r.case_id)] = _case_record(r, image_sha, hashes)
    content = jsonable({
        "name": name, "version": version, "config": dict(config), "checkpoints": hashes, "labels": labels,
        "sources": [dict(s) for s in sources], "cases": records,
    })  # fmt: skip
    licence = _licence(config, sources)
    description = description or f"Synthetic CT volumes with label maps generated with MAISI ({len(cases)} cases)."
    dataset = _dataset_json(name, version, description, licence, labels, list(cases.case_id))
    dataset_text = json.dumps(dataset, indent=2, sort_keys=True) + "\n"
    card_body = render_datacard(name, version, description, content, qc, fid, cases, licence, organs, tables)
    identity.update({
        "dataset.json": sha256_text(dataset_text), "qc.tsv": sha256_text(qc_text), "fid.tsv": sha256_file(fid_table),
        "DATACARD.md": sha256_text(card_body),
    })  # fmt: skip
    identity.update({f"evaluation/{EVALUATION_FILES[k]}": sha256_file(p) for k, p in sorted(evaluation.items()) if k in tables})
    if qc_organs_table:
        identity["qc_organs.tsv"] = sha256_file(qc_organs_table)
    digest = content_digest(identity, content)

    parent = Path(root) / name
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / version
    with _version_lock(parent, version):
        _remove_stale(parent, version)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a release is as readable as the other outputs
        try:
            if final.exists():
                _check_existing(final, digest, identity, content)
                return ReleaseResult(final, digest, False, len(cases))
            for r in cases.itertuples():
                for kind, rel in case_files(r.case_id).items():
                    _place(Path(getattr(r, kind)), tmp / rel)
            write_text(tmp / "dataset.json", dataset_text)
            write_text(tmp / "qc.tsv", qc_text)
            if evaluation:
                (tmp / "evaluation").mkdir()
            for key, path in sorted(evaluation.items()):  # copies: the release is made read-only, the run's reports not
                shutil.copyfile(path, tmp / "evaluation" / EVALUATION_FILES[key])
            shutil.copyfile(fid_table, tmp / "fid.tsv")
            if qc_organs_table:
                shutil.copyfile(qc_organs_table, tmp / "qc_organs.tsv")
            build = _build_info(repo_dir)
            write_json(tmp / "provenance.json", {"content": content, "build": build})
            write_text(tmp / "DATACARD.md", card_body + datacard_trailer(digest, build))
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
    lines += describe(file_changes(manifest.get("identity", {}), identity), content_changes(old_content, content))
    lines.append("A release is immutable: bump the version in release.version to publish this content.")
    raise ReleaseConflict("\n".join(lines))
