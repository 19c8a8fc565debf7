"""Latent training data shared by the diffusion and ControlNet stages: cases, patches, batches, noise."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from maisi.core.holdout import case_key, check_not_held_out, held_out_keys
from maisi.core.shards import log
from maisi.core.tables import read_table
from maisi.models.networks import condition_inputs
from maisi.models.variants import MODALITIES, Variant, variant
from maisi.train.cache_latents import read_latent
from maisi.train.settings import Patch

__all__ = ["latent_records", "LatentCase", "Batch", "read_cases", "sample_batch", "noise_inputs"]


@dataclass
class LatentCase:
    """One training case: its latent posterior, conditioning inputs and (for the ControlNet) label file."""

    case_id: str
    path: Path
    mu: torch.Tensor  # (C, x, y, z) float32
    sigma: torch.Tensor
    spacing: list[float]
    top: list[int]
    bottom: list[int]
    label: Path | None = None
    fold: int | None = None  # the prepared dataset's fold, where the records give it

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.mu.shape[1:])  # type: ignore[return-value]


def _rows(records: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(records, pd.DataFrame):
        return records.to_dict("records")
    return [dict(r) for r in records]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def _fold(row: Mapping[str, Any], case_id: str) -> int | None:
    """A record's ``fold`` (the prepared dataset's), ``None`` where it has none."""
    value = row.get("fold")
    if _blank(value):
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise ValueError(f"case {case_id}: fold {value!r} is not a whole number") from None


def read_cases(records: pd.DataFrame | Iterable[Mapping[str, Any]], need_label: bool = False) -> list[LatentCase]:
    """Load the latents of ``records`` (``case_id``, ``latent`` and, with ``need_label``, ``label``),
    sorted by case id."""
    rows = _rows(records)
    if not rows:
        raise ValueError("no latent records to train on (the record list is empty)")
    for i, row in enumerate(rows):
        for key in ("case_id", "latent"):
            if _blank(row.get(key)):
                raise ValueError(f"latent record {i} ({row.get('case_id', '?')}) has no '{key}'")
    rows.sort(key=lambda r: (str(r["case_id"]), str(r["latent"])))
    ids = [str(r["case_id"]) for r in rows]
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"duplicate case ids in the latent records: {', '.join(dupes[:5])}")
    cases = []
    for row in rows:
        case_id = str(row["case_id"])
        label = None
        if need_label:
            if _blank(row.get("label")):
                raise ValueError(f"case {case_id}: no label map (the ControlNet needs one per case)")
            label = Path(str(row["label"]))
        data = read_latent(row["latent"])
        cases.append(
            LatentCase(
                case_id=case_id, path=Path(str(row["latent"])), mu=torch.from_numpy(data["mu"]), sigma=torch.from_numpy(data["sigma"]),
                spacing=[float(v) for v in data["spacing"].reshape(-1)],
                top=[int(v) for v in data["top_region_index"].reshape(-1)],
                bottom=[int(v) for v in data["bottom_region_index"].reshape(-1)], label=label, fold=_fold(row, case_id),
            )
        )  # fmt: skip
    channels = {int(c.mu.shape[0]) for c in cases}
    if len(channels) > 1:
        raise ValueError(f"latents with different channel counts: {sorted(channels)}")
    return cases


def latent_records(
    tables: Sequence[str | os.PathLike] | str | os.PathLike, cases: str | os.PathLike | None = None
) -> pd.DataFrame:
    """The training records from ``cache_latents``' shard tables: rows with a latent (and status ``ok``
    where the table has a status), with the ``label`` path and the ``fold`` joined from the prepared ``cases``
    table (``results/prepared/cases.tsv``) when given (a held-out case of that table among the records is refused:
    :class:`maisi.core.holdout.HeldOutLeak`). With several sources, case ids become ``source/case_id``."""
    paths = [tables] if isinstance(tables, (str, os.PathLike)) else list(tables)
    frames = [read_table(p) for p in paths]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["case_id", "latent"])
    if "status" in frame.columns:
        skipped = frame[frame.status != "ok"]
        if len(skipped):
            log.info("leaving out %d cases without a latent (status not ok)", len(skipped))
        frame = frame[frame.status == "ok"]
    if "latent" not in frame.columns or "case_id" not in frame.columns:
        raise ValueError(f"latent tables {', '.join(map(str, paths))} lack a 'case_id' or 'latent' column")
    frame = frame[frame.latent != ""].copy()
    keys = ["source", "case_id"] if "source" in frame.columns else ["case_id"]
    if cases is not None:
        table = read_table(cases)
        if "source" in frame.columns:  # the held-out split never trains the diffusion UNet or the ControlNet
            used = {case_key(s, c): p for s, c, p in zip(frame.source, frame.case_id, frame.latent, strict=True)}
            check_not_held_out(used, held_out_keys(table), "diffusion / ControlNet training (latent records)")
        on = [k for k in keys if k in table.columns]
        joined = [c for c in ("label", "fold") if c in table.columns]
        frame = frame.drop(columns=joined, errors="ignore").merge(table[[*on, *joined]], on=on, how="left")
        for column in joined:
            frame[column] = frame[column].fillna("")
    if "source" in frame.columns and frame.source.nunique() > 1:
        frame["case_id"] = frame.source + "/" + frame.case_id
    return frame.reset_index(drop=True)


def model_divisor(variant_name: str) -> int:
    """What every latent size must be a multiple of (the UNet halves it once per extra level)."""
    return 2 ** (variant(variant_name).unet_levels - 1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@dataclass
class Batch:
    """One step's sampled latents (scaled, CPU) and where each came from."""

    z: torch.Tensor  # (B, C, x, y, z)
    cases: list[LatentCase]
    starts: list[Patch]  # crop origin in latent voxels
    shape: Patch  # the (padded) spatial size of z

    def select(self, part: slice | None) -> Batch:
        """The samples ``part`` of the batch (one process's share of a global batch; all of it for ``None``)."""
        if part is None:
            return self
        return Batch(z=self.z[part], cases=list(self.cases[part]), starts=list(self.starts[part]), shape=self.shape)

    @property
    def whole(self) -> list[Patch] | None:
        """Each sample's whole latent size when ``z`` holds crops (see :func:`noise_inputs`); ``None`` for whole latents."""
        if all(c.shape == self.shape for c in self.cases):
            return None
        return [c.shape for c in self.cases]


def _choose(gen: torch.Generator, pool: Sequence[int], first: int, batch_size: int) -> list[int]:
    """``first`` plus ``batch_size - 1`` other cases of ``pool`` (repeats only when the pool is too small)."""
    rest = [i for i in pool if i != first]
    perm = torch.randperm(len(rest), generator=gen).tolist() if rest else []
    chosen = [first] + [rest[i] for i in perm[: batch_size - 1]]
    while len(chosen) < batch_size:  # fewer cases than the batch: draw again
        chosen.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
    return chosen


def sample_batch(
    cases: Sequence[LatentCase],
    gen: torch.Generator,
    batch_size: int,
    patch: Patch | None,
    divisor: int,
    scale: torch.Tensor | float,
) -> Batch:
    """Choose ``batch_size`` cases (random crops of size ``patch``, or whole latents of one shape), draw
    ``z = mu + sigma * eps`` and scale it. Latents smaller than the patch (or than a multiple of
    ``divisor``, for whole latents) are zero-padded at the far end."""
    first = int(torch.randint(len(cases), (1,), generator=gen))
    if patch is None:
        pool = [i for i, c in enumerate(cases) if c.shape == cases[first].shape]
        target: Patch = tuple(_round_up(n, divisor) for n in cases[first].shape)  # type: ignore[assignment]
    else:
        pool = list(range(len(cases)))
        target = tuple(int(p) for p in patch)  # type: ignore[assignment]
    chosen = _choose(gen, pool, first, batch_size)
    zs, starts = [], []
    for i in chosen:
        case = cases[i]
        start = tuple(int(torch.randint(max(n - p, 0) + 1, (1,), generator=gen)) for n, p in zip(case.shape, target, strict=True))
        sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(start, target, strict=True))
        mu, sigma = case.mu[sl], case.sigma[sl]
        z = mu + sigma * torch.randn(mu.shape, generator=gen)
        pad = [0] * 6
        for axis in range(3):  # F.pad takes (last axis first) (before, after) pairs
            pad[2 * (2 - axis) + 1] = target[axis] - z.shape[1 + axis]
        zs.append(F.pad(z, pad) if any(pad) else z)
        starts.append(start)  # type: ignore[arg-type]
    z = torch.stack(zs) * torch.as_tensor(scale, dtype=torch.float32)
    return Batch(z=z, cases=[cases[i] for i in chosen], starts=starts, shape=target)


def noise_inputs(
    scheduler: Any,
    kind: str,
    z: torch.Tensor,
    gen: torch.Generator,
    device: torch.device,
    whole: Sequence[Patch] | None = None,
    part: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, target) on ``device``: target = noise (DDPM) or ``z - noise`` (RFlow).

    ``part``: the samples to return (one process's share of the global batch ``z``); the noise and timesteps
    are drawn for the whole batch first, so every share is what one process drawing the whole batch gets.

    ``whole``: the spatial size of each sample's whole latent when ``z`` holds crops of it. RFlow's timestep
    transform shifts the noise levels by the latent's size; sampling them for the crop would train a patch
    model mostly at low noise (16^3 crops: 2% of the draws above t = 0.8), while generation walks the whole
    latent's levels evenly from pure noise. With ``whole`` they are drawn as for the whole latents.
    """
    noise = torch.randn(z.shape, generator=gen)
    if kind == "ddpm":
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), generator=gen)
    else:  # RFlowScheduler.sample_timesteps draws from torch's global generator: fork and seed it
        sub_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub_seed)
            if whole is None:
                timesteps = scheduler.sample_timesteps(z)
            else:  # only the shape of what sample_timesteps is given matters (empty: no memory is written)
                timesteps = torch.cat([scheduler.sample_timesteps(torch.empty((1, 1, *shape))) for shape in whole])
    if part is not None:
        z, noise, timesteps = z[part], noise[part], timesteps[part]
    z, noise, timesteps = z.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
    target = noise if kind == "ddpm" else z - noise
    return noisy, timesteps, target


def conditions(batch: Batch, device: torch.device, var: Variant) -> dict[str, torch.Tensor]:
    """The UNet's keyword inputs for a batch, those the variant takes: spacing, top/bottom regions
    (x100, as MAISI) and the modality class label (the prepared data are CT: code 1)."""
    cases = batch.cases
    return condition_inputs(var, [c.top for c in cases], [c.bottom for c in cases], [c.spacing for c in cases],
                            [MODALITIES["ct"]] * len(cases), device)  # fmt: skip


def l1_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L1 loss in float32, optionally weighted per voxel."""
    diff = (prediction.float() - target.float()).abs()
    return diff.mean() if weight is None else (diff * weight).mean()


def check_patch(settings: Any, cases: Sequence[LatentCase]) -> int:
    """The model's size divisor; a patch that does not fit it is an error, small latents are padded."""
    divisor = model_divisor(settings.variant)
    if settings.latent_patch is not None:
        if any(p % divisor for p in settings.latent_patch):
            raise ValueError(
                f"latent_patch {tuple(settings.latent_patch)} must be a multiple of {divisor} per axis for variant '{settings.variant}'"
            )
        small = [c.case_id for c in cases if any(n < p for n, p in zip(c.shape, settings.latent_patch, strict=True))]
        if small:
            log.info(
                "%d latents smaller than the patch %s are zero-padded (e.g. %s)", len(small), settings.latent_patch, small[0]
            )
    else:
        odd = [c.case_id for c in cases if any(n % divisor for n in c.shape)]
        if odd:
            log.info("%d whole latents are zero-padded to a multiple of %d (e.g. %s)", len(odd), divisor, odd[0])
    return divisor
