"""Writing a shard of phantom cases to the source layout that preprocessing reads."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict

from maisi.core.io import read_json, sidecar_path, write_json
from maisi.core.provenance import provenance
from maisi.core.shards import run_cases
from maisi.core.tables import write_table
from maisi.sources.cases import phantom_paths
from maisi.sources.phantom.spec import PhantomSpec
from maisi.sources.phantom.writing import write_phantom_case

__all__ = ["spec_from_dict", "write_phantom_shard"]

COLUMNS = ("case_id", "status", "reason", "image", "label", "top_region", "bottom_region", "seed")


def spec_from_dict(d: Mapping) -> PhantomSpec:
    """Inverse of ``dataclasses.asdict`` for a spec read back from JSON (lists -> tuples)."""
    return PhantomSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def write_phantom_case_once(spec: PhantomSpec, source: str) -> dict:
    """Generate a case unless its files exist with a sidecar recording the same spec."""
    image, label = phantom_paths(source, spec.case_id)
    side = sidecar_path(image)
    spec_json = asdict(spec)
    row = {"image": image, "label": label, "top_region": spec.top_region, "bottom_region": spec.bottom_region, "seed": spec.seed}
    if os.path.exists(image) and os.path.exists(label) and os.path.exists(side):
        if read_json(side).get("spec") == json.loads(json.dumps(spec_json)):  # tuples read back as lists
            return row
    meta = write_phantom_case(spec, image, label)
    write_json(side, {"spec": spec_json, "meta": meta, "provenance": provenance("phantom")})
    return row


def write_phantom_shard(specs: Sequence[PhantomSpec], source: str, table: str, threads: int = 1) -> None:
    rows = run_cases(
        lambda spec: write_phantom_case_once(spec, source),
        list(specs),
        case_id=lambda s: s.case_id,
        threads=threads,
        on_error="stop",
        desc=f"phantom {source}",
    )
    write_table(rows, table, "phantom", COLUMNS)
