"""Released model files: their catalog (NVIDIA's MAISI files and the factory's own released models), fetching
them from Hugging Face, a local mirror or the package, and naming them in a config.

The catalog (``maisi/data/weights.yaml``) lists every file of the release a variant needs:
repository, path, role, licence and, where published, its sha256 and size. Files are fetched with the
factory's resumable, checksum-verified downloader (:func:`maisi.sources.download.download`) or copied
from a mirror folder that holds the repository's layout (air-gapped sites). A file is placed only after
its size (the catalog's ``size_bytes``, the server's ``Content-Length``) and digest were checked, so a
truncated or altered file is never placed nor pinned.

A file without a published digest is trusted on first use: its digest is recorded at its first fetch in
``<dest>/checksums.json`` and checked against that record on every later fetch, so a changed upstream
file or a corrupted copy is noticed; every fetch of such a file says so in the log and on stderr
("trust on first use: no published digest for <file>").

A mirror may carry a digest list in its root, checked like the catalog's digests (and against them):

* ``SHA256SUMS``: what ``sha256sum`` writes, one ``<64 hex digits>  <path>`` line per file (``*<path>``
  for binary mode and a leading ``./`` are accepted; empty lines and lines starting with ``#`` are skipped),
  the path relative to the mirror's root, e.g. written by ``cd MIRROR && sha256sum models/*.pt datasets/* > SHA256SUMS``;
* ``checksums.json``: ``{"<path>": {"sha256": "<hex>", "size_bytes": <int, optional>}}`` (or ``{"<path>": "<hex>"}``),
  the ledger a fetch writes, so a fetched folder serves as a mirror as it is.

A malformed list, or two entries for one path that disagree, is a ``ValueError`` naming the list and line.

The factory's own released models (repository ``package``) ship inside the package (``maisi/data/<path>``) with
pinned digests: a config names one by ``catalog:<variant>`` under ``pretrained.<role>`` or a stage's ``init_from``
(:func:`resolve_catalog_references`), and it is used only after its digest is checked (:func:`released_file`).

Command line::

    python -m maisi.models.weights list
    python -m maisi.models.weights fetch --variant rflow-ct --dest resources/nvidia [--mirror /data/NV-Generate-CT] [--models-only]

It prints the ``pretrained:`` block to put in the config.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from maisi.core.io import atomic_path, read_json, sha256_file, write_json
from maisi.models.variants import VARIANTS, variant
from maisi.sources.download import ChecksumError, download, part_path

__all__ = [
    "ReleasedFile", "WeightsCatalog", "load_weights_catalog", "file_url", "fetch_weights", "pretrained_block", "released_file",
    "resolve_catalog_references", "package_path", "read_mirror_digests", "MirrorDigest", "LEDGER", "HF_BASE_URL", "PACKAGE_REPO",
    "CATALOG_PREFIX", "MIRROR_DIGEST_LISTS",
]  # fmt: skip

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())  # the warnings go to stderr themselves (no duplicate from logging's last resort)

#: Where the fetched files' digests are recorded, inside the destination folder.
LEDGER = "checksums.json"


#: The digest lists a mirror may carry in its root (see the module's description).
MIRROR_DIGEST_LISTS = ("SHA256SUMS", LEDGER)


HF_BASE_URL = "https://huggingface.co"


#: The roles that go under ``pretrained:`` in the config.
_PRETRAINED_ROLES = ("autoencoder", "diffusion", "controlnet")


#: The ``repo`` of the files shipped inside the package (under ``maisi/data``).
PACKAGE_REPO = "package"


#: A config value that names a catalog file instead of a path: ``catalog:<variant>``.
CATALOG_PREFIX = "catalog:"


#: The config keys that take a checkpoint, and the catalog role each names.
_CHECKPOINT_KEYS = {("pretrained", "autoencoder"): "autoencoder", ("pretrained", "diffusion"): "diffusion",
                    ("pretrained", "controlnet"): "controlnet", ("train_diffusion", "init_from"): "diffusion",
                    ("train_controlnet", "init_from"): "controlnet"}  # fmt: skip


@dataclass(frozen=True)
class ReleasedFile:
    """One file of NVIDIA's release."""

    repo: str
    path: str
    variants: tuple[str, ...]
    role: str
    sha256: str | None = None
    size_bytes: int | None = None
    optional: bool = False
    licence: str | None = None  # where it is not the catalog's


@dataclass(frozen=True)
class WeightsCatalog:
    licence: str
    revision: str
    files: tuple[ReleasedFile, ...]

    def for_variant(self, variant_name: str, models_only: bool = False) -> list[ReleasedFile]:
        if variant_name not in VARIANTS:
            raise ValueError(f"unknown model variant {variant_name!r}; expected one of {', '.join(VARIANTS)}")
        files = [f for f in self.files if variant_name in f.variants and not (models_only and f.optional)]
        if not files:
            if variant(variant_name).released:  # the factory's own released model, not in the package yet
                raise ValueError(f"variant {variant_name!r} is not published in this package yet: make pretrain, then "
                                 f"python -m maisi.release.model publish --workdir <PRETRAIN_DIR>")  # fmt: skip
            raise ValueError(f"variant {variant_name!r} has no released files (it is the factory's own; train it)")
        return files

    def licence_of(self, f: ReleasedFile) -> str:
        return f.licence or self.licence


def load_weights_catalog(path: str | os.PathLike | None = None) -> WeightsCatalog:
    """The catalog of released files (the shipped one by default); a malformed entry is a ``ValueError`` naming it."""
    where = str(path) if path else "maisi/data/weights.yaml"
    text = Path(path).read_text(encoding="utf-8") if path else resources.files("maisi.data").joinpath("weights.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    files = []
    for i, raw in enumerate(data.get("files") or []):
        missing = [k for k in ("repo", "path", "variants", "role") if k not in raw]
        if missing:
            raise ValueError(f"{where}: files[{i}] lacks {', '.join(missing)}")
        digest = raw.get("sha256")
        if digest is not None and (len(str(digest)) != 64 or any(c not in "0123456789abcdef" for c in str(digest).lower())):
            raise ValueError(f"{where}: files[{i}] ({raw['path']}): sha256 {digest!r} is not a 64-digit hex digest")
        if raw["repo"] == PACKAGE_REPO and not digest:
            raise ValueError(f"{where}: files[{i}] ({raw['path']}): a file shipped with the package needs a pinned sha256")
        files.append(ReleasedFile(repo=raw["repo"], path=raw["path"], variants=tuple(raw["variants"]), role=raw["role"],
                                  sha256=str(digest).lower() if digest else None, size_bytes=raw.get("size_bytes"),
                                  optional=bool(raw.get("optional", False)), licence=raw.get("licence")))  # fmt: skip
    return WeightsCatalog(licence=str(data.get("licence", "")), revision=str(data.get("revision", "main")), files=tuple(files))


def file_url(f: ReleasedFile, base_url: str = HF_BASE_URL, revision: str = "main") -> str:
    """The file's download address (Hugging Face's ``resolve`` route)."""
    return f"{base_url.rstrip('/')}/{f.repo}/resolve/{revision}/{f.path}"


def package_path(f: ReleasedFile, root: str | os.PathLike | None = None) -> Path:
    """Where a file shipped with the package lies (``root``: the package's data folder, ``maisi/data`` by default)."""
    return Path(root) / f.path if root is not None else Path(str(resources.files("maisi.data").joinpath(f.path)))


@functools.cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per process for the same file state (the workflow resolves the config in every job)."""
    return sha256_file(path)


def released_file(variant_name: str, role: str, *, catalog: WeightsCatalog | None = None, root: str | os.PathLike | None = None) -> Path:
    """The released ``role`` file (``autoencoder``, ``diffusion``, ``controlnet``) of a variant shipped with the package,
    after its size and sha256 were checked against the catalog (a :class:`ChecksumError` naming the file where not).

    Files of other repositories (NVIDIA's) are fetched first (:func:`fetch_weights`) and named by their path."""
    catalog = catalog or load_weights_catalog()
    files = [f for f in catalog.for_variant(variant_name) if f.role == role]
    if not files:
        raise ValueError(f"variant {variant_name!r} has no released {role} file in the catalog")
    f = files[0]
    if f.repo != PACKAGE_REPO:
        raise ValueError(f"the {role} of {variant_name!r} ({f.repo}/{f.path}) is not shipped with the package: fetch it with "
                         f"python -m maisi.models.weights fetch --variant {variant_name} and give its path")  # fmt: skip
    path = package_path(f, root)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the released {role} of {variant_name!r} is missing from the package; reinstall it")
    stat = path.stat()
    if f.size_bytes is not None and stat.st_size != f.size_bytes:
        raise ChecksumError(path, "size in bytes", str(f.size_bytes), str(stat.st_size))
    if (actual := _digest(str(path), stat.st_size, stat.st_mtime_ns)) != f.sha256:
        raise ChecksumError(path, "sha256", str(f.sha256), actual)
    return path


def resolve_catalog_references(cfg: dict[str, Any], *, catalog: WeightsCatalog | None = None, root: str | os.PathLike | None = None) -> None:
    """Replace each ``catalog:<variant>`` under ``pretrained.<role>`` and ``train_diffusion``/``train_controlnet.init_from``
    with the verified package file (:func:`released_file`), in place; the variant must be ``model.variant``.
    A bad reference is a ``ValueError`` naming the config key."""
    configured = (cfg.get("model") or {}).get("variant")
    for (section, key), role in _CHECKPOINT_KEYS.items():
        value = (cfg.get(section) or {}).get(key)
        if not (isinstance(value, str) and value.startswith(CATALOG_PREFIX)):
            continue
        name = value[len(CATALOG_PREFIX):]
        where = f"config key '{section}.{key}'"
        if name not in VARIANTS:
            raise ValueError(f"{where}: {value!r} names no variant; expected {CATALOG_PREFIX}<one of {', '.join(VARIANTS)}>")
        if configured and name != configured:
            raise ValueError(f"{where}: {value!r} is a checkpoint of variant {name!r}, but model.variant is {configured!r}")
        try:
            cfg[section][key] = str(released_file(name, role, catalog=catalog, root=root))
        except (OSError, ValueError, ChecksumError) as exc:
            raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class MirrorDigest:
    """A file's digest (and size, where given) as a mirror's digest list gives it."""

    sha256: str
    size_bytes: int | None
    source: str  # the list and line it comes from


_SHA256SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _list_path(raw: str) -> str:
    """A listed path as the catalog writes it (``/``-separated, relative, no ``./``)."""
    path = raw
    while path.startswith("./"):
        path = path[2:]
    return path


def _read_sha256sums(listing: Path) -> list[tuple[str, MirrorDigest]]:
    out = []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("\\"):  # sha256sum escapes a name holding a backslash or a newline
            line = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), line[1:])
        match = _SHA256SUM_LINE.match(line)
        if not match:
            raise ValueError(f"{listing}: line {number} is not '<64 hex digits>  <path>' as sha256sum writes it: {line[:120]!r}")
        out.append((_list_path(match.group(2)), MirrorDigest(match.group(1).lower(), None, f"{listing}, line {number}")))
    return out


def _read_json_digests(listing: Path) -> list[tuple[str, MirrorDigest]]:
    try:
        data = json.loads(listing.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{listing}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{listing}: expected an object of <path>: {{sha256, size_bytes}}, got {type(data).__name__}")
    out = []
    for path, value in data.items():
        digest, size = (value.get("sha256"), value.get("size_bytes")) if isinstance(value, dict) else (value, None)
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-fA-F]{64}", digest)):
            raise ValueError(f"{listing}: entry {path!r}: sha256 {digest!r} is not a 64-digit hex digest")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"{listing}: entry {path!r}: size_bytes {size!r} is not a number of bytes")
        out.append((_list_path(path), MirrorDigest(digest.lower(), size, f"{listing}, entry {path!r}")))
    return out


def read_mirror_digests(mirror: str | os.PathLike) -> dict[str, MirrorDigest]:
    """The digests a mirror's lists give (:data:`MIRROR_DIGEST_LISTS` in its root), by path; none without a list.

    A malformed list, or two entries for one path that disagree, is a ``ValueError`` naming the list and line."""
    digests: dict[str, MirrorDigest] = {}
    for name, reader in zip(MIRROR_DIGEST_LISTS, (_read_sha256sums, _read_json_digests), strict=True):
        listing = Path(mirror) / name
        if not listing.is_file():
            continue
        for path, entry in reader(listing):
            if (seen := digests.get(path)) is not None:
                if seen.sha256 != entry.sha256 or None not in (seen.size_bytes, entry.size_bytes) and seen.size_bytes != entry.size_bytes:
                    raise ValueError(f"{entry.source}: {path} is listed twice, with another digest or size than at {seen.source}")
                entry = MirrorDigest(entry.sha256, entry.size_bytes if entry.size_bytes is not None else seen.size_bytes, seen.source)
            digests[path] = entry
    return digests


def _disagreement(where: str | os.PathLike, expected: str, actual: str, message: str) -> ChecksumError:
    """A :class:`ChecksumError` between two digest records (not a file), with its own message."""
    err = ChecksumError(where, "sha256", expected, actual)
    err.args = (message,)
    return err


def _say(message: str) -> None:
    """A warning in the log and on stderr."""
    logger.warning(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _copy_from_mirror(source: Path, dest: Path, expected: str | None, size: int | None = None) -> None:
    """Copy ``source`` onto ``dest`` atomically; the copy is checked against ``size`` and ``expected`` before it
    replaces ``dest`` (a file of another size is refused before it is copied)."""
    if not source.is_file():
        raise FileNotFoundError(f"mirror file {source} not found (the mirror keeps the repository's layout)")
    if size is not None and (have := source.stat().st_size) != size:
        raise ChecksumError(source, "size in bytes", str(size), str(have))
    with atomic_path(dest) as tmp:
        shutil.copyfile(source, tmp)
        if size is not None and (have := tmp.stat().st_size) != size:
            raise ChecksumError(source, "size in bytes", str(size), str(have))
        if expected and (actual := sha256_file(tmp)) != expected:
            raise ChecksumError(source, "sha256", expected, actual)


def fetch_weights(
    variant_name: str,
    dest: str | os.PathLike,
    *,
    mirror: str | os.PathLike | None = None,
    base_url: str = HF_BASE_URL,
    models_only: bool = False,
    catalog: WeightsCatalog | None = None,
    progress: bool = True,
    **download_kwargs: Any,
) -> dict[str, Path]:
    """Fetch a variant's released files into ``dest`` (the repository's layout); returns role -> path.

    Each file is checked against the catalog's sha256 and ``size_bytes``, the mirror's digest list (see the
    module's description) and, where the catalog publishes no digest, the digest recorded at its first fetch
    (``dest/checksums.json``), before it is placed; a mismatch between any two of them or with the file is a
    :class:`ChecksumError` naming the file (or the list), and nothing is placed nor recorded. A download is
    also checked against the size the server announces. A file already in place that matches is not fetched
    again. Every fetch of a file without a published digest warns "trust on first use" in the log and on stderr.
    """
    catalog = catalog or load_weights_catalog()
    dest = Path(dest)
    ledger_path = dest / LEDGER
    ledger: dict[str, Any] = read_json(ledger_path) if ledger_path.is_file() else {}
    listed_digests = read_mirror_digests(mirror) if mirror is not None else {}
    out: dict[str, Path] = {}
    for f in catalog.for_variant(variant_name, models_only):
        target = dest / f.path
        recorded = ledger.get(f.path, {}).get("sha256")
        listed = listed_digests.get(f.path) if f.repo != PACKAGE_REPO else None
        if f.sha256 and recorded and recorded != f.sha256:
            raise ChecksumError(ledger_path, "sha256", f.sha256, recorded)
        if listed and f.sha256 and listed.sha256 != f.sha256:
            raise _disagreement(listed.source, f.sha256, listed.sha256, f"{listed.source}: the mirror lists sha256 {listed.sha256} for "
                                f"{f.path}, but the catalog publishes {f.sha256}: the mirror's file or its list is not the release's")  # fmt: skip
        if listed and recorded and listed.sha256 != recorded:
            raise _disagreement(listed.source, recorded, listed.sha256, f"{listed.source}: the mirror lists sha256 {listed.sha256} for "
                                f"{f.path}, but its first fetch recorded {recorded} in {ledger_path}: the file has changed")  # fmt: skip
        size = f.size_bytes if f.size_bytes is not None else (listed.size_bytes if listed else None)
        if listed and None not in (f.size_bytes, listed.size_bytes) and listed.size_bytes != f.size_bytes:
            raise ChecksumError(listed.source, "size in bytes", str(f.size_bytes), f"{listed.size_bytes} (listed for {f.path})")
        expected = f.sha256 or recorded or (listed.sha256 if listed else None)
        if f.repo != PACKAGE_REPO and not f.sha256:
            checked = (f"checked against the mirror's list ({listed.source}) only" if listed else
                       f"checked against the digest recorded at its first fetch in {ledger_path}" if recorded else
                       f"its digest is recorded now, at its first fetch, in {ledger_path}")  # fmt: skip
            _say(f"trust on first use: no published digest for {f.path}; {checked}"
                 f"{'' if size is not None else ' (and no published size either)'}")  # fmt: skip
        if f.repo == PACKAGE_REPO or mirror is not None:
            origin = package_path(f) if f.repo == PACKAGE_REPO else Path(mirror) / f.path
            in_place = target.is_file() and expected and (size is None or target.stat().st_size == size) and sha256_file(target) == expected
            if not in_place:
                _copy_from_mirror(origin, target, expected, size)
            source = str(origin)
        else:
            source = file_url(f, base_url, catalog.revision)
            if expected is None:  # nothing unverified already there (a file, a part to resume) is taken in with it
                target.unlink(missing_ok=True)
                part_path(target).unlink(missing_ok=True)
            download(source, target, sha256=expected, size=size, progress=progress, **download_kwargs)
        digest = expected or sha256_file(target)  # with a digest, download() and the mirror copy verified the file
        if f.path not in ledger:
            via = "the catalog" if f.sha256 else f"the mirror's list ({listed.source})" if listed else "first use (no published digest)"
            ledger[f.path] = {"sha256": digest, "size_bytes": target.stat().st_size, "source": source, "licence": catalog.licence_of(f),
                              "digest_from": via, "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
            write_json(ledger_path, ledger)
        out[f.role] = target
    return out


def pretrained_block(variant_name: str, paths: dict[str, Path]) -> str:
    """The config lines that use fetched files."""
    lines = ["model:", f"  variant: {variant_name}", "pretrained:"]
    lines += [f"  {role}: {paths[role]}" for role in _PRETRAINED_ROLES if role in paths]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maisi.models.weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the catalog's files")
    fetch = sub.add_parser("fetch", help="fetch a variant's files")
    fetch.add_argument("--variant", default="rflow-ct", choices=[v for v in VARIANTS if v != "tiny"])
    fetch.add_argument("--dest", default="resources/nvidia", help="destination folder (the repository's layout)")
    fetch.add_argument("--mirror", help="a local folder with the repository's layout, instead of downloading")
    fetch.add_argument("--base-url", default=HF_BASE_URL, help="the Hugging Face address (or a proxy of it)")
    fetch.add_argument("--models-only", action="store_true", help="skip the mask-generation models and the mask database")
    args = parser.parse_args(argv)
    catalog = load_weights_catalog()
    if args.command == "list":
        print(f"licence: {catalog.licence} (revision {catalog.revision})")
        for f in catalog.files:
            print(f"{f.repo}/{f.path}  role={f.role}  variants={','.join(f.variants)}  sha256={f.sha256 or 'none published (trust on first use)'}"
                  f"{'  licence=' + f.licence if f.licence else ''}")  # fmt: skip
        return 0
    try:
        paths = fetch_weights(args.variant, args.dest, mirror=args.mirror, base_url=args.base_url, models_only=args.models_only,
                              catalog=catalog)  # fmt: skip
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"# {len(paths)} files of {args.variant} in {args.dest} ({catalog.licence}); in the config:")
    print(pretrained_block(args.variant, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
