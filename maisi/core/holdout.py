"""The dataset-level held-out split: real cases that no generative stage ever sees.

The split is decided once, when the dataset is prepared (``dataset.held_out``), and recorded in the
case table (column ``split``) and the datalist (held-out cases under ``testing``, the others under
``training``). The privacy audit measures how near honest new cases come to the training set with
them, and the downstream-utility stage evaluates its segmentation networks on them; both are
meaningless if a held-out case leaked into training. So every stage that learns from real cases (the
autoencoder, the latent cache and with it the diffusion UNet and ControlNet, the mask database, the
QC reference ranges) reads the training split only, and checks with :func:`check_not_held_out` that
nothing it was handed is held out.

Cases are chosen per source, by a seeded hash of ``source/case_id``, so the choice of a case does not
depend on the order of the files or on the other sources; stratified by body-region pair, so the training
split keeps every field of view the data has as long as it can.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import pandas as pd

from maisi.core.checks import InputError
from maisi.core.seeds import derive_seed

__all__ = [
    "TRAIN", "HELD_OUT", "HeldOutLeak", "case_key", "held_out_count", "choose_held_out", "split_column",
    "training_rows", "held_out_rows", "held_out_keys", "check_not_held_out", "require_held_out",
    "case_files",
]  # fmt: skip

#: Values of the case table's ``split`` column.
TRAIN = "train"
HELD_OUT = "held_out"


class HeldOutLeak(InputError):
    """A held-out real case reached a stage that learns from real cases."""


def case_key(source: str, case_id: str) -> str:
    """The identity of a prepared case across sources: ``source/case_id``."""
    return f"{source}/{case_id}"


def held_out_count(n_cases: int, fraction: float) -> int:
    """How many of a source's ``n_cases`` are held out: ``fraction`` of them rounded, at least one when the
    fraction is above zero, and never all (one case is left to train on)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dataset.held_out must lie in [0, 1), got {fraction}")
    if fraction == 0.0 or n_cases < 2:
        return 0
    return min(max(1, math.floor(fraction * n_cases + 0.5)), n_cases - 1)


def choose_held_out(
    keys: Iterable[tuple[str, str]], fraction: float, seed: int, strata: Mapping[str, str] | None = None
) -> set[str]:
    """The held-out cases (their :func:`case_key`) among ``(source, case_id)`` pairs: per source, the
    :func:`held_out_count` cases of lowest seeded hash. With ``strata`` (case key -> stratum, e.g. the body-region
    pair), each case is taken from the stratum with the most cases still in training (ties by the seeded hash), so a
    field of view that only one case shows is held out only when every stratum is down to one case."""
    by_source: dict[str, list[str]] = {}
    for source, case in keys:
        by_source.setdefault(source, []).append(case)
    chosen: set[str] = set()
    for source, cases in by_source.items():
        ranked = sorted(set(cases), key=lambda c: (derive_seed(seed, "held-out", case_key(source, c)), c))
        left = {c: (strata or {}).get(case_key(source, c), "") for c in ranked}
        for _ in range(held_out_count(len(ranked), fraction)):
            sizes = Counter(left.values())  # one pass per pick, not one per stratum
            largest = max(sizes.values())
            pick = next(c for c in left if sizes[left[c]] == largest)  # lowest hash of a largest stratum
            chosen.add(case_key(source, pick))
            del left[pick]
    return chosen


def split_column(cases: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """The ``split`` value (:data:`TRAIN` or :data:`HELD_OUT`) of each row of a case table, stratified by the
    (top, bottom) body-region pair where the table has them."""
    keys = list(zip(cases["source"], cases["case_id"], strict=True))
    strata = None
    if {"top_region", "bottom_region"} <= set(cases.columns):
        strata = {case_key(s, c): f"{t}->{b}" for s, c, t, b in zip(cases["source"], cases["case_id"], cases["top_region"],
                                                                   cases["bottom_region"], strict=True)}  # fmt: skip
    held = choose_held_out(keys, fraction, seed, strata)
    return [HELD_OUT if case_key(s, c) in held else TRAIN for s, c in keys]


def _split(cases: pd.DataFrame) -> pd.Series:
    """A case table's ``split`` column; tables written before the split existed hold out nothing."""
    if "split" not in cases.columns:
        return pd.Series([TRAIN] * len(cases), index=cases.index)
    bad = sorted(set(cases["split"].astype(str)) - {TRAIN, HELD_OUT})
    if bad:
        raise ValueError(f"case table: unknown split value(s) {bad}; expected {TRAIN!r} or {HELD_OUT!r}")
    return cases["split"].astype(str)


def training_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """The rows of the training split (what the generative stages may learn from)."""
    return cases[_split(cases) == TRAIN]


def held_out_rows(cases: pd.DataFrame) -> pd.DataFrame:
    """The rows of the held-out split."""
    return cases[_split(cases) == HELD_OUT]


def held_out_keys(cases: pd.DataFrame) -> set[str]:
    """The :func:`case_key` of every held-out case of a case table."""
    rows = held_out_rows(cases)
    return {case_key(s, c) for s, c in zip(rows["source"], rows["case_id"], strict=True)}


def case_files(rows: pd.DataFrame, labels: bool = False) -> dict[str, str] | dict[str, tuple[str, str]]:
    """Each case's :func:`case_key` mapped to its image in HU (``image_hu``, else ``image``), or with ``labels``
    to ``(image, label map)`` for the cases that have a label map."""
    if not labels:
        return {case_key(r.source, r.case_id): r.image_hu or r.image for r in rows.itertuples()}
    return {case_key(r.source, r.case_id): (r.image_hu or r.image, r.label) for r in rows.itertuples() if r.label}


def check_not_held_out(used: Iterable[str] | Mapping[str, str], held_out: Sequence[str] | set[str], stage: str) -> None:
    """Refuse (:class:`HeldOutLeak`) when any case ``stage`` was handed is held out.

    ``used`` holds :func:`case_key` values, or maps each to what it came from (a file), for the message.
    """
    where = dict(used) if isinstance(used, Mapping) else {k: "" for k in used}
    leaked = sorted(set(where) & set(held_out))
    if leaked:
        named = ", ".join(f"{k} ({where[k]})" if where[k] else k for k in leaked[:5])
        more = f" and {len(leaked) - 5} more" if len(leaked) > 5 else ""
        raise HeldOutLeak(
            None,
            f"{stage}: held-out real case(s) {named}{more} would be used; the held-out split (dataset.held_out) is kept "
            "out of every stage that learns from real cases, so that the privacy audit and the utility stage stay honest",
        )


def require_held_out(cases: pd.DataFrame, stage: str, need_labels: bool = False) -> pd.DataFrame:
    """The held-out rows (with a label map, ``need_labels``) of a case table, or an :class:`InputError` that says
    which keys give ``stage`` some."""
    rows = held_out_rows(cases)
    if need_labels and "label" in rows.columns:
        rows = rows[rows["label"].astype(str).str.strip() != ""]
    if rows.empty:
        what = "held-out case with a label map" if need_labels else "held-out case"
        raise InputError(None, f"{stage} needs held-out real cases, and the prepared dataset has no {what}: set "
                               f"dataset.held_out above 0 (a source needs at least 2 cases to hold one out), or {stage}.enabled: false")  # fmt: skip
    return rows
