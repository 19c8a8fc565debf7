"""Privacy audit (memorisation): is a generated case a copy of a case the models were trained on?

For every generated case the audit finds its nearest training case in a feature space (FID's extractor's
per-slice features pooled per volume: each plane's mean, the planes concatenated, standardised with the
training cases' mean and spread) and measures that pair's similarity in image space (Pearson correlation
of the HU values inside either body, both on FID's common grid). The yardstick is the held-out real
cases: they cannot be copies, so the distance of each to its nearest training case says how near an
honest new case comes. A generated case nearer than the ``percentile``-th percentile of those
distances is flagged as a possible copy.

Generative models of small data memorise (GEM-3D and MedSyn report near-copies of training volumes);
no MAISI tool checks for it. The audit cannot prove privacy: it finds copies and near-copies in the
chosen feature space, not every trace of a training case (a copied organ in a new body, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from maisi.evaluate.features import PLANES, FeatureExtractor

__all__ = ["pooled_features", "nearest_training", "image_similarity", "audit_memorisation", "AUDIT_COLUMNS"]

#: Columns of the audit table (one row per generated case).
AUDIT_COLUMNS: tuple[str, ...] = (
    "case_id", "nearest_training", "distance", "threshold", "held_out_rank", "image_similarity", "flagged",
)  # fmt: skip


def pooled_features(extractor: FeatureExtractor, volume: np.ndarray) -> np.ndarray:
    """One feature vector per volume: the mean of each plane's slice features, the planes in :data:`PLANES`' order."""
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
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The memorisation audit of ``generated`` cases against ``training`` ones, judged by ``held_out`` ones.

    Args:
        generated, training, held_out: case id -> pooled feature vector (:func:`pooled_features`).
        percentile: a generated case nearer to a training case than this percentile of the held-out cases'
            nearest-training distances is flagged.
        volumes: case id -> volume on a common grid (e.g. :func:`maisi.evaluate.features.load_volume`), for the
            image-space similarity of each generated case and its nearest training case (omitted: ``NaN``).

    Returns:
        ``(audit, held_out_distances)``: one row per generated case (:data:`AUDIT_COLUMNS`; ``held_out_rank``
        is the fraction of held-out cases nearer to the training set than it), and one row per held-out case
        (``case_id``, ``nearest_training``, ``distance``).
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
    rows = []
    gen_ids = list(generated)
    if gen_ids:
        g_index, g_dist = nearest_training(scale(np.stack([generated[c] for c in gen_ids])), train)
        for case, i, dist in zip(gen_ids, g_index, g_dist, strict=True):
            similarity = image_similarity(volumes(case), volumes(train_ids[i])) if volumes is not None else float("nan")
            rows.append({
                "case_id": case, "nearest_training": train_ids[i], "distance": float(dist), "threshold": threshold,
                "held_out_rank": float((h_dist < dist).mean()), "image_similarity": similarity, "flagged": bool(dist < threshold),
            })  # fmt: skip
    return pd.DataFrame(rows, columns=list(AUDIT_COLUMNS)), held
