"""Does the factory learn? Train the default pipeline on the phantom for a few training budgets and measure
what came out, on phantom cases that never entered training.

The embedded default config is run as it is, then once per budget (CPU-minutes of the three training
stages together), each in its own working directory, with the training steps scaled to the budget: each
stage gets its share (:data:`SHARES`) at the CPU seconds per step the default run measured on this machine.
Per run it reports

- the autoencoder's reconstruction of held-out phantom cases (MAE in HU inside the body, PSNR over
  [-1000, 1000] HU),
- the diffusion UNet's and the ControlNet's validation loss on the held-out cases' latents (fixed noise,
  timesteps and crops; the ControlNet's also with an empty mask: a ControlNet that uses its mask gains),
- for the generated cases: the QC pass rate (after QC's own regeneration, and at the first attempt), the error of MAISI's QC organ medians
  against the real phantom's (mean over organs and mask-conditioned cases; the real value is the mean of
  the training cases' medians, as QC's reference has it), and FID over the run's real-vs-real floor for
  each extractor (``fid_ratio`` is the independent segmenter's, the others are ``fid_ratio_<extractor>``),
- the CPU-minutes the training stages took (Snakemake's benchmark files).

The held-out cases are a second phantom source (another seed) prepared by the same workflow in a folder
of its own, so they pass through the real preprocessing but never through training.

Usage::

    python benchmarks/learning.py --out /tmp/learning --budgets 5 45

The last line is machine-readable, for the largest budget (the CPU-minutes its training took)::

    learning budget_min=<b> qc_pass=<rate> organ_mae_hu=<mae> fid_ratio=<fid/floor>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from maisi.core.seeds import derive_seed  # noqa: E402
from maisi.evaluate.fidelity import organ_agreement  # noqa: E402
from maisi.generate.requests import config_requests  # noqa: E402
from maisi.models.checkpoints import diffusion_scheduler, load_autoencoder, load_controlnet, load_diffusion  # noqa: E402
from maisi.models.networks import build_scheduler, label_to_bits  # noqa: E402
from maisi.models.variants import DOWNSAMPLE, scheduler_spec, variant  # noqa: E402
from maisi.train.batches import Batch, LatentCase, conditions, l1_loss, noise_inputs  # noqa: E402
from maisi.train.cache_latents import encode_volume  # noqa: E402
from maisi.train.settings import LatentSettings  # noqa: E402

#: Share of a budget each training stage gets.
SHARES = {"train_vae": 0.35, "train_diffusion": 0.25, "train_controlnet": 0.40}
#: Crops (latent voxels) and repeats of the validation losses.
VAL_PATCH, VAL_REPEATS = 16, 4


def default_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config/config.yaml").read_text(encoding="utf-8"))
    cfg["catalog"] = str(ROOT / "config/datasets.yaml")
    return cfg


def run_workflow(work: Path, config: dict, target: str = "all") -> None:
    (work / "config").mkdir(parents=True, exist_ok=True)
    (work / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(work), "--cores", "2", target]
    with open(work / "snakemake.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"snakemake failed in {work} (see {work / 'snakemake.log'})")


def finished(work: Path) -> bool:
    """Whether ``work`` holds a finished run (its QC table and FID)."""
    return (work / "results/qc/cases.tsv").is_file() and (work / "results/fid/fid.json").is_file()


def training_cost(work: Path, config: dict) -> dict[str, dict[str, float]]:
    """Wall and CPU seconds of each training stage (Snakemake's benchmark files) and CPU seconds per step."""
    out = {}
    for stage in SHARES:
        row = pd.read_csv(work / f"results/benchmarks/{stage}.tsv", sep="\t").iloc[-1]
        steps = int(config[stage]["steps"])
        out[stage] = {"wall_s": float(row["s"]), "cpu_s": float(row["cpu_time"]), "steps": steps, "cpu_s_per_step": float(row["cpu_time"]) / steps}
    return out


def budget_config(base: dict, budget_min: float, per_step: dict[str, float]) -> dict:
    cfg = json.loads(json.dumps(base))
    for stage, share in SHARES.items():
        steps = max(int(round(share * budget_min * 60.0 / per_step[stage])), 10)
        cfg[stage]["steps"] = steps
        cfg[stage]["checkpoint_every"] = max(steps // 4, 1)
    return cfg


def heldout_cases(work: Path) -> list[dict]:
    data = json.loads((work / "results/prepared/datalist.json").read_text(encoding="utf-8"))
    root = work / "results/prepared"
    return [{**row, "image": root / row["image"], "image_hu": root / row["image_hu"], "label": root / row["label"]} for row in data["training"]]


def _read(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(str(path)).dataobj)


def evaluate_models(work: Path, cases: list[dict], config: dict) -> dict[str, float]:
    """Reconstruction and validation losses of ``work``'s trained models on the held-out ``cases``."""
    name = config["model"]["variant"]
    var = variant(name)
    models = work / "results/models"
    autoencoder = load_autoencoder(models / "autoencoder.pt", name).eval()
    unet, scale, timesteps_n = load_diffusion(models / "diffusion_unet.pt", name)
    unet = unet.eval()
    controlnet = load_controlnet(models / "controlnet.pt", name).eval()
    kind = diffusion_scheduler(models / "diffusion_unet.pt", var.scheduler["kind"])
    scheduler = build_scheduler(scheduler_spec(var, kind, timesteps_n))
    mae, psnr, diffusion_loss, own, empty = [], [], [], [], []
    for i, case in enumerate(cases):
        image = _read(case["image"]).astype(np.float32)
        label = _read(case["label"]).astype(np.uint8)
        hu = image * 2000.0 - 1000.0
        mu, sigma = encode_volume(autoencoder, image, LatentSettings(variant=name), "cpu")
        with torch.no_grad():
            recon = autoencoder.decode(torch.from_numpy(mu)[None])[0, 0].numpy() * 2000.0 - 1000.0
        body = label > 0
        mae.append(float(np.abs(recon - hu)[body].mean()))
        mse = float(np.mean((np.clip(recon, -1000, 1000) - hu) ** 2))
        psnr.append(10.0 * np.log10(2000.0**2 / max(mse, 1e-12)))
        latent = LatentCase(case["case_id"], Path(case["image"]), torch.from_numpy(mu), torch.from_numpy(sigma), [float(s) for s in case["spacing"]],
                            list(case["top_region_index"]), list(case["bottom_region_index"]))  # fmt: skip
        for k in range(VAL_REPEATS):
            gen = torch.Generator().manual_seed(derive_seed(0, "learning-validation", i, k))
            start = tuple(int(torch.randint(max(n - VAL_PATCH, 0) + 1, (1,), generator=gen)) for n in latent.shape)
            sl = (slice(None),) + tuple(slice(s, s + VAL_PATCH) for s in start)
            z = (latent.mu[sl] + latent.sigma[sl] * torch.randn(latent.mu[sl].shape, generator=gen))[None] * scale
            batch = Batch(z=z, cases=[latent], starts=[start], shape=tuple(z.shape[2:]))
            noisy, t, target = noise_inputs(scheduler, kind, z, gen, torch.device("cpu"))
            inputs = conditions(batch, torch.device("cpu"), var)
            crop = label[tuple(slice(DOWNSAMPLE * s, DOWNSAMPLE * (s + VAL_PATCH)) for s in start)]
            crop = torch.from_numpy(np.ascontiguousarray(crop))[None, None]
            with torch.no_grad():
                diffusion_loss.append(float(l1_loss(unet(x=noisy, timesteps=t, **inputs), target)))
                for cond, into in ((crop, own), (torch.zeros_like(crop), empty)):
                    down, mid = controlnet(x=noisy, timesteps=t, controlnet_cond=label_to_bits(cond), class_labels=inputs.get("class_labels"))
                    pred = unet(x=noisy, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid, **inputs)
                    into.append(float(l1_loss(pred, target)))
    return {
        "vae_mae_hu": float(np.mean(mae)), "vae_psnr_db": float(np.mean(psnr)), "diffusion_val_loss": float(np.mean(diffusion_loss)),
        "controlnet_val_loss": float(np.mean(own)), "controlnet_val_loss_no_mask": float(np.mean(empty)),
    }  # fmt: skip


def evaluate_generated(work: Path, config: dict) -> dict[str, float]:
    """QC pass rate (first attempts), organ-median error of the mask-conditioned cases and FID over its floor."""
    qc = pd.read_csv(work / "results/qc/cases.tsv", sep="\t", keep_default_na=False)
    reference = pd.read_csv(work / "results/qc/reference_ranges.tsv", sep="\t")
    real = dict(zip(reference[reference.measure == "median HU"].organ, reference[reference.measure == "median HU"]["mean"], strict=True))
    errors: dict[str, list[float]] = {}
    masked = {name for name, r in config_requests(config).items() if r.masks}
    for _, row in qc[qc.request.isin(masked)].iterrows():
        found = organ_agreement(json.loads(row["medians"]) if row["medians"] else {}, real, min_organs=1)
        for organ, error in found.errors_hu.items():
            errors.setdefault(organ, []).append(error)
    fid = json.loads((work / "results/fid/fid.json").read_text(encoding="utf-8"))
    by_name = dict(zip(fid["settings"]["extractors"], fid["extractors"], strict=True))
    fids = {}
    for name, entry in by_name.items():
        value, floor = float(entry["fid"]["average"]), float(entry["real_floor"]["average"])
        fids |= {f"fid_{name}": value, f"fid_floor_{name}": floor, f"fid_ratio_{name}": value / floor}
    independent = "segmenter" if "segmenter" in by_name else next(iter(by_name))
    return {
        "qc_pass": float((qc.qc_status == "pass").mean()),
        "qc_pass_first_attempt": float(((qc.qc_status == "pass") & (qc.attempt.astype(int) == 0)).mean()),
        "organ_mae_hu": float(np.mean([np.mean(v) for v in errors.values()])) if errors else float("nan"),
        "organ_errors_hu": {k: float(np.mean(v)) for k, v in errors.items()},
        **fids, "fid_ratio": fids[f"fid_ratio_{independent}"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs (the default config, one per budget, the held-out data); finished runs are reused")
    p.add_argument("--budgets", type=float, nargs="*", default=[5.0, 45.0], help="training CPU-minutes of the runs besides the default config's")
    p.add_argument("--default-run", help="a finished run of the embedded default config (e.g. a checkout after `make run`) to use as the default's row")
    p.add_argument("--heldout", type=int, default=4, help="held-out phantom cases")
    p.add_argument("--heldout-seed", type=int, default=1000)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    torch.set_num_threads(2)
    base = default_config()
    # every run trains on the same real cases: one FID segmenter serves them all (its cache key is their hash)
    base.setdefault("fid", {}).setdefault("segmenter", {})["cache"] = str(out / "fid_segmenter_cache")

    heldout_cfg = json.loads(json.dumps(base))
    heldout_cfg["sources"]["phantom"].update(n_cases=args.heldout, seed=args.heldout_seed)
    if not (out / "heldout/results/prepared/datalist.json").is_file():
        run_workflow(out / "heldout", heldout_cfg, "results/prepared/datalist.json")
    cases = heldout_cases(out / "heldout")

    calibration = Path(args.default_run).resolve() if args.default_run else out / "default"
    t0 = time.perf_counter()
    if not finished(calibration):
        if args.default_run:
            raise SystemExit(f"--default-run {calibration}: no finished run there (results/qc/cases.tsv, results/fid/fid.json)")
        run_workflow(calibration, base)
    calibration_wall = float("nan") if args.default_run else time.perf_counter() - t0  # a reused run's time is not known
    cost = training_cost(calibration, base)
    per_step = {stage: c["cpu_s_per_step"] for stage, c in cost.items()}
    print("calibration (default config): " + ", ".join(f"{s} {c['steps']} steps, {c['cpu_s']:.0f} CPU-s" for s, c in cost.items()))

    def measure(label: str, work: Path, cfg: dict, wall: float) -> dict:
        spent = training_cost(work, cfg)
        row = {
            "run": label, "training_cpu_min": sum(c["cpu_s"] for c in spent.values()) / 60.0,
            "training_wall_min": sum(c["wall_s"] for c in spent.values()) / 60.0, "run_wall_min": wall / 60.0,
            **{f"{s}_steps": cfg[s]["steps"] for s in SHARES},
            **evaluate_models(work, cases, cfg), **evaluate_generated(work, cfg),
        }  # fmt: skip
        print(json.dumps(row, default=float))
        return row

    rows = [measure("default", calibration, base, calibration_wall)]
    for budget in sorted(args.budgets):
        cfg = budget_config(base, budget, per_step)
        work = out / f"budget-{budget:g}"
        t0 = time.perf_counter()
        if not finished(work):
            run_workflow(work, cfg)
        rows.append(measure(f"budget {budget:g}", work, cfg, time.perf_counter() - t0))
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "organ_errors_hu"} for r in rows])
    table.to_csv(out / "learning.tsv", sep="\t", index=False, float_format="%.4g")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    last = max(rows, key=lambda r: r["training_cpu_min"])
    print("fid over floor, largest budget: " + ", ".join(f"{k[len('fid_ratio_'):]} {v:.2f}" for k, v in last.items() if k.startswith("fid_ratio_")))
    print(f"learning budget_min={last['training_cpu_min']:.1f} qc_pass={last['qc_pass']:.3f} organ_mae_hu={last['organ_mae_hu']:.1f} fid_ratio={last['fid_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
