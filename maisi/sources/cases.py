"""From the configuration to cases and shards: what every source holds and where it goes.

Everything here is cheap (no image is opened), because Snakemake calls it while planning the DAG.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maisi.core.checks import (
    ConfigError,
)
from maisi.core.labels import resolve_label
from maisi.core.seeds import derive_seed
from maisi.core.shards import group_by_shard
from maisi.core.tables import read_table
from maisi.sources.phantom.spec import PhantomOptions, plan_phantom_cases

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)

__all__ = [
    "RESOURCES",
    "RESULTS",
    "local_cases",
    "phantom_specs",
    "phantom_cases",
    "table_cases",
    "n_shards",
    "shards_of",
    "resolve_label_map",
    "CaseInput",
]

RESOURCES = "resources"


RESULTS = "results"


_PHANTOM_KEYS = tuple(f.name for f in dataclasses.fields(PhantomOptions))  # the source keys that decide its cases


def n_shards(config: Mapping, source: str) -> int:
    return int(config["sources"][source].get("shards", config["shards"]))


def resolve_label_map(label_map: Mapping | None, where: str) -> dict[int, int] | None:
    if label_map is None:
        return None
    try:
        return {int(k): resolve_label(v) for k, v in label_map.items()}
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"config key '{where}': {exc}") from None


#: What a case id may be: it names output files and is a Snakemake wildcard value (no braces, no path parts).
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _pattern_regex(pattern: str) -> re.Pattern:
    head, _, tail = pattern.partition("{case}")
    return re.compile(re.escape(head) + r"(?P<case>[^/]+?)" + re.escape(tail.rstrip("/")) + r"/?$")


def local_cases(name: str, src: Mapping[str, Any]) -> list[CaseInput]:
    """Cases of a ``local`` source, found by globbing its image pattern; labels paired by case id."""
    root = Path(src["path"])
    if not root.is_dir():
        raise ConfigError(f"config key 'sources.{name}.path': folder {root} does not exist")
    image_pattern = src["images"]
    regex = _pattern_regex(image_pattern)
    found = sorted(glob.glob(str(root / image_pattern.replace("{case}", "*"))))
    cases = []
    label_map = resolve_label_map(src.get("label_map"), f"sources.{name}.label_map")
    for path in found:
        rel = os.path.relpath(path, root) + ("/" if image_pattern.endswith("/") else "")
        m = regex.match(rel)
        if not m:
            continue
        case = m.group("case")
        if not CASE_ID.fullmatch(case):
            raise ConfigError(
                f"config key 'sources.{name}.images': {path} gives the case id {case!r}; case ids are made of letters, "
                "digits, '_', '-', '+' and '.', start with a letter or digit and name output files (rename the file, "
                "or choose a pattern that leaves such characters outside {case})"
            )
        label = None
        if src.get("labels"):
            candidate = root / src["labels"].replace("{case}", case)
            label = str(candidate) if candidate.exists() else None
        cases.append(CaseInput(source=name, case_id=case, image=str(Path(path)), label=label, label_map=label_map))
    if not cases:
        raise ConfigError(f"config key 'sources.{name}.images': no file matches {root / image_pattern}")
    if src.get("labels"):
        unlabelled = [c.case_id for c in cases if c.label is None]
        if len(unlabelled) == len(cases):
            raise ConfigError(
                f"config key 'sources.{name}.labels': no case has a label map: nothing matches {root / src['labels']} "
                f"(for case {cases[0].case_id}: {root / src['labels'].replace('{case}', cases[0].case_id)}); "
                "fix the pattern, or set labels: null for a source without label maps"
            )
        if unlabelled:
            log.warning("source %s: %d of %d cases have no label map at %s: %s", name, len(unlabelled), len(cases),
                        root / src["labels"], ", ".join(unlabelled))  # fmt: skip
    return cases


@functools.lru_cache(maxsize=32)
def _phantom_specs_cached(name: str, run_seed: int, items: tuple) -> tuple:
    opts = dict(items)
    opts["seed"] = derive_seed(run_seed, name, opts.get("seed", 0))
    return tuple(plan_phantom_cases(PhantomOptions.from_config(opts), source=name))


def phantom_specs(name: str, src: Mapping[str, Any], run_seed: int) -> list:
    """The :class:`maisi.sources.phantom.spec.PhantomSpec` of every case of a ``phantom`` source."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in src.items() if k in _PHANTOM_KEYS))
    return list(_phantom_specs_cached(name, run_seed, items))


def phantom_paths(name: str, case_id: str) -> tuple[str, str]:
    root = Path(RESOURCES) / "sources" / name
    return str(root / "images" / f"{case_id}.nii.gz"), str(root / "labels" / f"{case_id}.nii.gz")


def phantom_cases(name: str, src: Mapping[str, Any], run_seed: int) -> list[CaseInput]:
    cases = []
    for spec in phantom_specs(name, src, run_seed):
        image, label = phantom_paths(name, spec.case_id)
        cases.append(CaseInput(source=name, case_id=spec.case_id, image=image, label=label))
    return cases


@functools.lru_cache(maxsize=256)
def _read_cases_table(path: str, mtime: float):
    return read_table(path)


def table_cases(name: str, cases_tsv: str | Path, src: Mapping[str, Any]) -> list[CaseInput]:
    """Cases of a converted ``dataset`` source, from its ``cases.tsv`` (labels already MAISI ids)."""
    table = _read_cases_table(str(cases_tsv), os.path.getmtime(cases_tsv))
    root = Path(cases_tsv).parent
    rows = table.sort_values("case_id")
    if src.get("max_cases"):
        rows = rows.head(int(src["max_cases"]))
    return [
        CaseInput(
            source=name,
            case_id=r.case_id,
            image=str(root / r.image),
            label=str(root / r.label) if r.label else None,
        )
        for r in rows.itertuples()
    ]


def shards_of(cases: list[CaseInput], n: int) -> dict[str, list[CaseInput]]:
    return group_by_shard(cases, n, key=lambda c: c.case_id)


@dataclass(frozen=True)
class CaseInput:
    """One case of a source: an image, an optional label map and how its labels map to MAISI ids."""

    source: str
    case_id: str
    image: str
    label: str | None = None
    label_map: Mapping[int, int] | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        if self.label_map is not None:
            d["label_map"] = {str(k): int(v) for k, v in sorted(self.label_map.items())}
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> CaseInput:
        lm = d.get("label_map")
        return cls(
            source=d["source"],
            case_id=d["case_id"],
            image=d["image"],
            label=d.get("label") or None,
            label_map={int(k): int(v) for k, v in lm.items()} if lm is not None else None,
        )
