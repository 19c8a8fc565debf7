"""Does a ControlNet use its mask? Train it on a finished run's latents and frozen UNet, then compare its loss
with each case's own label map against the loss with another case's map and with no map, on the same
noise, timesteps and crops.

A ControlNet that steers the UNet with the mask has a clearly lower loss with the case's own map than with
another's (``gain`` = loss with another case's map - loss with its own). Its output convolutions start at
zero (MONAI's and MAISI's ControlNet), and Adam moves each weight by at most about the learning rate per
step, so the budget (steps, learning rate, its decay) bounds how far they can grow: ``zero_conv_max``.

Usage (a run's working directory, e.g. after ``make run``)::

    python benchmarks/controlnet_mask_use.py --run . --steps 40 300 --lrs 1e-4 1e-3 --lr-power 2 0

Every combination of steps, learning rate and learning-rate decay power is trained from the same seed.
The last line is machine-readable, for the last combination::

    controlnet_mask_use steps=<n> lr=<lr> lr_power=<p> zero_conv_max=<w> loss_own=<a> loss_other=<b> loss_none=<c> gain=<b - a>
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from maisi.models.checkpoints import diffusion_scheduler, load_diffusion  # noqa: E402
from maisi.models.networks import build_controlnet, build_scheduler, label_to_bits  # noqa: E402
from maisi.models.variants import DOWNSAMPLE, scheduler_spec, variant  # noqa: E402
from maisi.train.batches import conditions, l1_loss, latent_records, noise_inputs, read_cases, sample_batch  # noqa: E402
from maisi.train.controlnet import LabelCache  # noqa: E402
from maisi.train.loop import polynomial_lr  # noqa: E402

ZERO_MODULES = ("controlnet_down_blocks", "controlnet_mid_block")


def _loss(controlnet, unet, batch, labels, scheduler, kind, gen, var) -> tuple[float, ...]:
    noisy, timesteps, target = noise_inputs(scheduler, kind, batch.z, gen, torch.device("cpu"))
    own = labels.crops(batch)
    inputs = conditions(batch, torch.device("cpu"), var)
    out = []
    for lab in (own, own.roll(1, 0), torch.zeros_like(own)):  # own map, another case's, none
        down, mid = controlnet(x=noisy, timesteps=timesteps, controlnet_cond=label_to_bits(lab), class_labels=inputs.get("class_labels"))
        pred = unet(x=noisy, timesteps=timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid, **inputs)
        out.append(float(l1_loss(pred, target)))
    return tuple(out)


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.run)
    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text(encoding="utf-8"))
    name = args.variant or cfg.get("model", {}).get("variant", "tiny")
    var = variant(name)
    tables = sorted(work.glob("results/latents/*/shards/*.tsv"))
    if not tables:
        raise SystemExit(f"{work}: no latent tables under results/latents/*/shards/ (run the workflow there first)")
    cases = read_cases(latent_records(tables, cases=work / "results/prepared/cases.tsv"), need_label=True)
    labels = LabelCache(cases)
    checkpoint = work / "results/models/diffusion_unet.pt"
    kind = diffusion_scheduler(checkpoint, var.scheduler["kind"])
    patch = tuple(args.patch)
    results = []
    for steps, lr, power in itertools.product(args.steps, args.lrs, args.lr_power):
        unet, scale, num_train_timesteps = load_diffusion(checkpoint, name)
        unet = unet.eval().requires_grad_(False)
        scheduler = build_scheduler(scheduler_spec(var, kind, num_train_timesteps))
        scale_t = torch.tensor(scale, dtype=torch.float32)
        torch.manual_seed(args.seed)
        controlnet = build_controlnet(name, unet)
        optimizer = torch.optim.Adam(controlnet.parameters(), lr=lr)
        decay = polynomial_lr(optimizer, steps, power)
        gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        for _ in range(steps):
            batch = sample_batch(cases, gen, args.batch_size, patch, DOWNSAMPLE, scale_t)
            noisy, timesteps, target = noise_inputs(scheduler, kind, batch.z, gen, torch.device("cpu"))
            label = labels.crops(batch)
            inputs = conditions(batch, torch.device("cpu"), var)
            down, mid = controlnet(x=noisy, timesteps=timesteps, controlnet_cond=label_to_bits(label), class_labels=inputs.get("class_labels"))
            pred = unet(x=noisy, timesteps=timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid, **inputs)
            loss = l1_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            decay.step()
        seconds = time.perf_counter() - start
        zero = max(float(p.abs().max()) for n, p in controlnet.named_parameters() if n.startswith(ZERO_MODULES))
        gen = torch.Generator().manual_seed(10_000 + args.seed)  # the same evaluation batches for every combination
        with torch.no_grad():
            losses = np.array([
                _loss(controlnet, unet, sample_batch(cases, gen, args.batch_size, patch, DOWNSAMPLE, scale_t), labels, scheduler, kind, gen, var)
                for _ in range(args.eval_batches)
            ])  # fmt: skip
        own, other, none = losses.mean(axis=0)
        row = {"steps": steps, "lr": lr, "lr_power": power, "seconds": seconds, "zero_conv_max": zero,
               "loss_own": own, "loss_other": other, "loss_none": none, "gain": other - own}  # fmt: skip
        print(f"steps {steps:5d}  lr {lr:8.1e}  decay power {power:g}  {seconds:6.0f} s  zero-init outputs max |w| {zero:.2e}  "
              f"loss: own map {own:.4f}, another case's {other:.4f}, none {none:.4f}  gain {other - own:+.4f}", flush=True)  # fmt: skip
        results.append(row)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=".", help="a finished run's working directory")
    parser.add_argument("--variant", default=None, help="default: the run's model.variant")
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 300])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3])
    parser.add_argument("--lr-power", type=float, nargs="+", default=[2.0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", type=int, nargs=3, default=[16, 16, 16], help="latent crop (the default config's)")
    parser.add_argument("--eval-batches", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    last = rows[-1]
    print("controlnet_mask_use " + " ".join(f"{k}={last[k]:.4g}" if isinstance(last[k], float) else f"{k}={last[k]}"
                                            for k in ("steps", "lr", "lr_power", "zero_conv_max", "loss_own", "loss_other", "loss_none", "gain")))  # fmt: skip


if __name__ == "__main__":
    main()
