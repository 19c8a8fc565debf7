"""Downstream utility: does synthetic data help a segmentation model trained on it?

MAISI's paper measured it once, by hand (Auto3DSeg, 2.5-6.5 % Dice on tumour tasks). Here three arms
train the same MONAI ``SegResNet`` with the same budget and seed: (a) the real training cases, (b) real
plus synthetic, (c) synthetic only; each is evaluated on held-out real cases that no generative stage
saw. Reported: Dice per class and case, and the differences (b - a) and (c - a) per class with a paired
bootstrap confidence interval over the held-out cases.

Volumes are HU arrays on one grid (FID's preprocessing, say) with label maps of MAISI ids; the classes
are groups of ids (MAISI's QC organ groups by default). The inputs are four HU windows (as FID's segmenter's).
Training samples random crops, most of them centred on a voxel of a class balanced over the cases (as MONAI's
``RandCropByLabelClasses`` balances one image's), and uses MONAI's ``DiceCELoss``; evaluation runs MONAI's
``sliding_window_inference`` over the whole volume.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from maisi.core.io import write_with_sidecar
from maisi.core.seeds import derive_seed
from maisi.evaluate.fidelity import Reader, class_dice, class_map
from maisi.evaluate.qc import ORGAN_GROUPS
from maisi.evaluate.segmenter import WINDOWS, hu_windows
from maisi.evaluate.settings import FIDSettings

__all__ = [
    "ARMS", "UtilityBudget", "class_map", "arm_cases", "train_segmentation", "predict_classes", "case_dice", "save_segmentation",
    "load_segmentation", "utility_budget", "build_network", "bootstrap_difference", "evaluate_arms", "utility_experiment", "resolve_classes", "load_pairs",
    "plot_utility", "utility_reader", "DIFFERENCE_COLUMNS",
]  # fmt: skip

ARMS: tuple[str, ...] = ("real", "real+synthetic", "synthetic")


@dataclass(frozen=True)
class UtilityBudget:
    """The training budget every arm gets (same steps, batch, crop, learning rate, network and seed)."""

    steps: int = 300
    batch_size: int = 2
    crop: tuple[int, int, int] = (32, 32, 32)
    lr: float = 2e-3
    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    norm: str = "batch"
    seed: int = 0
    device: str = "cpu"


def build_network(n_classes: int, budget: UtilityBudget) -> torch.nn.Module:
    """MONAI's 3-D ``SegResNet`` of ``budget`` (levels ``blocks_down``, one up-block per level below the top) for the
    background and ``n_classes`` classes. Batch norm by default: group or instance norm normalise a crop of pure air
    or pure lung to the same features, and with 32^3 crops the network took air for lung (Dice 0.26); batch norm
    keeps the absolute intensity (0.59-0.75)."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=len(WINDOWS), out_channels=n_classes + 1, init_filters=budget.init_filters,
                     blocks_down=tuple(budget.blocks_down), blocks_up=(1,) * (len(budget.blocks_down) - 1), norm=budget.norm)  # fmt: skip


def _inputs(hu: np.ndarray) -> torch.Tensor:
    """``(len(WINDOWS), X, Y, Z)`` network inputs: the HU windows of FID's segmenter (whole range, lung, soft tissue,
    bone), each scaled to [0, 1]. With one [-1000, 1000] channel the network had not told the phantom's lungs
    from air after 200 steps (Dice 0); the lung window puts them apart."""
    return hu_windows(torch.from_numpy(np.asarray(hu, dtype=np.float32))[None])[0]


#: Share of the training crops centred on a class voxel (the rest lie anywhere): with half, 150 steps on the
#: phantom found no lung or liver; with 0.8 they found both.
FOREGROUND_SHARE = 0.8


class _Crops:
    """Random training crops of a set of ``(hu, class map)`` cases (padded with air / background where a case is
    smaller than the crop). Half of them are centred on a voxel of one class, each class present in the set as
    likely as the others and each case holding it as likely as the others (MONAI's ``RandCropByLabelClasses``
    balances the classes of one image; balancing over the set lets a class few cases hold, the phantom's lungs,
    be seen as often as bone, which every case holds); the other half lie anywhere."""

    def __init__(self, cases: Sequence[tuple[np.ndarray, np.ndarray]], crop: Sequence[int]):
        self.crop = tuple(int(c) for c in crop)
        self.cases = []
        self.where: dict[int, list[tuple[int, np.ndarray]]] = {}  # class -> (case, flat voxel indices)
        for i, (hu, target) in enumerate(cases):
            pad = [(0, max(c - n, 0)) for c, n in zip(self.crop, hu.shape, strict=True)]
            hu, target = np.pad(hu, pad, constant_values=-1000.0), np.pad(target, pad)
            self.cases.append((hu, target))
            flat = target.ravel()
            for k in np.unique(flat):
                if k > 0:
                    self.where.setdefault(int(k), []).append((i, np.flatnonzero(flat == k)))

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.where and rng.random() < FOREGROUND_SHARE:
            holders = self.where[sorted(self.where)[int(rng.integers(len(self.where)))]]
            i, voxels = holders[int(rng.integers(len(holders)))]
            hu, target = self.cases[i]
            centre = np.unravel_index(voxels[rng.integers(len(voxels))], target.shape)
            start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, self.crop, hu.shape, strict=True)]
        else:
            hu, target = self.cases[int(rng.integers(len(self.cases)))]
            start = [int(rng.integers(0, n - s + 1)) for s, n in zip(self.crop, hu.shape, strict=True)]
        sl = tuple(slice(a, a + s) for a, s in zip(start, self.crop, strict=True))
        return hu[sl], target[sl]


def train_segmentation(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], n_classes: int, budget: UtilityBudget, arm: str = "real"
) -> torch.nn.Module:
    """A MONAI ``SegResNet`` trained on ``(hu, class_map)`` pairs with ``budget``; the crops drawn depend on the
    seed and the arm's name only, so arms differ by their data, not their luck."""
    from monai.losses import DiceCELoss

    if not cases:
        raise ValueError(f"utility arm {arm!r} has no training cases")
    torch.manual_seed(derive_seed(budget.seed, "utility", arm))
    rng = np.random.default_rng(derive_seed(budget.seed, "utility-crops", arm))
    device = torch.device(budget.device)
    model = build_network(n_classes, budget).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
    crops = _Crops(cases, budget.crop)
    model.train()
    for _ in range(budget.steps):
        batch = [crops.draw(rng) for _ in range(budget.batch_size)]
        x = torch.stack([_inputs(h) for h, _ in batch]).to(device)
        y = torch.stack([torch.from_numpy(t)[None] for _, t in batch]).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


#: Sliding windows per forward pass: the same output as one at a time (measured: identical class maps), five
#: times faster on 2 CPU cores for 32^3 windows of a 128^3 volume.
WINDOWS_PER_BATCH = 8


@torch.no_grad()
def predict_classes(model: torch.nn.Module, hu: np.ndarray, budget: UtilityBudget) -> np.ndarray:
    """The class map (0 background, ``k + 1`` the ``k``-th class) of a whole HU volume: MONAI's sliding-window
    inference with the training crop, Gaussian-weighted, a quarter overlap."""
    from monai.inferers import sliding_window_inference

    x = _inputs(hu)[None].to(torch.device(budget.device))
    logits = sliding_window_inference(x, list(budget.crop), WINDOWS_PER_BATCH, model, overlap=0.25, mode="gaussian")
    return torch.as_tensor(logits).argmax(1)[0].cpu().numpy()


def case_dice(model: torch.nn.Module, hu: np.ndarray, target: np.ndarray, n_classes: int, budget: UtilityBudget) -> np.ndarray:
    """Dice of each class (1..n) on one whole case; NaN where the class is absent from both the reference and the
    prediction."""
    return class_dice(predict_classes(model, hu, budget), target, n_classes)


STEP = "utility"


def save_segmentation(
    model: torch.nn.Module, dest: str | os.PathLike, classes: Mapping[str, Sequence[int]], budget: UtilityBudget,
    arm: str, cases: Sequence[str],
) -> dict[str, Any]:  # fmt: skip
    """Write an arm's network (state dict, classes, budget) atomically with its JSON sidecar (the cases it
    learnt from included); returns the sidecar's record."""
    classes = {name: [int(i) for i in ids] for name, ids in classes.items()}
    payload = {"state_dict": model.state_dict(), "classes": classes, "budget": asdict(budget), "arm": arm}
    meta = {"arm": arm, "classes": classes, "budget": asdict(budget), "cases": list(cases),
            "network": f"monai SegResNet 3-D, init_filters {budget.init_filters}, blocks_down {list(budget.blocks_down)}, "
                       f"{budget.norm} norm, inputs {len(WINDOWS)} HU windows, {len(classes) + 1} output channels"}  # fmt: skip
    write_with_sidecar(dest, lambda tmp: torch.save(payload, tmp), meta, STEP)
    return meta


def load_segmentation(path: str | os.PathLike, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """An arm's network written by :func:`save_segmentation` (eval mode, on ``device``) and its record: ``arm``,
    ``classes`` (name -> MAISI ids) and ``budget`` (a :class:`UtilityBudget` on ``device``)."""

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        budget = {**data["budget"], "crop": tuple(data["budget"]["crop"]), "blocks_down": tuple(data["budget"]["blocks_down"])}
        record = {"arm": str(data["arm"]), "classes": {k: tuple(v) for k, v in data["classes"].items()},
                  "budget": UtilityBudget(**{**budget, "device": device})}  # fmt: skip
        model = build_network(len(record["classes"]), record["budget"])
        model.load_state_dict(data["state_dict"])
    except Exception as exc:  # noqa: BLE001 - torch.load and load_state_dict raise many types for a wrong file
        raise ValueError(f"{path}: not a utility segmentation checkpoint ({type(exc).__name__}: {exc})") from None
    return model.to(torch.device(device)).eval(), record


def utility_budget(settings: Any) -> UtilityBudget:
    """Each arm's :class:`UtilityBudget` from :class:`maisi.evaluate.settings.UtilitySettings` (device ``auto``:
    CUDA where present)."""
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return UtilityBudget(steps=settings.steps, batch_size=settings.batch_size, crop=tuple(settings.crop), lr=settings.lr,
                         init_filters=settings.init_filters, blocks_down=tuple(settings.blocks_down), norm=settings.norm,
                         seed=settings.seed, device=device)  # fmt: skip


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


def arm_cases(
    arm: str, real_train: Sequence[tuple[np.ndarray, np.ndarray]], synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
    classes: Mapping[str, Sequence[int]],
) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """An arm's training pairs ``(hu, class map)`` from ``(hu, label)`` pairs in MAISI ids: (a) ``real`` the real
    training cases, (b) ``real+synthetic`` both, (c) ``synthetic`` the synthetic ones only."""
    if arm not in ARMS:
        raise ValueError(f"unknown utility arm {arm!r}; expected one of {', '.join(ARMS)}")
    pairs = {"real": list(real_train), "synthetic": list(synthetic), "real+synthetic": [*real_train, *synthetic]}[arm]
    return [(hu, class_map(label, classes)) for hu, label in pairs]


def evaluate_arms(
    models: Mapping[str, torch.nn.Module],
    held_out: Mapping[str, tuple[np.ndarray, np.ndarray]],
    classes: Mapping[str, Sequence[int]],
    budget: UtilityBudget,
    n_boot: int = 2000,
    level: float = 0.95,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate the three arms' networks on ``held_out`` ``(hu, label)`` pairs (labels in MAISI ids).

    Returns ``(dice, differences)``: Dice per arm, held-out case and class; per class, the mean Dice of each arm
    and ``(b - a)``, ``(c - a)`` with their paired bootstrap intervals over the held-out cases.
    """
    if not held_out:
        raise ValueError("the utility stage needs held-out real cases to evaluate on")
    missing = [arm for arm in ARMS if arm not in models]
    if missing:
        raise ValueError(f"utility arms {', '.join(missing)} have no network")
    n = len(classes)
    tests = {case: (hu, class_map(label, classes)) for case, (hu, label) in held_out.items()}
    rows = []
    for arm in ARMS:
        for case, (hu, target) in tests.items():
            for name, value in zip(classes, case_dice(models[arm], hu, target, n, budget), strict=True):
                rows.append({"arm": arm, "case_id": case, "class": name, "dice": float(value)})
    dice = pd.DataFrame(rows, columns=["arm", "case_id", "class", "dice"])
    table = dice.pivot_table(index=["class", "case_id"], columns="arm", values="dice", dropna=False)
    diffs = []
    for name in classes:
        per_case = table.loc[name] if name in table.index.get_level_values(0) else None
        row: dict[str, Any] = {"class": name, "n_cases": int(per_case["real"].notna().sum()) if per_case is not None else 0}
        for arm in ARMS:
            row[f"dice_{arm}"] = (
                float(np.nanmean(per_case[arm])) if per_case is not None and per_case[arm].notna().any() else float("nan")
            )
        for label, arm in (("b_minus_a", "real+synthetic"), ("c_minus_a", "synthetic")):
            mean, lo, hi = (
                bootstrap_difference(per_case["real"], per_case[arm], n_boot=n_boot, level=level, seed=budget.seed)
                if per_case is not None else (np.nan,) * 3
            )  # fmt: skip
            row |= {label: mean, f"{label}_lo": lo, f"{label}_hi": hi}
        diffs.append(row)
    return dice, pd.DataFrame(diffs, columns=list(DIFFERENCE_COLUMNS))


#: Columns of the utility stage's differences table (one row per class).
DIFFERENCE_COLUMNS: tuple[str, ...] = (
    "class", "n_cases", "dice_real", "dice_real+synthetic", "dice_synthetic",
    "b_minus_a", "b_minus_a_lo", "b_minus_a_hi", "c_minus_a", "c_minus_a_lo", "c_minus_a_hi",
)  # fmt: skip


def utility_experiment(
    real_train: Sequence[tuple[np.ndarray, np.ndarray]],
    synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
    held_out: Mapping[str, tuple[np.ndarray, np.ndarray]],
    classes: Mapping[str, Sequence[int]],
    budget: UtilityBudget,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train the three arms on ``(hu, label)`` pairs (labels in MAISI ids) and evaluate them on ``held_out``
    (:func:`evaluate_arms`)."""
    if not held_out:
        raise ValueError("the utility stage needs held-out real cases to evaluate on")
    n = len(classes)
    models = {arm: train_segmentation(arm_cases(arm, real_train, synthetic, classes), n, budget, arm) for arm in ARMS}
    return evaluate_arms(models, held_out, classes, budget)


def resolve_classes(names: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """The class groups (MAISI ids) of the named QC organ groups; ``None``: all of :data:`ORGAN_GROUPS`."""
    unknown = sorted(set(names or ()) - set(ORGAN_GROUPS))
    if unknown:
        raise ValueError(f"utility.classes: unknown organ group(s) {unknown}; expected some of {', '.join(ORGAN_GROUPS)}")
    return {name: ORGAN_GROUPS[name] for name in (names or ORGAN_GROUPS)}


def load_pairs(cases: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]], fid: FIDSettings, progress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Case id -> ``(hu, label)`` on FID's grid (its spacing and size) from ``(image, label map)`` files."""
    from tqdm.auto import tqdm

    from maisi.evaluate.features import load_label, load_volume

    return {case: (load_volume(image, fid), load_label(label, fid))
            for case, (image, label) in tqdm(cases.items(), desc="utility cases", unit="case", disable=not progress)}  # fmt: skip


def plot_utility(differences: pd.DataFrame, dest: str | os.PathLike, title: str = "") -> None:
    """Left: each arm's mean held-out Dice per class. Right: (b - a) and (c - a) per class with their bootstrap
    intervals (a difference whose interval excludes 0 is one the held-out cases support)."""
    import matplotlib.pyplot as plt

    from maisi.core.figures import save_figure

    d = differences.reset_index(drop=True)
    y = np.arange(len(d))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.45 * len(d) + 1.8), sharey=True)
    for k, (arm, colour) in enumerate(zip(ARMS, ("tab:blue", "tab:purple", "tab:orange"), strict=True)):
        left.barh(y + (k - 1) * 0.27, d[f"dice_{arm}"].astype(float).fillna(0.0), height=0.27, color=colour, label=arm)
    left.set_yticks(y, d["class"])
    left.set_xlim(0, 1)
    left.set_xlabel("mean Dice on held-out real cases")
    left.legend(fontsize=7, frameon=False, loc="lower right")
    for k, (name, colour, what) in enumerate((("b_minus_a", "tab:purple", "(b) - (a)"), ("c_minus_a", "tab:orange", "(c) - (a)"))):
        mean = d[name].astype(float)
        err = np.vstack([mean - d[f"{name}_lo"].astype(float), d[f"{name}_hi"].astype(float) - mean])
        right.errorbar(mean, y + (k - 0.5) * 0.3, xerr=np.nan_to_num(err), fmt="o", color=colour, capsize=3, label=what)
    right.axvline(0.0, color="k", lw=1)
    right.set_xlabel("Dice difference (bootstrap interval)")
    right.legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(title or "Downstream utility: (a) real, (b) real + synthetic, (c) synthetic only")
    save_figure(fig, dest)


def utility_reader(checkpoint: str | os.PathLike, fid: FIDSettings, device: str = "cpu") -> tuple[Reader, dict[str, tuple[int, ...]]]:
    """The utility stage's real-only network as the label-fidelity segmenter, and its class groups."""
    from maisi.evaluate.features import load_volume

    model, record = load_segmentation(checkpoint, device)
    return (lambda case_id, image: predict_classes(model, load_volume(image, fid), record["budget"])), dict(record["classes"])
