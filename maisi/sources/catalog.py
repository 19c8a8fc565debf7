"""The catalog of public CT datasets (``config/datasets.yaml``): loading, validation, download.

Each entry names an archive (URL, checksum, licence, archive type), the converter that brings the
extracted data to the common layout (see :mod:`maisi.sources.converters`) and, for label maps that use
their own values, a ``label_map`` from those values to MAISI classes.

Checksums: an entry may leave ``md5`` and ``sha256`` null (the catalog still loads, so data that
is already on disk can be converted), but :func:`download_entry` refuses to download it unless
it says ``checksum: none-published``, which records that the source publishes no checksum.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import jsonschema
import yaml

from maisi.core.anatomy import BODY_REGIONS
from maisi.core.labels import resolve_label
from maisi.sources.converters import CONVERTERS, NEEDS_LABEL_MAP

__all__ = ["CatalogError", "MissingChecksumError", "DatasetEntry", "ENTRY_SCHEMA", "CATALOG_SCHEMA", "NONE_PUBLISHED", "default_catalog_path", "load_catalog", "parse_catalog", "download_entry", "extract_entry", "UNPACKED_FACTOR"]

#: Value of an entry's ``checksum`` key declaring that the source publishes no checksum.
NONE_PUBLISHED = "none-published"


#: What a dataset's archive may unpack to, as a multiple of the catalog's ``size_gb`` (the published archive size;
#: the catalog's archives hold compressed NIfTI, about their own size unpacked).
UNPACKED_FACTOR: int = 4


ARCHIVE_TYPES: tuple[str, ...] = ("tar", "tar.gz", "tgz", "tar.bz2", "tar.xz", "zip")


ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url", "licence", "archive_type", "converter", "description", "citation", "modality", "size_gb"],
    "properties": {
        "url": {"type": "string", "pattern": r"^https?://\S+$"},
        "filename": {"type": "string", "pattern": r"^[^/\\]+$"},
        "md5": {"type": ["string", "null"], "pattern": "^[0-9a-f]{32}$"},
        "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "checksum": {"enum": [NONE_PUBLISHED]},
        "licence": {"type": "string", "minLength": 1},
        "archive_type": {"enum": list(ARCHIVE_TYPES)},
        "subdir": {"type": "string", "minLength": 1},
        "converter": {"type": "string", "minLength": 1},
        "label_map": {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": {"type": ["string", "integer"]},
        },
        "description": {"type": "string", "minLength": 1},
        "citation": {"type": "string", "minLength": 1},
        "homepage": {"type": "string"},
        "modality": {"enum": ["CT"]},
        "region_hint": {"enum": [*BODY_REGIONS, None]},
        "size_gb": {"type": "number", "exclusiveMinimum": 0},
    },
}


CATALOG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["datasets"],
    "properties": {
        "version": {"const": 1},
        "datasets": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
        },
    },
}


class CatalogError(ValueError):
    """The catalog file is invalid; the message names the entry and key of every problem."""


class MissingChecksumError(ValueError):
    """A catalog entry has no checksum and does not declare ``checksum: none-published``."""


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the catalog, validated and with ``label_map`` resolved to MAISI ids."""

    name: str
    url: str
    md5: str | None
    sha256: str | None
    licence: str
    archive_type: str
    converter: str
    label_map: dict[int, int] = field(default_factory=dict)
    description: str = ""
    citation: str = ""
    modality: str = "CT"
    region_hint: str | None = None
    size_gb: float | None = None
    filename: str | None = None
    subdir: str | None = None
    homepage: str | None = None
    checksum_policy: str = "required"

    @property
    def archive_name(self) -> str:
        """File name of the downloaded archive (``filename`` or the URL's last path component)."""
        if self.filename:
            return self.filename
        return unquote(Path(urlparse(self.url).path).name)

    @property
    def checksums(self) -> dict[str, str]:
        """The known digests, e.g. ``{"md5": "..."}`` (keyword arguments of :func:`maisi.sources.download.download`)."""
        return {k: v for k, v in (("md5", self.md5), ("sha256", self.sha256)) if v}

    def require_checksum(self) -> dict[str, str]:
        """:attr:`checksums`, or :class:`MissingChecksumError` if there is none and none is published."""
        if not self.checksums and self.checksum_policy != NONE_PUBLISHED:
            raise MissingChecksumError(
                f"dataset {self.name!r} has no md5/sha256; fill one in or set 'checksum: {NONE_PUBLISHED}' "
                "if the source publishes none"
            )
        return self.checksums

    def as_dict(self) -> dict[str, Any]:
        """Plain-data view (for sidecars and logs)."""
        return {
            "name": self.name, "url": self.url, "filename": self.archive_name, "md5": self.md5,
            "sha256": self.sha256, "checksum_policy": self.checksum_policy, "licence": self.licence,
            "archive_type": self.archive_type, "converter": self.converter,
            "label_map": {str(k): v for k, v in self.label_map.items()}, "modality": self.modality,
            "region_hint": self.region_hint, "citation": self.citation,
        }


def default_catalog_path() -> Path:
    """``config/datasets.yaml``, shipped in the package as ``maisi/data/datasets.yaml`` (a link to it in a checkout)."""
    return Path(__file__).resolve().parents[1] / "data" / "datasets.yaml"


def load_catalog(path: str | os.PathLike | None = None) -> dict[str, DatasetEntry]:
    """Read and validate a catalog YAML file; return its entries by name.

    Raises:
        CatalogError: listing every problem, each with the entry name and key (schema violations,
            unknown converter, label_map values that are not MAISI classes...).
    """
    path = Path(path) if path is not None else default_catalog_path()
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise CatalogError(f"{path}: not valid YAML: {err}") from err
    return parse_catalog(data, source=str(path))


def parse_catalog(data: Any, source: str = "<catalog>") -> dict[str, DatasetEntry]:
    """Validate already-parsed catalog data (see :func:`load_catalog`)."""
    if not isinstance(data, Mapping):
        raise CatalogError(f"{source}: expected a mapping with a 'datasets' key")
    problems = [f"{source}: {_where(err.absolute_path)}: {err.message}" for err in _errors(CATALOG_SCHEMA, data)]
    if problems:
        raise CatalogError("\n".join(problems))

    entries: dict[str, DatasetEntry] = {}
    for name, raw in data["datasets"].items():
        where = f"{source}: dataset {name!r}"
        if not isinstance(raw, Mapping):
            problems.append(f"{where}: expected a mapping, got {type(raw).__name__}")
            continue
        raw = dict(raw)
        if isinstance(raw.get("label_map"), Mapping):  # YAML gives int keys; the schema wants strings
            raw["label_map"] = {str(k): v for k, v in raw["label_map"].items()}
        errs = _errors(ENTRY_SCHEMA, raw)
        for err in errs:
            problems.append(f"{where}: key {_key(err)!r}: {err.message}")
        if errs:
            continue

        entry_problems: list[str] = []
        if raw["converter"] not in CONVERTERS:
            entry_problems.append(
                f"{where}: key 'converter': unknown converter {raw['converter']!r} "
                f"(known: {', '.join(sorted(CONVERTERS))})"
            )
        label_map: dict[int, int] = {}
        for key, value in raw.get("label_map", {}).items():
            try:
                label_map[int(key)] = resolve_label(value)
            except (KeyError, ValueError) as err:
                msg = err.args[0] if err.args else err
                entry_problems.append(f"{where}: key 'label_map.{key}': {value!r} is not a MAISI class ({msg})")
        if 0 in label_map and label_map[0] != 0:
            entry_problems.append(f"{where}: key 'label_map.0': background (0) must stay 0")
        if raw["converter"] in NEEDS_LABEL_MAP and not label_map:
            entry_problems.append(f"{where}: key 'label_map': converter {raw['converter']!r} needs a label_map")
        if entry_problems:
            problems.extend(entry_problems)
            continue

        entries[name] = DatasetEntry(
            name=name,
            url=raw["url"],
            md5=raw.get("md5"),
            sha256=raw.get("sha256"),
            licence=raw["licence"],
            archive_type=raw["archive_type"],
            converter=raw["converter"],
            label_map=label_map,
            description=" ".join(raw["description"].split()),
            citation=" ".join(raw["citation"].split()),
            modality=raw["modality"],
            region_hint=raw.get("region_hint"),
            size_gb=float(raw["size_gb"]),
            filename=raw.get("filename"),
            subdir=raw.get("subdir"),
            homepage=raw.get("homepage"),
            checksum_policy=raw.get("checksum", "required"),
        )
    if problems:
        raise CatalogError("\n".join(problems))
    return entries


def _errors(schema: dict[str, Any], instance: Any) -> list[jsonschema.ValidationError]:
    validator = jsonschema.Draft202012Validator(schema)
    return sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))


def _where(path) -> str:
    return ".".join(map(str, path)) or "<top level>"


def _key(err: jsonschema.ValidationError) -> str:
    """The entry key an error is about (for ``additionalProperties`` / ``required``: the offending key)."""
    if err.absolute_path:
        return ".".join(map(str, err.absolute_path))
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        return ", ".join(map(str, extra))
    if err.validator == "required":
        missing = [k for k in err.validator_value if k not in err.instance]
        return ", ".join(missing)
    return "<entry>"


def download_entry(entry: DatasetEntry, downloads_dir: str | os.PathLike, **kwargs: Any) -> Path:
    """Download an entry's archive to ``downloads_dir/<archive_name>`` with its checksum.

    ``kwargs`` go to :func:`maisi.sources.download.download` (``retries``, ``progress``...).

    Raises:
        MissingChecksumError: the entry has no checksum and does not say ``checksum: none-published``.
    """
    from maisi.sources.download import download

    checksums = entry.require_checksum()
    return download(entry.url, Path(downloads_dir) / entry.archive_name, **checksums, **kwargs)


def extract_entry(
    entry: DatasetEntry, archive: str | os.PathLike, target_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """:func:`maisi.sources.download.safe_extract` with the entry's archive type, the unpacked size bounded by
    :data:`UNPACKED_FACTOR` times its ``size_gb`` (an :class:`~maisi.sources.download.ArchiveTooLargeError` beyond)."""
    from maisi.sources.download import ArchiveTooLargeError, safe_extract

    limit = int(UNPACKED_FACTOR * entry.size_gb * 1e9) if entry.size_gb else None
    try:
        return safe_extract(archive, target_dir, entry.archive_type, overwrite=overwrite, max_total_bytes=limit)
    except ArchiveTooLargeError as err:
        if limit is None or "over the limit" not in err.reason:
            raise
        raise ArchiveTooLargeError(err.archive, err.member, f"{err.reason} ({UNPACKED_FACTOR} x size_gb {entry.size_gb} of dataset "
                                   f"{entry.name!r} in the catalog; correct size_gb there if the archive really is larger)") from None
