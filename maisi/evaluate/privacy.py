"""Privacy audit (memorisation): is a generated case a copy of a case the models were trained on?

For every generated case the audit finds its nearest training case in a feature space (FID's extractor's
per-slice features pooled per volume: each plane's mean, the planes concatenated, standardised with the
training cases' mean and spread) and measures that pair's similarity in image space (Pearson correlation
of the HU values inside either body, both on FID's common grid). The yardstick is the held-out real
cases: they cannot be copies, so the distance of each to its nearest training case says how near an
honest new case comes, and how alike it is to its nearest training case in image space. A generated case
nearer than the ``percentile``-th percentile of those distances and more alike than the
``100 - percentile``-th percentile of those similarities (and than ``min_similarity``) is flagged as a
possible copy.

Generative models of small data memorise (GEM-3D and MedSyn report near-copies of training volumes);
no MAISI tool checks for it. The audit cannot prove privacy: it finds copies and near-copies in the
chosen feature space, not every trace of a training case (a copied organ in a new body, say).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from maisi.core.tables import read_table
from maisi.evaluate.qc_report import released_cases

if TYPE_CHECKING:  # torch is imported only where features are computed (the release applies the audit without it)
    from maisi.evaluate.features import FeatureExtractor
    from maisi.evaluate.settings import FIDSettings

__all__ = ["pooled_features", "nearest_training", "image_similarity", "audit_memorisation", "audit_files", "apply_audit", "audited_release", "plot_audit", "AUDIT_COLUMNS"]

#: Columns of the audit table (one row per generated case).
AUDIT_COLUMNS: tuple[str, ...] = (
    "case_id", "nearest_training", "distance", "threshold", "held_out_rank", "image_similarity", "similarity_threshold", "flagged",
)  # fmt: skip


def pooled_features(extractor: FeatureExtractor, volume: np.ndarray) -> np.ndarray:
    """One feature vector per volume: the mean of each plane's slice features, the planes in :data:`PLANES`' order."""
    from maisi.evaluate.features import PLANES

    planes = extractor.plane_features(volume)
    return np.concatenate([np.asarray(planes[name], dtype=np.float64).mean(axis=0) for name in PLANES])


def _standardiser(training: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """z-scores with the training cases' per-feature mean and spread; spreads below the median feature's are
    raised to it, so that features the training cases barely vary in (air, say) do not dominate the distance."""
    mean = training.mean(axis=0)
    std = training.std(axis=0)
    floor = float(np.median(std))
    std = np.maximum(std, floor if floor > 0 else 1.0)
    return lambda x: (np.asarray(x, dtype=np.float64) - mean) / std


def nearest_training(queries: np.ndarray, training: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries`` (``(n, d)``), the index of the nearest row of ``training`` (``(m, d)``) and
    their Euclidean distance."""
    queries, training = np.atleast_2d(queries), np.atleast_2d(training)
    if queries.shape[1] != training.shape[1]:
        raise ValueError(f"features of {queries.shape[1]} and {training.shape[1]} dimensions cannot be compared")
    d2 = (queries**2).sum(1)[:, None] + (training**2).sum(1)[None, :] - 2.0 * queries @ training.T
    index = d2.argmin(axis=1)
    return index, np.sqrt(np.maximum(d2[np.arange(len(queries)), index], 0.0))


def image_similarity(a: np.ndarray, b: np.ndarray, body_hu: float = -500.0) -> float:
    """Pearson correlation of two volumes on one grid, over the voxels inside either body (above ``body_hu``);
    1 for a copy, whatever the voxels outside."""
    if a.shape != b.shape:
        raise ValueError(f"volumes of shapes {a.shape} and {b.shape}: resample them to one grid first")
    inside = (a > body_hu) | (b > body_hu)
    if inside.sum() < 2:
        return float("nan")
    x, y = a[inside].astype(np.float64), b[inside].astype(np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def audit_memorisation(
    generated: Mapping[str, np.ndarray],
    training: Mapping[str, np.ndarray],
    held_out: Mapping[str, np.ndarray],
    percentile: float = 5.0,
    volumes: Callable[[str], np.ndarray] | None = None,
    min_similarity: float = 0.8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The memorisation audit of ``generated`` cases against ``training`` ones, judged by ``held_out`` ones.

    Args:
        generated, training, held_out: case id -> pooled feature vector (:func:`pooled_features`).
        percentile: a generated case nearer to a training case than this percentile of the held-out cases'
            nearest-training distances, and (with ``volumes``) more alike it in image space than the
            ``100 - percentile``-th percentile of the held-out cases' image similarities, is flagged.
        volumes: case id -> volume on a common grid (e.g. :func:`maisi.evaluate.features.load_volume`), for the
            image-space similarity of each generated case and its nearest training case (omitted: ``NaN``).
        min_similarity: the least image similarity of a flagged case, whatever the held-out cases' (with ``volumes``).

    Returns:
        ``(audit, held_out_distances)``: one row per generated case (:data:`AUDIT_COLUMNS`; ``held_out_rank``
        is the fraction of held-out cases nearer to the training set than it), and one row per held-out case
        (``case_id``, ``nearest_training``, ``distance``, with ``volumes`` ``image_similarity``).
    """
    if not training:
        raise ValueError("the audit needs the training cases' features")
    if not held_out:
        raise ValueError("the audit needs held-out real cases: their distances to the training cases are its yardstick")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile}")
    train_ids = list(training)
    scale = _standardiser(np.stack([training[c] for c in train_ids]))
    train = scale(np.stack([training[c] for c in train_ids]))
    held_ids = list(held_out)
    h_index, h_dist = nearest_training(scale(np.stack([held_out[c] for c in held_ids])), train)
    held = pd.DataFrame({"case_id": held_ids, "nearest_training": [train_ids[i] for i in h_index], "distance": h_dist})
    threshold = float(np.percentile(h_dist, percentile))
    # The second yardstick: how alike in image space an honest new case and its nearest training case are. A copy
    # must be near in features *and* alike in the image; with few held-out cases the feature threshold alone
    # flagged generated cases whose image correlation with their neighbour was negative, and the held-out
    # similarities' percentile alone (two cases near 0) flagged mask-conditioned cases correlating 0.3-0.5 with
    # the training case their mask came from: hence the floor.
    s_threshold = float("nan")
    if volumes is not None:
        held["image_similarity"] = [image_similarity(volumes(c), volumes(train_ids[i])) for c, i in zip(held_ids, h_index, strict=True)]
        s_threshold = max(float(np.nanpercentile(held["image_similarity"], 100.0 - percentile)), min_similarity)
    rows = []
    gen_ids = list(generated)
    if gen_ids:
        g_index, g_dist = nearest_training(scale(np.stack([generated[c] for c in gen_ids])), train)
        for case, i, dist in zip(gen_ids, g_index, g_dist, strict=True):
            similarity = image_similarity(volumes(case), volumes(train_ids[i])) if volumes is not None else float("nan")
            alike = volumes is None or bool(similarity > s_threshold)
            rows.append({
                "case_id": case, "nearest_training": train_ids[i], "distance": float(dist), "threshold": threshold,
                "held_out_rank": float((h_dist < dist).mean()), "image_similarity": similarity,
                "similarity_threshold": s_threshold, "flagged": bool(dist < threshold and alike),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(AUDIT_COLUMNS)), held


def audit_files(
    generated: Mapping[str, str | os.PathLike],
    training: Mapping[str, str | os.PathLike],
    held_out: Mapping[str, str | os.PathLike],
    extractor: FeatureExtractor,
    fid: FIDSettings,
    percentile: float = 5.0,
    progress: bool = True,
    min_similarity: float = 0.8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`audit_memorisation` of image files (case id -> path; ids unique across the three sets), each volume
    on FID's grid (``fid``'s spacing and size) and read once for its features."""
    from tqdm.auto import tqdm

    from maisi.evaluate.features import load_volume

    paths = {**generated, **training, **held_out}
    if len(paths) != len(generated) + len(training) + len(held_out):
        raise ValueError("privacy audit: a case id appears in more than one of the generated, training and held-out sets")
    features: dict[str, np.ndarray] = {}
    with contextlib.closing(tqdm(paths.items(), desc="privacy features", unit="volume", disable=not progress)) as bar:
        for case, path in bar:
            features[case] = pooled_features(extractor, load_volume(path, fid))

    def pick(ids: Mapping[str, object]) -> dict[str, np.ndarray]:
        return {c: features[c] for c in ids}

    return audit_memorisation(pick(generated), pick(training), pick(held_out), percentile,
                              volumes=lambda case: load_volume(paths[case], fid), min_similarity=min_similarity)  # fmt: skip


def plot_audit(audit: pd.DataFrame, held: pd.DataFrame, dest: str | os.PathLike, title: str = "") -> None:
    """Each case's distance to its nearest training case against its image correlation with it: held-out real cases
    (the yardstick) and generated cases (mask-conditioned ones, with a ``mask_source``, as squares), the two
    thresholds as lines and the corner they close (nearer and more alike: a possible copy) shaded, flagged cases
    in red. Without image similarities (an audit of features alone) every case sits at 0."""
    import matplotlib.pyplot as plt

    from maisi.core.figures import save_figure

    def similarity(table: pd.DataFrame) -> np.ndarray:
        values = pd.to_numeric(table.get("image_similarity", pd.Series(np.nan, index=table.index)), errors="coerce")
        return values.fillna(0.0).to_numpy(float)

    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    ax.scatter(held["distance"].astype(float), similarity(held), color="tab:blue", label="held-out real", zorder=3)
    flagged = (audit["flagged"].astype(str).str.lower() == "true").to_numpy()
    masked = (audit["mask_source"].astype(str) != "").to_numpy() if "mask_source" in audit.columns else np.zeros(len(audit), bool)
    distance, alike = audit["distance"].astype(float).to_numpy(), similarity(audit)
    for hit, colour, name in ((False, "tab:green", "generated"), (True, "tab:red", "generated, flagged")):
        for from_mask, marker, how in ((False, "o", ""), (True, "s", ", from a training mask")):
            keep = (flagged == hit) & (masked == from_mask)
            if keep.any():
                ax.scatter(distance[keep], alike[keep], color=colour, marker=marker, label=name + how, zorder=3)
    if len(audit):
        threshold = float(audit["threshold"].iloc[0])
        s_threshold = pd.to_numeric(audit.get("similarity_threshold", pd.Series([np.nan])), errors="coerce").iloc[0]
        ax.axvline(threshold, color="k", ls="--", lw=1, label="distance threshold")
        if np.isfinite(s_threshold):
            ax.axhline(s_threshold, color="k", ls=":", lw=1, label="similarity threshold")
            ax.fill_between([0.0, threshold], s_threshold, 1.05, color="tab:red", alpha=0.08, lw=0, label="possible copy")
    ax.set_xlim(left=0.0)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("distance to the nearest training case (standardised pooled features)")
    ax.set_ylabel("image correlation with it")
    ax.set_title(title or "Memorisation audit: near and alike = possible copy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, dest)


def audited_release(
    qc_cases: str | os.PathLike, audit: str | os.PathLike | None = None, requests: Sequence[str] | None = None
) -> pd.DataFrame:
    """The released cases a later evaluation reads: what QC lets in, less what a ``drop`` ``audit`` leaves out
    (the evaluations never learn from or judge a case the release does not hold), and, with ``requests``, only
    the cases generated for those requests (the mask-conditioned ones)."""
    cases = released_cases(qc_cases)
    if audit:
        cases = apply_audit(cases, read_table(audit), "drop")
    return cases if requests is None else cases[cases.request.isin(list(requests))].reset_index(drop=True)


def apply_audit(cases: pd.DataFrame, audit: pd.DataFrame, on_copy: str) -> pd.DataFrame:
    """The released ``cases`` (``case_id``, ``qc_status``, ``qc_reasons``, ...) after the audit: a flagged case is
    left out (``on_copy="drop"``) or kept with ``qc_status`` ``flagged`` and the audit's finding among its reasons."""
    if on_copy not in ("flag", "drop"):
        raise ValueError(f"privacy.on_copy must be 'flag' or 'drop', got {on_copy!r}")
    hits = audit[audit["flagged"].astype(str).str.lower() == "true"].set_index("case_id")
    cases = cases.copy()
    found = cases["case_id"].astype(str).isin(hits.index.astype(str))
    if on_copy == "drop":
        return cases[~found].reset_index(drop=True)
    for i in cases.index[found]:
        h = hits.loc[str(cases.at[i, "case_id"])]
        why = (f"privacy: nearest training case {h['nearest_training']} at distance {float(h['distance']):.3g} "
               f"< {float(h['threshold']):.3g} (possible copy)")  # fmt: skip
        cases.at[i, "qc_status"] = "flagged"
        cases.at[i, "qc_reasons"] = "; ".join(r for r in (str(cases.at[i, "qc_reasons"]), why) if r)
    return cases
