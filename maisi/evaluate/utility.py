"""Downstream utility: does synthetic data help a segmentation model trained on it?

MAISI's paper measured it once, by hand (Auto3DSeg, 2.5-6.5 % Dice on tumour tasks). Here three arms
train the same MONAI ``SegResNet`` with the same budget and seed: (a) the real training cases, (b) real
plus synthetic, (c) synthetic only; each is evaluated on held-out real cases that no generative stage
saw. Reported: Dice per class and case, and the differences (b - a) and (c - a) per class with a paired
bootstrap confidence interval over the held-out cases.

Volumes are HU arrays on one grid (FID's preprocessing, say) with label maps of MAISI ids; the classes
are groups of ids (MAISI's QC organ groups by default). Training samples random crops, half of them
centred on a voxel of a class present (as MONAI's ``RandCropByLabelClasses``), and uses MONAI's
``DiceCELoss``; evaluation runs MONAI's ``sliding_window_inference`` over the whole volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from maisi.core.seeds import derive_seed

__all__ = ["UtilityBudget", "class_map", "train_segmentation", "case_dice", "bootstrap_difference", "utility_experiment"]

ARMS: tuple[str, ...] = ("real", "real+synthetic", "synthetic")


@dataclass(frozen=True)
class UtilityBudget:
    """The training budget every arm gets (same steps, batch, crop, learning rate, network and seed)."""

    steps: int = 300
    batch_size: int = 2
    crop: tuple[int, int, int] = (32, 32, 32)
    lr: float = 2e-3
    init_filters: int = 8
    seed: int = 0
    device: str = "cpu"


def class_map(label: np.ndarray, classes: Mapping[str, Sequence[int]]) -> np.ndarray:
    """0 for background, ``k + 1`` for the voxels whose MAISI id is in the ``k``-th class group."""
    out = np.zeros(label.shape, dtype=np.int64)
    for k, ids in enumerate(classes.values(), start=1):
        out[np.isin(label, list(ids))] = k
    return out


def _inputs(hu: np.ndarray) -> torch.Tensor:
    """HU clipped to [-1000, 1000] and scaled to [-1, 1], ``(1, X, Y, Z)``."""
    return torch.from_numpy(np.clip(np.asarray(hu, dtype=np.float32), -1000.0, 1000.0) / 1000.0)[None]


def _crop(hu: np.ndarray, target: np.ndarray, crop: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random crop (padded with air / background where the volume is smaller), centred on a foreground voxel
    half of the time."""
    pad = [(0, max(c - n, 0)) for c, n in zip(crop, hu.shape, strict=True)]
    hu, target = np.pad(hu, pad, constant_values=-1000.0), np.pad(target, pad)
    fg = np.argwhere(target > 0)
    if len(fg) and rng.random() < 0.5:
        centre = fg[rng.integers(len(fg))]
        start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, crop, hu.shape, strict=True)]
    else:
        start = [int(rng.integers(0, n - s + 1)) for s, n in zip(crop, hu.shape, strict=True)]
    sl = tuple(slice(a, a + s) for a, s in zip(start, crop, strict=True))
    return hu[sl], target[sl]


def train_segmentation(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int, budget: UtilityBudget, arm: str = "real"
) -> torch.nn.Module:
    """A MONAI ``SegResNet`` trained on ``(hu, class_map)`` pairs with ``budget``; the crops drawn depend on the
    seed and the arm's name only, so arms differ by their data, not their luck."""
    from monai.losses import DiceCELoss
    from monai.networks.nets import SegResNet

    if not cases:
        raise ValueError(f"utility arm {arm!r} has no training cases")
    torch.manual_seed(derive_seed(budget.seed, "utility", arm))
    rng = np.random.default_rng(derive_seed(budget.seed, "utility-crops", arm))
    device = torch.device(budget.device)
    model = SegResNet(spatial_dims=3, in_channels=1, out_channels=n_classes + 1, init_filters=budget.init_filters).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    model.train()
    for _ in range(budget.steps):
        picks = rng.integers(len(cases), size=budget.batch_size)
        crops = [_crop(cases[i][0], cases[i][1], budget.crop, rng) for i in picks]
        x = torch.stack([_inputs(h) for h, _ in crops]).to(device)
        y = torch.stack([torch.from_numpy(t)[None] for _, t in crops]).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def case_dice(model: torch.nn.Module, hu: np.ndarray, target: np.ndarray, n_classes: int, budget: UtilityBudget) -> np.ndarray:
    """Dice of each class (1..n) on one whole case (MONAI sliding-window inference); NaN where the class is absent
    from both the reference and the prediction."""
    from monai.inferers import sliding_window_inference

    x = _inputs(hu)[None].to(torch.device(budget.device))
    logits = sliding_window_inference(x, list(budget.crop), 1, model, overlap=0.25, mode="gaussian")
    pred = torch.as_tensor(logits).argmax(1)[0].cpu().numpy()
    out = np.full(n_classes, np.nan)
    for k in range(1, n_classes + 1):
        p, t = pred == k, target == k
        if p.any() or t.any():
            out[k - 1] = 2.0 * (p & t).sum() / (p.sum() + t.sum())
    return out


def bootstrap_difference(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of the paired differences ``b - a`` over cases and its percentile bootstrap interval (cases resampled
    with replacement); cases where either value is NaN are left out. ``(nan, nan, nan)`` without any pair."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = ~(np.isnan(a) | np.isnan(b))
    d = b[keep] - a[keep]
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    return float(d.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail))


def utility_experiment(
    real_train: Sequence[tuple[np.ndarray, np.ndarray]],
    synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
    held_out: Mapping[str, tuple[np.ndarray, np.ndarray]],
    classes: Mapping[str, Sequence[int]],
    budget: UtilityBudget,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the three arms on ``(hu, label)`` pairs (labels in MAISI ids) and evaluate them on ``held_out``.

    Returns ``(dice, differences)``: Dice per arm, held-out case and class; per class, the mean Dice of each arm
    and ``(b - a)``, ``(c - a)`` with their bootstrap intervals.
    """
    if not held_out:
        raise ValueError("the utility stage needs held-out real cases to evaluate on")
    n = len(classes)

    def mapped(pairs):
        return [(hu, class_map(label, classes)) for hu, label in pairs]

    data = {"real": mapped(real_train), "synthetic": mapped(synthetic)}
    data["real+synthetic"] = data["real"] + data["synthetic"]
    tests = {case: (hu, class_map(label, classes)) for case, (hu, label) in held_out.items()}
    rows = []
    for arm in ARMS:
        model = train_segmentation(data[arm], n, budget, arm)
        for case, (hu, target) in tests.items():
            for name, value in zip(classes, case_dice(model, hu, target, n, budget), strict=True):
                rows.append({"arm": arm, "case_id": case, "class": name, "dice": float(value)})
    dice = pd.DataFrame(rows, columns=["arm", "case_id", "class", "dice"])
    table = dice.pivot_table(index=["class", "case_id"], columns="arm", values="dice", dropna=False)
    diffs = []
    for name in classes:
        per_case = table.loc[name] if name in table.index.get_level_values(0) else None
        row = {"class": name}
        for arm in ARMS:
            row[f"dice_{arm}"] = (
                float(np.nanmean(per_case[arm])) if per_case is not None and per_case[arm].notna().any() else float("nan")
            )
        for label, arm in (("b_minus_a", "real+synthetic"), ("c_minus_a", "synthetic")):
            mean, lo, hi = (
                bootstrap_difference(per_case["real"], per_case[arm], seed=budget.seed) if per_case is not None else (np.nan,) * 3
            )
            row |= {label: mean, f"{label}_lo": lo, f"{label}_hi": hi}
        diffs.append(row)
    return dice, pd.DataFrame(diffs)
