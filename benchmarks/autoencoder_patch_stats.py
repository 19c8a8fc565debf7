"""Does the autoencoder shift intensities when it runs on whole volumes? Reconstruct a run's prepared cases
whole and in windows of the training patch size, and compare the organ medians with the real ones.

GroupNorm normalises each group of channels with the mean and variance of whatever it is given: a patch in
training, the whole volume when latents are cached and generated volumes decoded. An autoencoder trained on
patches much smaller than the volumes then sees other statistics at inference, and intensities move. Run in
windows of the training patch size (MONAI's sliding-window inference, Gaussian blending) the autoencoder
sees training-like statistics; the difference between the two is what the patch size costs.

Usage (a run's working directory, e.g. after ``make run``; ``--checkpoint`` for another autoencoder)::

    python benchmarks/autoencoder_patch_stats.py --run . --windows 32 64

Per mode (whole volume, each window size) it prints the mean signed error of MAISI's QC organ medians
(reconstruction - real, HU) over the cases and the mean absolute error inside the body. The last line is
machine-readable, for the whole volumes and the first window size::

    autoencoder_patch_stats soft_tissue_bias_whole_hu=<b> soft_tissue_bias_window_hu=<b> bone_bias_whole_hu=<b> bone_bias_window_hu=<b>

(soft tissue: the mean over liver, spleen, pancreas and kidneys).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maisi.core.io import read_json  # noqa: E402
from maisi.evaluate.qc import ORGAN_GROUPS, load_case, organ_medians  # noqa: E402
from maisi.models.checkpoints import load_autoencoder  # noqa: E402

SOFT_TISSUE = ("liver", "spleen", "pancreas", "kidney")


def reconstruct(autoencoder: torch.nn.Module, image: np.ndarray, window: int | None) -> np.ndarray:
    """The autoencoder's reconstruction (posterior mean decoded) of a [0, 1] image, whole or in windows."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    with torch.no_grad():
        if window is None:
            out = autoencoder.reconstruct(x)
        else:
            out = sliding_window_inference(x, (window,) * 3, 4, autoencoder.reconstruct, overlap=0.5, mode="gaussian")
    return out[0, 0].numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=".", help="a finished run's working directory (its prepared cases and autoencoder)")
    p.add_argument("--checkpoint", help="another autoencoder checkpoint (default: the run's results/models/autoencoder.pt)")
    p.add_argument("--windows", type=int, nargs="+", default=[32, 64], help="window sizes (voxels) besides the whole volume")
    p.add_argument("--cases", type=int, default=8, help="at most this many prepared cases")
    args = p.parse_args(argv)
    run = Path(args.run).resolve()
    torch.set_num_threads(2)
    config = yaml.safe_load((run / "config/config.yaml").read_text(encoding="utf-8"))
    variant = config.get("model", {}).get("variant", "tiny")
    checkpoint = Path(args.checkpoint) if args.checkpoint else run / "results/models/autoencoder.pt"
    autoencoder = load_autoencoder(checkpoint, variant).eval()
    lo, hi = config.get("preprocess", {}).get("hu_range", [-1000, 1000])
    datalist = read_json(run / "results/prepared/datalist.json")["training"][: args.cases]
    modes: list[int | None] = [None, *args.windows]
    errors: dict[str, dict[str, list[float]]] = {str(m or "whole"): {} for m in modes}
    mae: dict[str, list[float]] = {str(m or "whole"): [] for m in modes}
    for entry in datalist:
        image, label, _, _ = load_case(run / "results/prepared" / entry["image"], run / "results/prepared" / entry["label"])  # [0, 1]
        hu = image * (hi - lo) + lo
        real = organ_medians(hu, label)
        for mode in modes:
            name = str(mode or "whole")
            rec = reconstruct(autoencoder, image, mode) * (hi - lo) + lo
            mae[name].append(float(np.abs(rec - hu)[label > 0].mean()))
            for organ, value in organ_medians(rec, label).items():
                if organ in real and organ in ORGAN_GROUPS:
                    errors[name].setdefault(organ, []).append(value - real[organ])
    rows = {}
    for name in errors:
        bias = {organ: float(np.mean(v)) for organ, v in sorted(errors[name].items())}
        soft = [bias[o] for o in SOFT_TISSUE if o in bias]
        rows[name] = {"mae_body_hu": float(np.mean(mae[name])), "soft_tissue_bias_hu": float(np.mean(soft)) if soft else float("nan"), **bias}
        print(f"{name:>6}: " + json.dumps({k: round(v, 1) for k, v in rows[name].items()}))
    whole, window = rows["whole"], rows[str(args.windows[0])]
    print(f"autoencoder_patch_stats soft_tissue_bias_whole_hu={whole['soft_tissue_bias_hu']:.1f} "
          f"soft_tissue_bias_window_hu={window['soft_tissue_bias_hu']:.1f} bone_bias_whole_hu={whole.get('bone', float('nan')):.1f} "
          f"bone_bias_window_hu={window.get('bone', float('nan')):.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
