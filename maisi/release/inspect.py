"""Reading releases back: the content digest, listing, diffs between two releases and verification.

The content digest is a sha256 over the sorted ``(path, sha256)`` of the identity files (images,
labels, ``dataset.json``, ``qc.tsv``, ``fid.tsv`` and the data card without its build trailer) and
the canonical JSON of ``provenance.json``'s ``content`` (config, checkpoint hashes, per-case seeds,
conditions and QC).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from maisi.core.io import json_default, read_json, sha256_file
from maisi.release.card import datacard_body

__all__ = ["list_releases", "diff_releases", "format_diff", "verify_release", "content_digest"]

def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=json_default)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (numpy scalars, paths and tuples converted)."""
    return json.loads(_canonical(obj))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_digest(identity: Mapping[str, str], content: Mapping[str, Any]) -> str:
    """sha256 over the sorted ``(relative path, sha256)`` of the identity files and the canonical
    JSON of the provenance ``content``."""
    h = hashlib.sha256()
    for rel, digest in sorted(identity.items()):
        h.update(f"{rel}\t{digest}\n".encode())
    h.update(b"provenance.content\t" + _canonical(content).encode("utf-8"))
    return h.hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists and scalars are leaves."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


_ABSENT = object()


def content_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two provenance contents (``_ABSENT`` where missing)."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b)) if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True, default=json_default)


def file_changes(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, list[str]]:
    return {
        "added": sorted(set(new) - set(old)),
        "removed": sorted(set(old) - set(new)),
        "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k]),
    }


def _capped(lines: Sequence[str], limit: int = 25) -> list[str]:
    return list(lines[:limit]) + ([f"  ... and {len(lines) - limit} more"] if len(lines) > limit else [])


def describe(files: Mapping[str, Sequence[str]], changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    lines = []
    for kind in ("added", "removed", "changed"):
        if files[kind]:
            lines.append(f"  files {kind} ({len(files[kind])}):")
            lines += _capped([f"    {p}" for p in files[kind]])
    if changes:
        lines.append(f"  provenance content differs ({len(changes)} key(s)):")
        lines += _capped([f"    {k}: {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items()])
    return lines


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
    changes = content_changes(ca, cb)

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
        "files": file_changes(ma.get("identity", {}), mb.get("identity", {})),
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
    lines += describe(diff["files"], changes)
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
            identity[rel] = sha256_text(datacard_body(path.read_text(encoding="utf-8"))) if rel == "DATACARD.md" else sha256_file(path)
    if len(identity) == len(manifest.get("identity", {})) and content_digest(identity, content) != manifest.get("content_digest"):
        problems.append("content digest: the files and provenance content do not give the manifest's content_digest")
    return problems
