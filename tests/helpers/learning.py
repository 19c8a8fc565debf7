"""Mask-conditioned cases of a finished run judged against the real data, and the same cases made again
by deliberately broken models (the learning test's negative controls)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from maisi.evaluate.fidelity import OrganAgreement, organ_agreement
from maisi.evaluate.qc import organ_medians
from maisi.generate.requests import config_requests
from maisi.generate.sampling import load_models, sample_latent, to_hu
from maisi.generate.settings import GenerateSettings
from maisi.generate.tsp import decode_latent


def real_means(work: Path) -> dict[str, float]:
    """The real cases' mean organ medians (QC's reference)."""
    ref = pd.read_csv(work / "results/qc/reference_ranges.tsv", sep="\t")
    ref = ref[ref.measure == "median HU"]
    return dict(zip(ref.organ, ref["mean"].astype(float), strict=True))


def masked_cases(work: Path, config: dict) -> pd.DataFrame:
    """The QC table's rows of mask-conditioned cases (their released image and label paths)."""
    qc = pd.read_csv(work / "results/qc/cases.tsv", sep="\t", keep_default_na=False)
    return qc[qc.request.isin([name for name, r in config_requests(config).items() if r.masks])]


def agreement(image: Path | np.ndarray, label: Path | np.ndarray, real: dict[str, float]) -> OrganAgreement:
    hu = np.asanyarray(nib.load(str(image)).dataobj).astype(np.float32) if isinstance(image, Path) else image
    lab = np.asanyarray(nib.load(str(label)).dataobj).astype(np.int32) if isinstance(label, Path) else label
    return organ_agreement(organ_medians(hu, lab), real)


def regenerate(work: Path, config: dict, row: pd.Series, zero_condition: bool = False, scale_factor: float | None = None) -> np.ndarray:
    """A released mask-conditioned case made again from its seed and label map, in HU, with the ControlNet's
    conditioning zeroed and/or the latents decoded with another scale factor."""
    image, label = work / row["image"], work / row["label"]
    seed = int(json.loads(Path(str(image) + ".json").read_text(encoding="utf-8"))["seed"])
    request = config_requests(config)[row["request"]]
    settings = GenerateSettings.from_config(config)
    models = work / "results/models"
    loaded = load_models(models / "autoencoder.pt", models / "diffusion_unet.pt", models / "controlnet.pt", settings.variant, "cpu")
    mask = np.asanyarray(nib.load(str(label)).dataobj).astype(np.uint8)
    with torch.no_grad():
        z = sample_latent(loaded, request, seed, np.zeros_like(mask) if zero_condition else mask, progress=False)
        volume = decode_latent(loaded.autoencoder, z / (scale_factor or loaded.scale_factor), settings.decoder)[0, 0].numpy()
    return to_hu(volume, mask > 0, loaded.variant.intensity).astype(np.float32)
